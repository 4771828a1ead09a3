"""Error types of the engine; each message says what is wrong and what to do about it."""

from __future__ import annotations


class InferenceError(Exception):
    """Base class of every error raised by the `inference` package."""


class ModelFilesError(InferenceError, ValueError):
    """A model directory, ONNX file, tokenizer or config is missing or unusable."""


class BuildError(InferenceError):
    """The built-in model could not be built from its source weights."""


class FetchError(InferenceError):
    """Downloading a model from the hub failed or is not possible here."""


class EmbeddingTimeout(InferenceError, TimeoutError):
    """A request did not finish within its timeout; its queued work was dropped."""


class EngineClosed(InferenceError, RuntimeError):
    """The engine was closed; no new requests are accepted."""
