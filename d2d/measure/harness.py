"""EleutherAI's lm-evaluation-harness on a d2d model: the same tasks at the model's routing and
with every expert (every block), in one run, on the same model instance.

The harness's HF wrapper takes a model instance, so the loaded artifact is handed over as it
is; d2d sets the routing around each evaluation (the routing generation uses: causal rules and
Mixture-of-Depths' causal decision) and counts the FLOPs the routing spent on the harness's own
forward passes. Tasks come by name from the harness's registry (their data through `datasets`:
its cache or a network) or from task folders (`include`). d2d ships two local tasks built from
the bundled data, written on demand (`write_local_tasks`): a multiple-choice topic task on
held-out BBC News articles and a rolling-loglikelihood task on held-out Shakespeare text.
"""

from __future__ import annotations

import json
from pathlib import Path

from d2d.errors import D2DError

EXTRA = "pip install 'd2d[eval]'"
LOCAL_TASKS = ("d2d_bbc_topic", "d2d_shakespeare")
TOPIC_WORDS = 120  # words of an article the topic task shows
PASSAGE_CHARS = 1500  # characters of a Shakespeare passage


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise D2DError(
            f"--lm-eval needs EleutherAI's lm-evaluation-harness, which is not installed: {EXTRA}"
        ) from e
    return lm_eval, HFLM, TaskManager


def write_local_tasks(folder: str | Path, seed: int = 0) -> Path:
    """Write d2d's two local tasks (YAML + JSONL, absolute paths) under `folder`, from the
    held-out splits of the bundled data (the documents d2d never trains or calibrates on)."""
    from d2d.data import load_corpus

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bbc = load_corpus("bbc-news").split("heldout", seed)
    rows = [
        {"text": " ".join(t.split()[:TOPIC_WORDS]), "label": int(y)}
        for t, y in zip(bbc.texts, bbc.labels, strict=True)
    ]
    _jsonl(folder / "bbc_topic.jsonl", rows)
    choices = [n.replace("_", " ") for n in bbc.label_names]
    _yaml(
        folder / "d2d_bbc_topic.yaml",
        {
            "task": "d2d_bbc_topic",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / "bbc_topic.jsonl")}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "Article: {{text}}\nTopic:",
            "doc_to_choice": choices,
            "doc_to_target": "label",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        },
    )
    plays = load_corpus("shakespeare").split("heldout", seed)
    passages = []
    for text in plays.texts:
        paras, cur = [p.strip() for p in text.split("\n\n") if p.strip()], ""
        for p in paras:
            cur = f"{cur}\n\n{p}" if cur else p
            if len(cur) >= PASSAGE_CHARS:
                passages.append({"text": cur})
                cur = ""
    _jsonl(folder / "shakespeare.jsonl", passages)
    _yaml(
        folder / "d2d_shakespeare.yaml",
        {
            "task": "d2d_shakespeare",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / "shakespeare.jsonl")}},
            "test_split": "test",
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "word_perplexity"},
                {"metric": "byte_perplexity"},
                {"metric": "bits_per_byte"},
            ],
        },
    )
    return folder


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _yaml(path: Path, doc: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise D2DError("--lm-eval names no task: give task names separated by commas")
    return tasks


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    policies: dict[str, dict],
    include: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seq_len: int = 512,
    local_dir: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Evaluate `tasks` once per named routing policy ({"dense": ..., "d2d": ...}). Returns
    {"tasks": {task: {metric: {policy name: value}}}, "flops": {policy name: (ffn, model)},
    "versions": ...}."""
    import tempfile

    import torch

    from d2d.measure.flops import fractions
    from d2d.nn.depth import mod_stats
    from d2d.nn.routing import collecting, routing

    lm_eval, HFLM, TaskManager = _harness()
    if include and not Path(include).is_dir():
        raise D2DError(f"--lm-eval-include {include} is not a folder: point it at task YAMLs")
    paths = [include] if include else []
    if any(t in LOCAL_TASKS for t in tasks):
        local = Path(local_dir) if local_dir else Path(tempfile.mkdtemp(prefix="d2d-tasks-"))
        paths.append(str(write_local_tasks(local, seed)))
    manager = TaskManager(include_path=paths or None, verbosity="ERROR")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise D2DError(
            f"lm-evaluation-harness has no task {unknown[0]!r}: check the name (lm-eval ls "
            "tasks) or give its folder with --lm-eval-include"
        )
    # the token the harness puts before a rolling window's first token (a tokenizer without
    # BOS or EOS, such as BERT's, would give the harness none)
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id)
    prefix = next((t for t in (*ids, tokenizer.pad_token_id) if t is not None), None)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=seq_len,
        prefix_token_id=prefix,
    )
    out: dict = {"tasks": {}, "flops": {}, "n_samples": {}}
    for name, policy in policies.items():
        with (
            torch.no_grad(),
            routing(model, policy),
            collecting(model) as stats,
            mod_stats(model) as dstats,
        ):
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                verbosity="ERROR",
            )
            ffn, whole = fractions(model, seq_len, True, stats, dstats)
        out["flops"][name] = {"ffn_fraction": ffn, "model_fraction": whole}
        for task, metrics in res["results"].items():
            row = out["tasks"].setdefault(task, {})
            for key, value in metrics.items():
                metric = key.partition(",")[0]  # "acc,none": the metric, then its filter
                if metric == "sample_len":  # the documents evaluated, not a score
                    out["n_samples"][task] = int(value)
                    continue
                if metric == "alias" or metric.endswith("_stderr") or not _number(value):
                    continue
                row.setdefault(metric, {})[name] = float(value)
    out["versions"] = {"lm_eval": getattr(lm_eval, "__version__", "unknown")}
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
