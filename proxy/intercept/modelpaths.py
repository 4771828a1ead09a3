"""Where registered models' files may be (model_roots), and what they hash to (the SHA-256 a
catalog shared by many proxies keeps, so that each proxy checks it loads the files registered)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from inference.model_dir import ModelFiles


def files_sha256(files: ModelFiles) -> str:
    """The SHA-256 of a model's files: every file of the ONNX graph's directory (its external data and
    configuration, whatever their names), by name, and the tokenizer where it lies elsewhere."""
    directory = files.onnx_path.parent
    paths = sorted(path for path in directory.iterdir() if path.is_file())
    if files.tokenizer_path.parent != directory:
        paths.append(files.tokenizer_path)
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as data:
            while chunk := data.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def default_model_roots(data_dir: Path) -> tuple[Path, ...]:
    """Where model_register may read models when no roots are configured."""
    return (data_dir / "models",)


def parse_model_roots(value: str, data_dir: Path) -> tuple[Path, ...]:
    if not value:
        return default_model_roots(data_dir)
    return tuple(Path(p).expanduser() for p in value.split(os.pathsep) if p)
