"""OpenAI's embeddings API, without the HTTP: what a request body means, what the answer looks like,
and which HTTP status a failed call gets. The vectors themselves come from the same function as SQL's
create_embeddings (evaluate.run), so that a text gets the same bits either way."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from catalog import ModelRecord

from .intercept.errors import CallError

#: OpenAI's own limit of inputs per request.
MAX_INPUTS = 2048
ENCODINGS = ("float", "base64")


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", sqlstate: str | None = None) -> None:
        super().__init__(message)
        #: The SQLSTATE of the call that failed, where a call did (the metrics count errors by it).
        self.sqlstate = sqlstate
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    inputs: list[str]
    #: `input` was one string (SQL's create_embeddings(model, text)), not a list (the text[] overload).
    single: bool
    encoding_format: str
    dimensions: int | None


def parse_embeddings_request(document: object) -> EmbeddingsRequest:
    """Validate a decoded JSON body. Token arrays (lists of integers) are refused: the SQL functions
    take text only, and so the same text must give the same vector."""
    if not isinstance(document, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a model name as the SQL functions take it, "
                       "e.g. multilingual-e5-small:v1.", param="model")
    raw = document.get("input")
    if isinstance(raw, str):
        inputs, single = [raw], True
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        inputs, single = raw, False
    else:
        raise ApiError(400, "'input' must be a string or an array of strings (token arrays are not accepted).",
                       param="input")
    if not inputs:
        raise ApiError(400, "'input' must not be an empty array.", param="input")
    if len(inputs) > MAX_INPUTS:
        raise ApiError(400, f"'input' has {len(inputs)} items; at most {MAX_INPUTS} are accepted per request.",
                       param="input")
    encoding = document.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', not {encoding!r}.",
                       param="encoding_format")
    dimensions = document.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
        raise ApiError(400, "'dimensions' must be an integer.", param="dimensions")
    return EmbeddingsRequest(model, inputs, single, encoding, dimensions)


def check_dimensions(request: EmbeddingsRequest, model_dimensions: int) -> None:
    """The model's vectors are not shortened: `dimensions`, if given, must be the model's own."""
    if request.dimensions is not None and request.dimensions != model_dimensions:
        raise ApiError(400, f"Model {request.model} gives {model_dimensions} dimensions; 'dimensions' "
                       f"{request.dimensions} is not supported (vectors are not shortened).", param="dimensions")


def embeddings_response(request: EmbeddingsRequest, vectors: Sequence[np.ndarray], tokens: int) -> dict[str, object]:
    """OpenAI's answer: base64 is the little-endian float32 bytes of each vector, as OpenAI's clients decode it."""
    data = [{"object": "embedding", "index": index, "embedding": _encode(vector, request.encoding_format)}
            for index, vector in enumerate(vectors)]
    return {"object": "list", "data": data, "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
    return vector.tolist()  # float32 -> Python float is exact, and JSON's shortest repr round-trips it


def models_response(records: Sequence[ModelRecord]) -> dict[str, object]:
    return {"object": "list", "data": [
        {"id": r.uri, "object": "model", "created": _epoch(r.created_at), "owned_by": "azure-local-ai-proxy"}
        for r in records
    ]}


def _epoch(iso: str) -> int:
    return int(dt.datetime.fromisoformat(iso).timestamp())


#: HTTP status of a call's SQLSTATE, where it is not 400 (the client's request) or 500.
_STATUS_BY_SQLSTATE = {"42704": 404, "57014": 504, "54000": 413, "53100": 507}
_CODES_BY_STATUS = {404: "model_not_found"}


def from_call_error(error: CallError) -> ApiError:
    """A failed call's error (PostgreSQL's SQLSTATE classes: 22 data, 42 syntax or access, ...) in HTTP terms."""
    status = _STATUS_BY_SQLSTATE.get(error.sqlstate)
    if status is None:
        status = 400 if error.sqlstate[:2] in ("22", "42") else 500
    message = error.message if error.hint is None else f"{error.message} ({error.hint})"
    return ApiError(status, message, code=_CODES_BY_STATUS.get(status, error.sqlstate),
                    kind="invalid_request_error" if status < 500 else "server_error", sqlstate=error.sqlstate)
