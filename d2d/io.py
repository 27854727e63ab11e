"""Atomic writes: a folder or a file appears complete or not at all.

A stage writes into a temporary folder beside its target and renames it when complete; an
interrupted run leaves the input untouched and no half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from d2d.errors import D2DError


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `out`, on any failure it vanishes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise D2DError(f"output {out} already exists: choose another --out or pass --overwrite")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise D2DError(
            f"cannot write {out}: {blocker} is a file, not a folder; choose another --out"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the artifact is an ordinary folder
    except OSError as e:
        raise D2DError(f"cannot write to {out.parent} ({e.strerror}): use a writable --out") from e
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{int(time.time() * 1000)}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, D2DError):
            raise D2DError(
                f"could not write {out} ({e.strerror or e}): check the disk and "
                "permissions, then re-run"
            ) from e
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file through a temporary file in the same folder, then rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise D2DError(f"cannot write {path} ({e.strerror}): choose a writable path") from e
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; this is an ordinary file
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise D2DError(f"could not write {path} ({e.strerror or e}): check the disk") from e
        raise
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def json_default(o):
    if hasattr(o, "tolist"):  # tensors and arrays
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
