"""The fine-tuning loop shared by the stages that train (sparsify, and later ones).

Devices, mixed precision, gradient accumulation and data parallelism are Hugging Face
Accelerate's: the same code runs in one process or under `accelerate launch` / `torchrun` on
several processes or GPUs. What d2d adds:

- a deterministic data order: the examples of optimizer step s are a function of (seed, s), so
  a resumed run sees exactly the batches an uninterrupted run would, without loader state;
  each step's global batch is split into micro-batches (accumulation) and across processes;
- AdamW with a warm-up then cosine / linear / constant learning rate (transformers' schedules);
- periodic checkpoints (weights in safetensors, optimizer and RNG states loaded with
  torch.load(weights_only=True), so nothing is unpickled) and `resume`, refused when the
  checkpoint was written by a different configuration;
- evaluations on the main process every N steps and at the end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from d2d.device import device_type, use_bf16
from d2d.dist import is_main_process
from d2d.errors import D2DError
from d2d.io import atomic_dir
from d2d.options import LoopConfig
from d2d.progress import Progress, null_progress


class Task(Protocol):
    """What the loop trains: examples by index, a loss, and an evaluation."""

    n_examples: int

    def batch(self, indices: torch.Tensor) -> dict: ...

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]: ...

    def evaluate(self, model: nn.Module) -> dict: ...

    # Optional: `new_parameters() -> (params, lr)`, parameters the task added (routers) that
    # train at their own peak learning rate under the same schedule.


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # per optimizer step, averaged over ranks
    evals: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def step_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The global batch of optimizer step `step`: consecutive slots of a stream of seeded
    per-epoch permutations of range(n)."""
    start = step * batch_size
    parts, got = [], 0
    while got < batch_size:
        epoch, offset = divmod(start + got, n)
        part = _permutation(n, seed, epoch)[offset : offset + batch_size - got]
        parts.append(part)
        got += len(part)
    return torch.cat(parts)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def shard(indices: torch.Tensor, micro: int, grad_accum: int, rank: int, n_proc: int):
    """This process's share of micro-batch `micro` of a global batch."""
    per_micro = len(indices) // grad_accum
    part = indices[micro * per_micro : (micro + 1) * per_micro]
    return part[rank::n_proc]


