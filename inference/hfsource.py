"""Read a Hugging Face model directory (config.json, model.safetensors, tokenizer.json) as
builder input, with tensor names normalised to the prefix-free form ``arch.py`` expects."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arch import ArchConfig, Tensor, check_weights
from .errors import ModelFilesError
from .safetensors_io import read_safetensors

_PREFIXES = ("bert.", "roberta.", "model.")


@dataclass(frozen=True)
class HFSource:
    config: dict[str, Any]
    weights: dict[str, Tensor]
    tokenizer_json: str


def read_hf_dir(directory: Path) -> HFSource:
    """Load a HF checkpoint directory; raise ModelFilesError naming the missing piece."""
    directory = Path(directory)
    paths = {name: directory / name for name in ("config.json", "model.safetensors", "tokenizer.json")}
    for name, path in paths.items():
        if not path.is_file():
            raise ModelFilesError(f"{directory} has no {name}; a HF model directory needs {', '.join(paths)}")
    try:
        config = json.loads(paths["config.json"].read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelFilesError(f"{paths['config.json']} is not valid JSON: {exc}") from None
    weights: dict[str, Tensor] = {}
    for name, array in read_safetensors(paths["model.safetensors"]).items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        weights[name] = array
    check_weights(ArchConfig.from_hf(config), weights)
    return HFSource(config=config, weights=weights, tokenizer_json=paths["tokenizer.json"].read_text("utf-8"))
