"""weavelm's cache directory (converted tokenizers, tuned split tables)."""
from __future__ import annotations

import os
import pathlib


def cache_root() -> pathlib.Path:
    """`$WEAVELM_CACHE`, else `$XDG_CACHE_HOME/weavelm`, else ~/.cache/weavelm."""
    if os.environ.get("WEAVELM_CACHE"):
        return pathlib.Path(os.environ["WEAVELM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return pathlib.Path(xdg) / "weavelm" if xdg else pathlib.Path.home() / ".cache" / "weavelm"