def _fingerprint(cfg: LoopConfig, extra: dict) -> str:
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "checkpoint_dir")}
    blob = json.dumps({"loop": keep, "task": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def latest_checkpoint(folder: Path) -> Path | None:
    """The latest complete checkpoint in `folder` (None when there is none)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("step-*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, fp: str, result):
    target = folder / f"step-{step}"
    try:
        _write_checkpoint(target, model, optimizer, scheduler, fp, result, step)
    finally:  # an interrupt during the write or after it still leaves the latest one only
        with _signals_deferred():
            keep = latest_checkpoint(folder)
            for old in folder.glob("step-*"):
                if old != keep:
                    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _signals_deferred():
    """Ctrl-C and SIGTERM wait until the block ends (POSIX main thread; elsewhere nothing)."""
    import signal
    import threading

    mask = {signal.SIGINT, signal.SIGTERM}
    block = (
        hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    )
    before = signal.pthread_sigmask(signal.SIG_BLOCK, mask) if block else None
    try:
        yield
    finally:
        if block:  # the caller's mask again (signals it had blocked stay blocked)
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _write_checkpoint(target: Path, model, optimizer, scheduler, fp: str, result, step: int):
    from safetensors.torch import save_model

    with atomic_dir(target, overwrite=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.random.get_rng_state(),
            },
            tmp / "state.pt",
        )
        state = {"step": step, "fingerprint": fp, "history": result.history, "evals": result.evals}
        (tmp / "state.json").write_text(json.dumps(state))


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler, fp: str, result: TrainResult):
    from safetensors.torch import load_model

    state = json.loads((ckpt / "state.json").read_text())
    if state.get("fingerprint") != fp:
        raise D2DError(
            f"checkpoint {ckpt} was written by a different configuration: resume with the "
            "same options, or delete the checkpoint folder to start again"
        )
    load_model(model, str(ckpt / "model.safetensors"))
    blob = torch.load(ckpt / "state.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.random.set_rng_state(blob["rng"])
    result.history, result.evals = state["history"], state["evals"]
    result.resumed_from = state["step"]
    return state["step"]


def _accelerator(cfg: LoopConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps its settings in a process-wide singleton; each training run sets its own
    # mixed precision (the process group, if any, is kept)
    AcceleratorState._reset_state()
    bf16 = use_bf16(cfg.bf16, device_type())
    return Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=device_type() == "cpu",
    )


def train(
    model: nn.Module,
    task: Task,
    cfg: LoopConfig,
    progress: Progress = null_progress,
    fingerprint: dict | None = None,
    label: str = "training",
) -> TrainResult:
    """Fine-tune `model` in place. `fingerprint`: what else defines the run (for resume)."""
    from transformers import get_scheduler
    from transformers.trainer_utils import set_seed

    acc = _accelerator(cfg)
    rank, n_proc = acc.process_index, acc.num_processes
    per_step = cfg.batch_size // cfg.grad_accum
    if per_step % n_proc:
        raise D2DError(
            f"batch-size / grad-accum = {per_step} examples per micro-batch cannot be split "
            f"over {n_proc} processes: make it a multiple of {n_proc}"
        )
    if task.n_examples < 1:
        raise D2DError("the training data holds no examples")
    set_seed(cfg.seed)
    fp = _fingerprint(cfg, fingerprint or {})
    new, new_lr = task.new_parameters() if hasattr(task, "new_parameters") else ([], cfg.lr)
    new_ids = {id(p) for p in new}
    own = [p for p in model.parameters() if p.requires_grad and id(p) not in new_ids]
    groups = [
        {"params": [p for p in own if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in own if p.dim() < 2]},
    ]
    if new:
        groups.append({"params": [p for p in new if p.requires_grad], "lr": new_lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.decay]
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup * cfg.steps),
        num_training_steps=cfg.steps,
    )
    result = TrainResult()
    start = 0
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if cfg.resume:
        latest = latest_checkpoint(ckpt_dir) if ckpt_dir else None
        if latest is None:
            raise D2DError(
                f"--resume found no checkpoint in {ckpt_dir}: run without --resume to start"
            )
        start = _load_checkpoint(latest, model, optimizer, scheduler, fp, result)
    # the scheduler is stepped by hand once per optimizer step: Accelerate's wrapper would
    # step it once per process
    wrapped, optimizer = acc.prepare(model, optimizer)
    main = acc.is_main_process
    model.train()
    try:
        for step in range(start, cfg.steps):
            indices = step_indices(step, cfg.batch_size, task.n_examples, cfg.seed)
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = task.batch(shard(indices, micro, cfg.grad_accum, rank, n_proc))
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.accumulate(wrapped):
                    loss, logs = task.loss(wrapped, batch, step)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.clip > 0:
                        logs["grad_norm"] = float(
                            acc.clip_grad_norm_(wrapped.parameters(), cfg.clip)
                        )
                    optimizer.step()
                    optimizer.zero_grad()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / (
                        1 if k == "grad_norm" else cfg.grad_accum
                    )
            scheduler.step()
            keys = sorted(sums)
            vals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=acc.device)
            if n_proc > 1:
                vals = acc.reduce(vals, reduction="mean")
            row = {"step": step + 1, "lr": scheduler.get_last_lr()[0]}
            row.update({k: float(v) for k, v in zip(keys, vals.tolist(), strict=True)})
            result.history.append(row)
            if main:
                shown = {k: row[k] for k in ("loss", "penalty", "sparsity") if k in row}
                progress(label, step + 1, cfg.steps, **shown)
            last = step + 1 == cfg.steps
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
                _evaluate(acc, task, wrapped, step + 1, result)
            if ckpt_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                if main and not last:
                    _save_checkpoint(
                        ckpt_dir,
                        step + 1,
                        acc.unwrap_model(wrapped),
                        optimizer.optimizer,
                        scheduler,
                        fp,
                        result,
                    )
                acc.wait_for_everyone()
        _evaluate(acc, task, wrapped, cfg.steps, result)
    finally:
        acc.unwrap_model(wrapped, keep_fp32_wrapper=False)  # undo the autocast forward patch
        model.eval()
        acc.free_memory()
    return result


def _evaluate(acc, task: Task, wrapped, step: int, result: TrainResult) -> None:
    if acc.is_main_process:
        model = acc.unwrap_model(wrapped)
        model.eval()
        with torch.no_grad():
            result.evals.append({"step": step, **task.evaluate(model)})
        model.train()
    acc.wait_for_everyone()


def train_stage(model, task, cfg, source: str, out, progress: Progress, label: str):
    """A training stage's run of the loop: its config (TrainFields) gives the loop's settings
    and, with the base model's `source`, the run's fingerprint for --resume; the checkpoints
    go once the run is complete. Returns the TrainResult."""
    loop = cfg.loop(out)
    fingerprint = {k: v for k, v in vars(cfg).items() if k != "resume"}
    fingerprint["source"] = source
    result = train(model, task, loop, progress, fingerprint, label=label)
    remove_checkpoints(loop.checkpoint_dir)
    return result


def cached_loop(cfg, n_examples: int, clip: float = 0.0) -> LoopConfig:
    """Loop settings for fitting small modules on cached activations (routers, projection
    MLPs): `cfg`'s steps, batch size (at most the examples), lr and seed; fp32, no warm-up,
    cosine decay."""
    return LoopConfig(
        steps=cfg.steps,
        batch_size=min(cfg.batch_size, n_examples),
        lr=cfg.lr,
        warmup=0.0,
        decay="cosine",
        clip=clip,
        seed=cfg.seed,
        bf16=False,
    )


def distill_kl(student, teacher, mask=None):
    """KL(teacher || student) between the softmax distributions of two logit tensors
    [..., V], summed over the vocabulary and averaged over positions (the real ones, where
    `mask` [...] is given). The teacher carries no gradient."""
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.detach().float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode: the teacher of a distillation."""
    import copy

    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_kl(teacher: nn.Module, student_logits, inputs: dict, mask=None):
    """distill_kl of `student_logits` against the teacher's logits on the same `inputs`
    (model keyword arguments; a `labels` entry is not passed to the teacher)."""
    with torch.no_grad():
        target = teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    return distill_kl(student_logits, target, mask)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Causal LM cross-entropy: position t's logits against token t + 1."""
    lg = logits[:, :-1]
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), ids[:, 1:].reshape(-1))


def remove_checkpoints(folder: str | Path | None) -> None:
    if folder and Path(folder).is_dir() and is_main_process():
        shutil.rmtree(folder, ignore_errors=True)
