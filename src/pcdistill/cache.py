"""Where pcdistill keeps what it fetches or builds once: ``$PCDISTILL_CACHE`` (default ``~/.cache/pcdistill``)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("PCDISTILL_CACHE") or Path.home() / ".cache" / "pcdistill")
