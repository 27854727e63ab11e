"""`d2d report`: one self-contained HTML page (figures embedded) plus the figures as PNG files.

Figures: the cost-quality curve from the calibration table (FFN and whole-model FLOPs, dense
and the chosen routing marked); per-layer expert usage at the chosen routing (layers x
experts); the distribution of the number of experts each token runs, per layer; per-layer
activation sparsity when the model was sparsified. Then the lineage: every stage's config and
metrics. Expert usage comes from the calibration record (measured at the chosen routing on the
calibration split); with `tau` (or for artifacts calibrated before it was recorded) the model
is run on `data` to measure it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from d2d import __version__
from d2d.artifact import read_meta
from d2d.data import lm_windows, load_corpus
from d2d.errors import D2DError
from d2d.inspect import describe_folder
from d2d.io import atomic_dir
from d2d.lineage import last_stage
from d2d.measure.evaluate import Evaluator
from d2d.nn.depth import depth_mode, mod_blocks, skip_kind, skip_text
from d2d.nn.policy import key_order
from d2d.nn.policy import label as policy_label
from d2d.options import parse_taus
from d2d.progress import Progress, null_progress
from d2d.stages import load_artifact
from d2d.stages.base import Table, agreement_text
from d2d.stages.calibrate import calibration_table
from d2d.stages.evaluation import chosen_policy

FIGURES = {
    "curve": "Cost-quality curve",
    "usage": "Expert usage per layer",
    "k_hist": "Experts executed per token",
    "sparsity": "FFN activation sparsity",
    "mod_map": "Mixture-of-Depths routing map",
    "mod_training": "Mixture-of-Depths training",
}
MAP_TOKENS = 96  # tokens shown in the routing map


def measure_routing_map(path: Path, meta: dict, data: str | None) -> dict:
    """Which tokens each routed block processes, under top-k and under the causal decision,
    for the first window of the held-out split (the window length the routers trained on)."""

    cfg = last_stage(meta, "mod")["config"]
    data = data or cfg.get("data")
    art = load_artifact(path)
    corpus = load_corpus(data).split("heldout", cfg.get("seed", 0))
    ids = lm_windows(art.tokenizer, corpus, cfg.get("seq_len", 256), 1)
    maps = {}
    for mode in ("topk", "causal"):
        with depth_mode(art.model, mode), torch.no_grad():
            art.model(input_ids=ids)
        maps[mode] = {
            str(i): b.last_choice[0, :MAP_TOKENS].int().tolist()
            for i, b in mod_blocks(art.model).items()
        }
    tokens = [art.tokenizer.decode([t]) for t in ids[0, :MAP_TOKENS].tolist()]
    skip, keep_kv = skip_kind(art.model)
    return {
        "tokens": tokens,
        "maps": maps,
        "data": data,
        "window": int(ids.shape[1]),
        "skip": skip,
        "keep_kv": keep_kv,
    }


def routing_map_figure(rmap: dict) -> bytes:
    import numpy as np

    plt = _plt()
    tokens = [t.replace("\n", "\\n").replace("$", r"\$") or " " for t in rmap["tokens"]]
    modes = [("topk", "top-k (training, evaluation)"), ("causal", "causal decision (generation)")]
    layers = sorted(rmap["maps"]["topk"], key=int)
    fig, axes = plt.subplots(
        2, 1, figsize=(max(8, 0.13 * len(tokens) + 2), 0.5 * len(layers) + 2.4), sharex=True
    )
    for ax, (mode, title) in zip(axes, modes, strict=True):
        mat = np.array([rmap["maps"][mode][i] for i in layers], dtype=float)
        ax.imshow(mat, aspect="auto", cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_ylabel("routed block")
        share = mat.mean() if mat.size else 0.0
        ax.set_title(f"{title}: {100 * share:.0f}% of these tokens processed", fontsize=9)
    axes[-1].set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
    what = skip_text(rmap.get("skip", "block"), rmap.get("keep_kv", False))
    axes[-1].set_xlabel(f"token (dark: the block processes it; white: it skips {what})")
    return _png(fig)


def mod_training_figure(metrics: dict) -> bytes:
    plt = _plt()
    evals = [e for e in metrics.get("evals", []) if "topk" in e]
    steps = [e.get("step", j) for j, e in enumerate(evals)]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for mode, label in (("topk", "top-k"), ("causal", "causal decision")):
        ax.plot(steps, [e[mode]["perplexity"] for e in evals], marker="o", label=label)
    if metrics.get("dense_perplexity"):
        ax.axhline(metrics["dense_perplexity"], color="grey", ls="--", label="dense, before")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _png(fig)


def measure_usage(
    path: Path,
    meta: dict,
    tau: float | None,
    data: str | None,
    tokens: int,
    progress: Progress = null_progress,
) -> dict:
    """Run the artifact on the calibration split and count which experts each token runs."""

    cal, routers = last_stage(meta, "calibrate"), last_stage(meta, "train-routers")
    if routers is None:
        raise D2DError("expert usage needs routers: run d2d train-routers (and calibrate) first")
    src = (cal or routers)["config"]
    data = data or src.get("data")
    if not data:
        raise D2DError("no data recorded in the lineage to measure expert usage: pass --data")
    art = load_artifact(path)
    policy = chosen_policy(art, tau)  # eval's choice: --tau, else the calibrated routing
    ev = Evaluator(
        art.model,
        art.tokenizer,
        data=data,
        split="calib",
        seq_len=src.get("seq_len", 256),
        tokens=tokens,
        seed=src.get("seed", 0),
        doc_split=src.get("doc_split", "auto"),
    )
    m = ev.measure(art.model, policy, progress, "measuring expert usage")
    return {
        "usage": m.usage,
        "k_hist": m.k_hist,
        "tokens": ev.tokens,
        "policy": policy,
        "data": data,
        "ffn_fraction": m.ffn_fraction,
        "quality": m.quality,
        "metric": ev.metric,
    }


# ---------------------------------------------------------------- figures (matplotlib, Agg)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _series_label(rule: str) -> str:
    return {"global-tau": "global tau (dynamic-k)"}.get(rule, rule.replace("-", " "))


def curve_figure(cal: dict) -> bytes:
    plt = _plt()
    rows, metric = cal["rows"], cal["metric"]
    chosen = rows[cal["choice"]] if cal.get("choice") is not None else None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    rules = [r for r in dict.fromkeys(r["rule"] for r in rows) if r != "dense"]
    for ax, key, xlabel in (
        (axes[0], "ffn_fraction", "FFN FLOPs (fraction of dense)"),
        (axes[1], "model_fraction", "whole-model FLOPs (fraction of dense)"),
    ):
        for rule in rules:
            pts = sorted((r[key], r["quality"]) for r in rows if r["rule"] == rule)
            ax.plot(*zip(*pts, strict=True), marker="o", ms=4, lw=1.4, label=_series_label(rule))
        ax.axhline(cal["dense_quality"], color="0.4", ls=":", lw=1)
        ax.plot(1.0, cal["dense_quality"], marker="*", ms=14, color="black", ls="", label="dense")
        if chosen is not None:
            ax.plot(
                chosen[key], chosen["quality"], marker="o", ms=15, mfc="none", mec="red", mew=2,
                ls="", label="chosen",
            )  # fmt: skip
            ax.annotate(
                f"chosen: {chosen[key]:.0%}",
                (chosen[key], chosen["quality"]),
                textcoords="offset points",
                xytext=(10, -16),
                color="red",
            )
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
    qs = [r["quality"] for r in rows]
    if metric == "perplexity" and min(qs) > 0 and max(qs) / min(qs) > 3:
        axes[0].set_yscale("log")
        top = 30 * cal["dense_quality"]  # the region a user would choose from
        off = sum(q > top for q in qs)
        if off:
            axes[0].set_ylim(0.9 * min(qs), top)
            axes[0].text(
                0.02, 0.97, f"{off} point(s) above 30x dense perplexity not shown",
                transform=axes[0].transAxes, va="top", fontsize=8, color="0.3",
            )  # fmt: skip
    axes[0].set_ylabel(f"{metric} ({'lower' if metric == 'perplexity' else 'higher'} is better)")
    axes[1].legend(loc="best", fontsize=8)
    fig.suptitle(f"Calibration split, {cal['tokens']} tokens")
    return _png(fig)


def _rows(rows: list):
    """A [layers, width] matrix of per-layer lists; shorter rows (converted attention
    projections have their own expert counts) padded with NaN, drawn blank."""
    import numpy as np

    width = max((len(r) for r in rows), default=0)
    return np.array([list(map(float, r)) + [np.nan] * (width - len(r)) for r in rows])


def usage_figure(usage: dict, k_hist: dict) -> bytes:
    import numpy as np

    plt = _plt()
    layers = sorted(usage, key=key_order)
    mat = _rows([usage[i] for i in layers])
    tokens = np.array([[sum(k_hist[i])] for i in layers], dtype=float)  # tokens per layer
    frac = mat / np.maximum(tokens, 1)
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(layers) + 1.6))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="fraction of tokens that ran it", pad=0.01)
    return _png(fig)


def k_hist_figure(k_hist: dict) -> bytes:
    import numpy as np

    plt = _plt()
    layers = sorted(k_hist, key=key_order)
    mat = _rows([k_hist[i] for i in layers])
    dist = mat / np.maximum(np.nansum(mat, axis=1, keepdims=True), 1)
    ks = np.arange(mat.shape[1])
    mean = np.nansum(dist * ks, axis=1)
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(layers) + 1.6))
    im = ax.imshow(dist, aspect="auto", cmap="magma", interpolation="nearest")
    ax.plot(mean, range(len(layers)), "o", color="cyan", ms=5, label="mean")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel(f"experts executed per token (of {mat.shape[1] - 1})")
    ax.set_ylabel("layer")
    ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(im, ax=ax, label="fraction of tokens", pad=0.01)
    return _png(fig)


def sparsity_figure(metrics: dict) -> bytes:
    import numpy as np

    plt = _plt()
    b, a = metrics["sparsity_before"]["layers"], metrics["sparsity_after"]["layers"]
    layers = sorted(b, key=int)
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(11, 3.4))
    for off, src, label in ((-0.2, b, "before"), (0.2, a, "after")):
        ax.bar(x + off, [src[i]["zero"] for i in layers], width=0.4, label=f"zeros {label}")
        ax.plot(x + off, [src[i]["near_zero"] for i in layers], "k_", ms=10)
    ax.plot([], [], "k_", ms=10, label="|a| < 1% of token max")
    ax.set_xticks(x, layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of FFN activations")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncols=3, loc="lower right")
    return _png(fig)


# ---------------------------------------------------------------- the page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1180px;color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #dde}
.sub{color:#667}.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1.2rem 0}
.card{background:#f4f6fb;border-radius:8px;padding:.8rem 1.1rem;min-width:10rem}
.card b{display:block;font-size:1.4rem}.card span{color:#556;font-size:.85rem}
figure{margin:1rem 0} figure img{max-width:100%;border:1px solid #e3e6ee;border-radius:6px}
figcaption{color:#556;font-size:.9rem;margin-top:.3rem}
table{border-collapse:collapse;font-size:.88rem} td,th{padding:.25rem .6rem;text-align:right}
th{background:#f0f2f7} tr:nth-child(even) td{background:#fafbfd} td.l,th.l{text-align:left}
tr.chosen td{background:#e3f6e6;font-weight:600}
details{margin:.4rem 0} summary{cursor:pointer}
pre{background:#f7f7fa;padding:.7rem;overflow:auto;max-height:26rem;font-size:.8rem}
.note{color:#8a5a00}
"""

