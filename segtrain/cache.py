"""Where segtrain keeps what it can rebuild: data-audit results."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SEGTRAIN_CACHE_DIR``, default ``~/.cache/segtrain``; users' data folders are never written to."""
    return Path(os.environ.get("SEGTRAIN_CACHE_DIR") or Path.home() / ".cache" / "segtrain")
