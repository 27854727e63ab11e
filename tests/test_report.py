"""d2d inspect and d2d report: what they read, what they write, and that the page renders."""

import json
import re
import shutil
import subprocess

import pytest
from d2d_cli.main import app
from tiny import tree_bytes
from typer.testing import CliRunner

from d2d.errors import D2DError
from d2d.inspect import describe_folder as describe
from d2d.report import build_report

runner = CliRunner()


def test_describe_reads_lineage_structure_and_weights(calibrated):
    from d2d import load_artifact

    d = describe(calibrated["calibrate"])
    assert d["artifact"] and [s["stage"] for s in d["stages"]] == [
        "sparsify",
        "convert",
        "train-routers",
        "calibrate",
    ]
    assert d["moe"]["n_experts"] == 8 and d["moe"]["routers"]["hidden"] == 8
    assert d["routing"]["rule"] == "tau" and d["calibration"]["rows"][0]["rule"] == "dense"
    art = load_artifact(calibrated["calibrate"])
    sd = art.model.state_dict()
    # the header counts each stored tensor once (tied embeddings are stored once)
    stored = {k: v for k, v in sd.items() if k != "lm_head.weight" or "lm_head.weight" in sd}
    assert d["weights"]["parameters"] <= sum(v.numel() for v in stored.values())
    routers = sum(v.numel() for k, v in sd.items() if ".router." in k)
    assert d["weights"]["routers_parameters"] == routers > 0
    assert d["size_bytes"] > d["weights"]["file_bytes"] > 0


def test_describe_a_plain_model_folder(model_dirs):
    d = describe(model_dirs["bert"])
    assert not d["artifact"] and d["model"]["model_type"] == "bert" and "stages" not in d


def test_inspect_cli_prints_the_summary(calibrated, tmp_path):
    res = runner.invoke(
        app,
        ["inspect", str(calibrated["calibrate"]), "--json", str(tmp_path / "i.json")],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    for text in ("d2d artifact", "lineage", "train-routers", "8 experts", "routing: tau"):
        assert text in res.output, text
    assert json.loads((tmp_path / "i.json").read_text())["moe"]["n_experts"] == 8


def test_calibrate_records_usage_at_the_choice(calibrated):
    meta = json.loads((calibrated["calibrate"] / "d2d.json").read_text())
    cal = meta["calibration"]
    for layer, hist in cal["k_hist"].items():
        # every real token counted once, and usage sums to the experts the tokens ran
        assert sum(hist) == cal["tokens"]
        assert sum(cal["usage"][layer]) == sum(k * n for k, n in enumerate(hist))
    chosen = cal["rows"][cal["choice"]]
    executed = sum(sum(u) for u in cal["usage"].values())
    assert executed / (cal["tokens"] * 8 * len(cal["usage"])) == pytest.approx(
        sum(chosen["layer_fractions"].values()) / len(chosen["layer_fractions"])
    )


def test_report_is_one_self_contained_page(calibrated, tmp_path):
    before = tree_bytes(calibrated["calibrate"])
    rec = build_report(calibrated["calibrate"], tmp_path / "rep")
    assert rec["figures"] == ["curve", "usage", "k_hist", "sparsity"]
    page = (tmp_path / "rep" / "index.html").read_text()
    for f in rec["figures"]:
        assert (tmp_path / "rep" / f"{f}.png").read_bytes()[:4] == b"\x89PNG"
    srcs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "Lineage" in page and "train-routers" in page and "Calibration table" in page
    usage = json.loads((tmp_path / "rep" / "report.json").read_text())["usage"]
    assert (
        usage["tokens"]
        == json.loads((calibrated["calibrate"] / "d2d.json").read_text())["calibration"]["tokens"]
    )  # taken from the calibration record: no data needed
    assert tree_bytes(calibrated["calibrate"]) == before


def test_report_at_another_tau_measures_usage(calibrated, tmp_path):
    build_report(calibrated["calibrate"], tmp_path / "rep", tau=1.0, tokens=128)
    usage = json.loads((tmp_path / "rep" / "report.json").read_text())["usage"]
    assert usage["policy"]["tau"] == 1.0
    for hist in usage["k_hist"].values():  # tau 1: the top expert (ties and the sink aside)
        assert hist[0] == 0 and sum(hist) == usage["tokens"]
        assert sum(k * n for k, n in enumerate(hist)) / sum(hist) < 2


def test_report_before_calibration_says_what_is_missing(calibrated, tmp_path):
    rec = build_report(calibrated["convert"], tmp_path / "rep")
    assert rec["figures"] == ["sparsity"]
    assert any("calibrate" in n for n in rec["notes"])


@pytest.mark.parametrize("case", ["plain", "exists", "inside", "tau"])
def test_report_bad_input(case, calibrated, model_dirs, tmp_path):
    art = calibrated["calibrate"]
    args = {
        "plain": [model_dirs["gated"], "--out", str(tmp_path / "r")],
        "exists": [str(art), "--out", str(tmp_path)],
        "inside": [str(art), "--out", str(art / "rep")],
        "tau": [str(art), "--out", str(tmp_path / "r"), "--tau", "2"],
    }[case]
    before = tree_bytes(art)
    res = runner.invoke(app, ["report", *args])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists() and not (art / "rep").exists()
    assert tree_bytes(art) == before
    with pytest.raises(D2DError):
        build_report(args[0], args[2], tau=2.0 if case == "tau" else None)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (scripts/setup.sh installs it)")
def test_report_renders_in_headless_chromium(calibrated, tmp_path):
    import numpy as np
    from PIL import Image

    build_report(calibrated["calibrate"], tmp_path / "rep")
    url = (tmp_path / "rep" / "index.html").as_uri()

    def chromium(*args):
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            text=True,
            timeout=120,
        )

    dom = chromium("--virtual-time-budget=5000", "--dump-dom").stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-figures="4"' in body and 'data-figures-rendered="4"' in body, body
    shot = tmp_path / "shot.png"
    chromium("--window-size=1280,2400", f"--screenshot={shot}")
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    inked = (img.min(axis=-1) < 200).mean()  # not a blank page
    colours = len(np.unique(img.reshape(-1, 3)[::7], axis=0))  # heatmaps and curves drawn
    assert inked > 0.05 and colours > 200, (inked, colours)
