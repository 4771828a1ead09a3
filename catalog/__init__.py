"""Durable registry of models and the settings store (see store.Catalog), and the model-path check."""

from .errors import CatalogError
from .paths import resolve_model_path
from .settings import VALID_KEYS, available_cpus, pairs_from_arrays, typed_settings
from .store import BUILTIN_MODEL_URI, Catalog, ModelRecord

__all__ = [
    "BUILTIN_MODEL_URI",
    "VALID_KEYS",
    "Catalog",
    "CatalogError",
    "ModelRecord",
    "available_cpus",
    "pairs_from_arrays",
    "resolve_model_path",
    "typed_settings",
]