# marks the page once every figure has decoded, so a headless browser can check it rendered
_JS = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.figure'), ok = 0;
  imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0) ok++; });
  document.body.setAttribute('data-figures', imgs.length);
  document.body.setAttribute('data-figures-rendered', ok);
});
"""


def _e(x) -> str:
    return html.escape(str(x))


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


def _policy_text(p: dict | None) -> str:
    text = policy_label(p)
    return "global " + text if text.startswith("tau") else text


def html_table(t: Table) -> str:
    """A stage view's table as HTML (the terminal draws the same table with rich)."""

    def cls(col: str) -> str:
        return " class=l" if col in t.left else ""

    head = "".join(f"<th{cls(c)}>{_e(c)}</th>" for c in t.columns)
    body = []
    for cells, style in zip(t.rows, t.styles, strict=True):
        tr = ' class="chosen"' if style == "chosen" else ""
        body.append(
            f"<tr{tr}>"
            + "".join(f"<td{cls(c)}>{_e(v)}</td>" for c, v in zip(t.columns, cells, strict=True))
            + "</tr>"
        )
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _lineage(meta: dict, summary: dict) -> str:
    parts = []
    for i, (s, d) in enumerate(zip(meta["stages"], summary["stages"], strict=True)):
        metrics = {k: v for k, v in (s.get("metrics") or {}).items() if k != "history"}
        parts.append(
            f"<details{' open' if i == len(meta['stages']) - 1 else ''}><summary><b>{i}. "
            f"{_e(s['stage'])}</b> &middot; {_e(d.get('summary') or '')} &middot; "
            f"{_e(s.get('seconds', '?'))} s, peak {_e(s.get('peak_rss_mb', '?'))} MB &middot; "
            f"from {_e(s.get('parent', ''))}</summary>"
            f"<p>config</p><pre>{_e(json.dumps(s.get('config'), indent=1))}</pre>"
            f"<p>metrics</p><pre>{_e(json.dumps(metrics, indent=1))}</pre></details>"
        )
    return "".join(parts)


