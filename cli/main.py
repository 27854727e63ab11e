"""d2d command line: parse, build the stage config, call the library, print a summary.

Stage commands are generated from the stage registry: every field of a stage's config dataclass
becomes an option whose help text is the field's doc, so the CLI and recipes cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from d2d_cli.render import RichProgress, console, err_console, print_inspect, print_record

from d2d.dist import is_main_process
from d2d.errors import D2DError
from d2d.io import write_json_atomic
from d2d.stages import STAGES, make_config, run_stage

# d2d.recipe, d2d.inspect and d2d.report import torch: they are imported inside the commands
# that use them, so that `d2d --help` stays fast (tests/test_layers.py proves it)

app = typer.Typer(
    name="d2d",
    help="Turn dense transformer checkpoints into dynamic-compute (dynamic-k MoE) models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@contextmanager
def handled(debug: bool):
    """Library errors become one line on stderr and exit code 2; no traceback unless --debug.
    Ctrl-C exits 130 (128 + SIGINT) after the stage's atomic write has removed its temporary
    output; the yielded dict's "kept" names what deliberately stays (checkpoints)."""
    import signal

    def terminated(signum, frame):  # a scheduler's SIGTERM: clean up as for Ctrl-C
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread (an embedding application): leave it alone
        pass
    state = {"kept": ""}
    try:
        yield state
    except D2DError as e:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print(
            f"[bold red]interrupted:[/] no output was written{state['kept']}", highlight=False
        )
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # an unexpected failure: still one line, the traceback on request
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err_console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {msg} "
            "(re-run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _option_type(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return Optional[args[0]]  # noqa: UP045 - typer reads typing.Optional reliably
    return tp


def _stage_command(name: str):
    spec = STAGES[name]
    hints = typing.get_type_hints(spec.config_cls)

    def opt(name, annotation, default):
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
        )

    params = [
        opt(
            "input",
            str,
            typer.Argument(
                ..., help="Model: alias, HF folder, .gguf file, cached hub id, or a d2d artifact."
            ),
        )
    ]
    if spec.writes_artifact:
        params.append(
            opt("out", Path, typer.Option(..., "--out", "-o", help="Output artifact folder."))
        )
        params.append(
            opt(
                "overwrite",
                bool,
                typer.Option(False, "--overwrite", help="Replace --out if it exists."),
            )
        )
    else:
        params.append(
            opt(
                "json_out",
                Optional[Path],  # noqa: UP045
                typer.Option(None, "--json", help="Also write the report to this file."),
            )
        )
    for f in dataclasses.fields(spec.config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        decls = [flag] if hints[f.name] is not bool else [f"{flag}/--no-{flag[2:]}"]
        if "flag" in f.metadata:  # a primary spelling; the field's own name stays an alias
            decls.insert(0, "--" + f.metadata["flag"])
        params.append(
            opt(
                f.name,
                _option_type(hints[f.name]),
                typer.Option(default, *decls, help=f.metadata.get("help", "")),
            )
        )
    params.append(
        opt(
            "trust_remote_code",
            bool,
            typer.Option(
                False,
                "--trust-remote-code",
                help="Let a model folder run its own Python code (auto_map). Off by default.",
            ),
        )
    )
    params.append(opt("debug", bool, typer.Option(False, "--debug", help="Show tracebacks.")))

    def command(**kw):
        debug = kw.pop("debug")
        trust = kw.pop("trust_remote_code")
        inp = kw.pop("input")
        out = kw.pop("out", None)
        overwrite = kw.pop("overwrite", False)
        json_out = kw.pop("json_out", None)
        with handled(debug) as state:
            cfg = make_config(name, kw)
            if out is not None and getattr(cfg, "checkpoint_every", 0):
                folder = cfg.checkpoints(out)
                state["kept"] = f" (checkpoints in {folder} are kept: re-run with --resume)"
            if not is_main_process():  # under a multi-process launcher, one process reports
                run_stage(name, inp, cfg, out, overwrite, trust_remote_code=trust)
                return
            with RichProgress() as progress:
                record = run_stage(name, inp, cfg, out, overwrite, progress, trust)
            if json_out is not None:
                write_json_atomic(json_out, record)
            print_record(name, record, out)

    command.__signature__ = inspect.Signature(params)
    command.__name__ = name.replace("-", "_")
    command.__doc__ = spec.help
    return command


def _register():
    for name in STAGES:
        app.command(name)(_stage_command(name))


_register()


@app.command("run")
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[list[str]] = typer.Argument(  # noqa: UP045
        None, help="Overrides: key=value or stage.key=value."
    ),
    force: bool = typer.Option(False, "--force", help="Redo stages whose output exists."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
):
    """Run a recipe's stages in order."""
    from d2d.recipe import run_recipe

    with handled(debug) as state, RichProgress() as progress:
        state["kept"] = " by the interrupted stage (finished stages are kept: re-run to go on)"

        def on_stage(name, rec):
            progress.pause()
            if rec.get("skipped"):
                console.print(f"[dim]{name}: {rec['out']} is up to date, skipped[/]")
            elif name == "report":
                console.print(f"report: {Path(rec['out']) / 'index.html'}", highlight=False)
            else:
                print_record(name, rec, rec.get("out"))
            progress.resume()

        run_recipe(recipe, overrides or [], force, progress, on_stage)


@app.command("inspect")
def inspect_cmd(
    artifact: Path = typer.Argument(..., help="A d2d artifact (or an HF model folder)."),
    json_out: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--json", help="Also write the summary to this file."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
):
    """What an artifact is: base model, stages, experts, routers, routing, calibration, size."""
    from d2d.inspect import describe_folder

    with handled(debug):
        d = describe_folder(artifact)
        if json_out is not None:
            write_json_atomic(json_out, d)
        print_inspect(d)


@app.command("report")
def report_cmd(
    artifact: Path = typer.Argument(..., help="A d2d artifact."),
    out: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--out", "-o", help="Report folder (default: ARTIFACT-report beside it)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    tau: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--tau",
        "--taus",
        help="Show expert usage at this global tau (or at each of a comma list) instead of "
        "the chosen routing (--taus: the same).",
    ),
    data: Optional[str] = typer.Option(  # noqa: UP045
        None, "--data", help="Data to measure expert usage on (default: calibrate's)."
    ),
    tokens: int = typer.Option(16384, "--tokens", help="Tokens to measure expert usage on."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
):
    """An HTML page (one self-contained file) and PNG figures: cost-quality curve, expert
    usage, experts per token, sparsity, lineage."""
    from d2d.report import build_report

    out = out if out is not None else artifact.parent / f"{artifact.name}-report"
    with handled(debug), RichProgress() as progress:
        rec = build_report(artifact, out, overwrite, tau, data, tokens, progress)
    for n in rec["notes"]:
        console.print(f"[yellow]note:[/] {n}", highlight=False)
    console.print(
        f"report: {len(rec['figures'])} figures ({', '.join(rec['figures'])}) -> "
        f"{Path(rec['out']) / 'index.html'}",
        highlight=False,
    )


def main():  # pragma: no cover - console entry point
    sys.exit(app())
