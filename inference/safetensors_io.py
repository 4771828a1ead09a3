"""A minimal reader of ``.safetensors`` files (8-byte header length, JSON header, raw data).

Small enough to own rather than depend on: we only need float tensors, read once at build
time, converted to float32.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .errors import ModelFilesError

_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of the file; floating point ones as float32 (bfloat16 widened exactly)."""
    data = Path(path).read_bytes()
    try:
        (header_len,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(data[8 : 8 + header_len])
    except (struct.error, ValueError) as exc:
        raise ModelFilesError(f"{path} is not a safetensors file: {exc}") from None
    base = 8 + header_len
    tensors: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        raw = data[base + start : base + end]
        if dtype == "BF16":
            widened = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
            array = widened.view(np.float32)
        elif dtype in _DTYPES:
            array = np.frombuffer(raw, _DTYPES[dtype])
        else:
            raise ModelFilesError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        tensors[name] = array.reshape(shape)
    return tensors
