"""The package's shape: imports go one way (cli -> app -> stages -> measure -> models/data ->
nn -> arch -> base), with no circle, and `d2d --help` imports no torch."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the lowest rank first; a module may import only from its own rank or below
LAYERS = [
    ("base", ["d2d.errors", "d2d.progress", "d2d.dist", "d2d.bundled", "d2d.io"]),
    ("base", ["d2d.options", "d2d.lineage", "d2d.device", "d2d.__version__"]),
    ("arch", ["d2d.arch"]),
    ("nn", ["d2d.nn"]),
    ("models, data, artifact", ["d2d.data", "d2d.models", "d2d.cluster", "d2d.artifact"]),
    ("measure, training", ["d2d.measure", "d2d.train", "d2d.routers"]),
    ("stages", ["d2d.stages"]),
    ("applications", ["d2d.recipe", "d2d.inspect", "d2d.report", "d2d"]),
    ("command line", ["d2d_cli"]),
]


def rank(module: str) -> int:
    best, best_len = None, -1
    for r, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = r, len(p)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in (("d2d", ROOT / "d2d"), ("d2d_cli", ROOT / "cli")):
        for f in folder.rglob("*.py"):
            parts = [pkg, *f.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every d2d module `name` imports, at the top or inside a function."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in ("d2d", "d2d_cli")}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.split(".")[0] not in ("d2d", "d2d_cli"):
                continue
            for a in node.names:  # `from d2d import arch` imports the module d2d.arch
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in known else (f"{mod}.__version__" if mod == "d2d" else mod))
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods) | {"d2d.__version__"}
    return {n: imports(n, p, known) for n, p in mods.items()}


def test_every_module_has_a_layer():
    for m in modules():
        rank(m)


def test_imports_only_go_down():
    upward = [
        f"{m} ({LAYERS[rank(m)][0]}) imports {i} ({LAYERS[rank(i)][0]})"
        for m, deps in graph().items()
        for i in deps
        if rank(i) > rank(m) and m != "d2d"  # the package facade only re-exports stages'
    ]
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    circles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == 1:
                circles.append(" -> ".join(path[path.index(d) :] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state and m != "d2d":
            visit(m, [m])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The checker itself: an nn module importing a stage is flagged."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from d2d.stages import STAGES\n")
    deps = imports("d2d.nn.x", f, {"d2d.stages"})
    assert deps == {"d2d.stages"} and rank("d2d.stages") > rank("d2d.nn.x")


def test_help_imports_no_torch():
    """`d2d --help` and every stage's --help build from the registry without torch (stage
    modules import their heavy layers inside their functions for this)."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from d2d_cli.main import app\n"
        "from d2d.stages import STAGES\n"
        "r = CliRunner()\n"
        "for args in [['--help']] + [[s, '--help'] for s in STAGES] + [['run', '--help']]:\n"
        "    res = r.invoke(app, args)\n"
        "    assert res.exit_code == 0, (args, res.output)\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