def _title(key: str) -> str:
    """A figure's heading; figures measured at one of several taus say which."""
    base, _, tau = key.partition("-tau")
    return FIGURES[base] + (f" (tau {tau})" if tau else "")


def _page(summary: dict, meta: dict, figs: dict, captions: dict, notes: list[str]) -> str:
    cal = meta.get("calibration")
    cards = []
    if cal and cal.get("choice") is not None:
        ch = cal["rows"][cal["choice"]]
        cards += [
            ("routing", _policy_text(meta.get("routing"))),
            ("FFN FLOPs", _pct(ch["ffn_fraction"])),
            ("model FLOPs", _pct(ch["model_fraction"])),
            (cal["metric"], f"{ch['quality']:.4g} (dense {cal['dense_quality']:.4g})"),
        ]
    mod = last_stage(meta, "mod")
    if mod and mod.get("metrics"):
        mm, mst = mod["metrics"], mod.get("structure") or {}
        cards += [
            ("MoD capacity", f"{mm['capacity']:g} on {len(mm['routed_layers'])} blocks"),
            ("MoD skips", skip_text(mst.get("skip", "block"), mst.get("keep_kv", False))),
            ("perplexity, causal", f"{mm['causal']['perplexity']:.4g}"),
            ("perplexity, top-k", f"{mm['topk']['perplexity']:.4g}"),
        ]
        for row in (mm["topk"], mm["causal"]):
            if agreement_text(row):
                cards.append(("causal decision agrees with", agreement_text(row)))
    moe = summary.get("moe")
    if moe:
        cards.append(("experts", f"{len(moe['layers'] or [])} layers x {moe['n_experts']}"))
    cards.append(("size on disk", f"{summary['size_bytes'] / 2**20:.1f} MB"))
    m = summary["model"]
    figures = "".join(
        f'<h2>{_e(_title(k))}</h2><figure><img class="figure" alt="{_e(_title(k))}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{_e(captions[k])}</figcaption></figure>"
        for k, png in figs.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>d2d report: {_e(summary["path"])}</title><style>{_CSS}</style></head>
<body>
<h1>d2d report</h1>
<div class="sub">{_e(summary["path"])} &middot; {_e(m["architecture"])}, {_e(m["layers"])}
layers, hidden {_e(m["hidden"])}, FFN {_e(m["ffn"])} &middot; base
{_e(summary["base"].get("source"))} &middot; generated
{datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")} by d2d {_e(__version__)}</div>
<div class="cards">{
        "".join(f"<div class=card><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in cards)
    }</div>
{"".join(f'<p class="note">{_e(n)}</p>' for n in notes)}
{figures}
{"<h2>Calibration table</h2>" + html_table(calibration_table(cal)) if cal else ""}
<h2>Lineage</h2>{_lineage(meta, summary)}
<script>{_JS}</script>
</body></html>
"""


def build_report(
    path: str | Path,
    out: str | Path,
    overwrite: bool = False,
    tau: float | str | None = None,
    data: str | None = None,
    tokens: int = 16384,
    progress: Progress = null_progress,
) -> dict:
    """Write OUT/index.html, OUT/<figure>.png and OUT/report.json; returns what was written.
    `tau`: one global tau or a comma list; expert usage is then measured at each."""
    path = Path(path)
    taus = parse_taus(tau) if tau is not None and str(tau).strip() else None
    if tokens < 1:
        raise D2DError(f"tokens must be >= 1, got {tokens}")
    summary = describe_folder(path)
    if not summary["artifact"]:
        raise D2DError(f"{path} is not a d2d artifact (no d2d.json): run a d2d stage on it first")
    out = Path(out)
    if out.exists() and not overwrite:
        raise D2DError(f"output {out} already exists: choose another --out or pass --overwrite")
    if out.resolve() == path.resolve() or path.resolve() in out.resolve().parents:
        raise D2DError(f"--out {out} is inside the artifact: write the report elsewhere")
    meta = read_meta(path)
    cal = meta.get("calibration")
    figs, captions, notes, usage = {}, {}, [], None
    if cal and cal.get("rows"):
        figs["curve"] = curve_figure(cal)
        captions["curve"] = (
            f"Quality ({cal['metric']}) against the FLOPs fraction of the dense model for every "
            "routing rule measured by calibrate; the star is the dense model, the red ring the "
            "chosen operating point."
        )
    elif last_stage(meta, "convert"):
        notes.append("No calibration yet: run d2d calibrate for the cost-quality curve.")
    usages = []  # (figure-name suffix, usage)
    if taus is None and cal and cal.get("usage"):
        usages.append(
            (
                "",
                {
                    "usage": cal["usage"],
                    "k_hist": cal["k_hist"],
                    "tokens": cal["tokens"],
                    "policy": meta.get("routing"),
                    "data": cal["config"].get("data"),
                },
            )
        )
    elif taus is not None:
        for t in taus:
            suffix = "" if len(taus) == 1 else f"-tau{t:g}"
            usages.append((suffix, measure_usage(path, meta, t, data, tokens, progress)))
    elif cal and last_stage(meta, "train-routers"):
        usages.append(("", measure_usage(path, meta, None, data, tokens, progress)))
    elif last_stage(meta, "convert"):
        notes.append("No routing chosen yet: run d2d train-routers and calibrate for expert usage.")
    for suffix, u in usages:
        where = f"{u['tokens']} tokens of the calibration split of {u['data']}"
        pol = _policy_text(u["policy"])
        figs["usage" + suffix] = usage_figure(u["usage"], u["k_hist"])
        captions["usage" + suffix] = (
            f"Fraction of tokens that ran each expert, at {pol}, on {where}."
        )
        figs["k_hist" + suffix] = k_hist_figure(u["k_hist"])
        captions["k_hist" + suffix] = (
            f"Per layer, the distribution of the number of experts a token ran (dynamic-k), "
            f"at {pol}, on {where}; dots mark the mean."
        )
    usage = usages[0][1] if len(usages) == 1 else [u for _, u in usages] or None
    sp = last_stage(meta, "sparsify")
    if sp and (sp.get("metrics") or {}).get("sparsity_after"):
        figs["sparsity"] = sparsity_figure(sp["metrics"])
        captions["sparsity"] = (
            "Per layer, the fraction of FFN activations that are exactly zero (bars) and below "
            "1% of the token's largest (marks), on held-out tokens, before and after sparsify."
        )
    mod = last_stage(meta, "mod")
    rmap = None
    if mod:
        rmap = measure_routing_map(path, meta, data)
        figs["mod_map"] = routing_map_figure(rmap)
        captions["mod_map"] = (
            f"The first {len(rmap['tokens'])} tokens of a {rmap['window']}-token held-out window "
            f"of {rmap['data']}: which tokens each routed block processes at capacity "
            f"{mod['structure']['capacity']:g}, under top-k (which sees the whole window) and "
            "under the causal decision generation uses."
        )
        if any("topk" in e for e in (mod.get("metrics") or {}).get("evals", [])):
            figs["mod_training"] = mod_training_figure(mod["metrics"])
            captions["mod_training"] = (
                "Held-out perplexity during the retrofit (capacity anneals from 1.0), under "
                "top-k routing and under the causal decision; dashed: the model before."
            )
    page = _page(summary, meta, figs, captions, notes)
    with atomic_dir(out, overwrite) as tmp:
        for k, png in figs.items():
            (tmp / f"{k}.png").write_bytes(png)
        (tmp / "index.html").write_text(page)
        record = {
            "artifact": str(path),
            "figures": list(figs),
            "notes": notes,
            "usage": usage,
            "routing_map": rmap,
        }
        (tmp / "report.json").write_text(json.dumps(record, indent=1) + "\n")
    return {"out": str(out), "figures": list(figs), "notes": notes}
