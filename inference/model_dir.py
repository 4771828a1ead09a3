"""Model directories in Hugging Face layout and what we learn about them without loading them.

A directory holds ``model.onnx`` (or ``onnx/model.onnx``), ``tokenizer.json`` and usually
``config.json``; ``load_model_dir`` accepts the directory or the ONNX file itself, plus an
optional separate tokenizer path (this is what ``model_register`` passes), checks the files
and probes the embedding dimension and the maximum sequence length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelFilesError

BUILD_STAMP = "build.json"
ID_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("token_type_ids",)
POOLED_OUTPUT = "sentence_embedding"
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
DEFAULT_MAX_LENGTH = 512
_ROBERTA_TYPES = {"xlm-roberta", "roberta", "camembert"}


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's files are, and the figures probed from them."""

    uri: str
    onnx_path: Path
    tokenizer_path: Path
    config_path: Path | None
    dimensions: int
    max_seq_length: int
    #: None: run as exported; else the integer build asked for at registration (quantize.WEIGHTS).
    weights: str | None = None

    @property
    def directory(self) -> Path:
        return self.onnx_path.parent


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ModelFilesError(f"{path} does not hold a JSON object")
    return document


def _find_onnx(model_path: Path) -> Path:
    if model_path.is_file():
        if model_path.suffix != ".onnx":
            raise ModelFilesError(f"{model_path} is not an .onnx file; give the model file or its directory")
        return model_path
    if not model_path.is_dir():
        raise ModelFilesError(f"model path {model_path} does not exist")
    for candidate in (model_path / "model.onnx", model_path / "onnx" / "model.onnx"):
        if candidate.is_file():
            return candidate
    raise ModelFilesError(f"{model_path} holds neither model.onnx nor onnx/model.onnx")


def _find_beside(onnx_path: Path, name: str) -> Path | None:
    """``name`` next to the ONNX file or, for the ``onnx/`` layout, one level up."""
    for directory in (onnx_path.parent, onnx_path.parent.parent):
        if (directory / name).is_file():
            return directory / name
    return None


def _find_tokenizer(onnx_path: Path, tokenizer_path: Path | None) -> Path:
    if tokenizer_path is None:
        found = _find_beside(onnx_path, "tokenizer.json")
        if found is None:
            raise ModelFilesError(
                f"no tokenizer.json beside {onnx_path}; pass tokenizer_path (a tokenizer.json or its directory)"
            )
        return found
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ModelFilesError(f"tokenizer file {tokenizer_path} does not exist")
    return tokenizer_path


def _max_length(onnx_path: Path, tokenizer_path: Path, config: dict[str, Any]) -> int:
    """The most trustworthy declared limit: sentence-transformers' own, then the model's."""
    st_config = _find_beside(onnx_path, "sentence_bert_config.json")
    if st_config is not None and isinstance(_read_json(st_config).get("max_seq_length"), int):
        return int(_read_json(st_config)["max_seq_length"])
    if isinstance(config.get("max_seq_length"), int):
        return int(config["max_seq_length"])
    tok_config_path = _find_beside(tokenizer_path, "tokenizer_config.json")
    if tok_config_path is not None:
        limit = _read_json(tok_config_path).get("model_max_length")
        if isinstance(limit, int) and 0 < limit <= 1 << 16:
            return limit
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int):
        offset = int(config.get("pad_token_id", 1)) + 1 if config.get("model_type") in _ROBERTA_TYPES else 0
        return positions - offset
    return DEFAULT_MAX_LENGTH


def _probe_onnx(onnx_path: Path) -> int | None:
    """Check the graph's inputs and outputs; return the output dimension if it is static."""
    import onnx

    try:
        model = onnx.load_model(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for bad files
        raise ModelFilesError(f"{onnx_path} is not a valid ONNX model: {exc}") from None
    graph_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    missing = [name for name in ID_INPUTS if name not in graph_inputs]
    unknown = [name for name in graph_inputs if name not in ID_INPUTS + OPTIONAL_INPUTS]
    if missing or unknown:
        raise ModelFilesError(
            f"{onnx_path} must take inputs input_ids, attention_mask (and optionally token_type_ids); "
            f"it takes {', '.join(graph_inputs) or 'nothing'}"
        )
    outputs = {o.name: o for o in model.graph.output}
    chosen = pick_output(list(outputs), [len(o.type.tensor_type.shape.dim) for o in outputs.values()])
    if chosen is None:
        raise ModelFilesError(
            f"{onnx_path} has no {POOLED_OUTPUT} or token-level output (last_hidden_state); outputs: {list(outputs)}"
        )
    last = outputs[chosen].type.tensor_type.shape.dim[-1]
    return last.dim_value if last.HasField("dim_value") and last.dim_value > 0 else None


def pick_output(names: list[str], ranks: list[int]) -> str | None:
    """The output to embed from: a pooled sentence embedding, else per-token hidden states."""
    if POOLED_OUTPUT in names:
        return POOLED_OUTPUT
    for name in TOKEN_OUTPUTS:
        if name in names:
            return name
    return next((name for name, rank in zip(names, ranks, strict=True) if rank == 3), None)


def _check_tokenizer(tokenizer_path: Path, max_length: int) -> None:
    from .tokenizer import load_tokenizer

    load_tokenizer(tokenizer_path, max_length)


def load_model_dir(
    model_path: str | Path,
    tokenizer_path: str | Path | None = None,
    *,
    uri: str | None = None,
    validate: bool = True,
) -> ModelFiles:
    """Locate and check a model's files; ``validate=False`` trusts them (for our own builds)."""
    model_path = Path(model_path).expanduser()
    onnx_path = _find_onnx(model_path)
    tokenizer = _find_tokenizer(onnx_path, Path(tokenizer_path).expanduser() if tokenizer_path else None)
    config_path = _find_beside(onnx_path, "config.json")
    config = _read_json(config_path) if config_path else {}
    dimensions = _probe_onnx(onnx_path) if validate else None
    max_length = _max_length(onnx_path, tokenizer, config)
    if validate:
        _check_tokenizer(tokenizer, max_length)
    if dimensions is None:
        dimensions = config.get("hidden_size")
        if not isinstance(dimensions, int):
            raise ModelFilesError(
                f"cannot tell the embedding size of {onnx_path}: its output shape is dynamic and "
                "there is no config.json with hidden_size beside it"
            )
    return ModelFiles(
        uri=uri or str(model_path),
        onnx_path=onnx_path.resolve(),
        tokenizer_path=tokenizer.resolve(),
        config_path=config_path.resolve() if config_path else None,
        dimensions=int(dimensions),
        max_seq_length=max_length,
    )


def files_sha256(files: ModelFiles) -> str:
    """The SHA-256 of a model's files: every file of the ONNX graph's directory (its external data and
    configuration, whatever their names), by name, and the tokenizer where it lies elsewhere. What a
    catalog shared by many proxies keeps (each checks it loads the files registered), and what names
    a kept integer build (buildcache.py)."""
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
