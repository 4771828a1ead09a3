"""Where registered models' files may be (model_roots)."""

from __future__ import annotations

import os
from pathlib import Path


def default_model_roots(data_dir: Path) -> tuple[Path, ...]:
    """Where model_register may read models when no roots are configured."""
    return (data_dir / "models",)


def parse_model_roots(value: str, data_dir: Path) -> tuple[Path, ...]:
    if not value:
        return default_model_roots(data_dir)
    return tuple(Path(p).expanduser() for p in value.split(os.pathsep) if p)
