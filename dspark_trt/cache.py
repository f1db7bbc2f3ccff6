"""The one per-user cache directory for everything dspark-trt derives and keeps between runs (converted
tokenizers, default engines, cost tables, peer models, the drafter's training data): $DSPARK_TRT_CACHE, else
$XDG_CACHE_HOME/dspark-trt, else ~/.cache/dspark-trt."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache root, or the entry `parts` below it (not created here)."""
    root = os.environ.get("DSPARK_TRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "dspark-trt"
    return Path(root).joinpath(*parts)
