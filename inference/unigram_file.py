"""The compact tokenizer file written beside a built model's tokenizer.json: ``tokenizer.unigram.npz``.

It holds what unigram.py needs (pieces, scores, the normalisation map, special tokens) as a
few flat arrays, which load in ~0.1 s with little garbage, and the SHA-256 of the
tokenizer.json it was made with: a directory whose tokenizer.json was changed since falls
back to the ``tokenizers`` library, which reads tokenizer.json itself.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .unigram import AddedToken, UnigramModel

FILE_NAME = "tokenizer.unigram.npz"
FORMAT = 1
_SEPARATOR = "\0"


def beside(tokenizer_path: Path) -> Path:
    return tokenizer_path.with_name(FILE_NAME)


def xlmr_added_tokens(pieces: Sequence[tuple[str, float]], special_ids: Mapping[str, int]) -> list[AddedToken]:
    """The special tokens matched in raw text, as Hugging Face's XLM-R tokenizer has them: <s>, <pad>,
    </s>, <unk>, and <mask> (if the vocabulary has it) taking the whitespace before it."""
    tokens = [AddedToken(pieces[special_ids[key]][0], special_ids[key], False) for key in ("bos", "pad", "eos", "unk")]
    tokens += [AddedToken("<mask>", i, True) for i, (piece, _) in enumerate(pieces) if piece == "<mask>"][:1]
    return sorted(tokens, key=lambda token: token.id)


def _joined(strings: Sequence[str], what: str) -> np.ndarray:
    if any(_SEPARATOR in s for s in strings):
        raise ValueError(f"a {what} holds a NUL character, which this file format cannot store")
    return np.frombuffer(_SEPARATOR.join(strings).encode("utf-8"), np.uint8)


def _split(blob: np.ndarray) -> list[str]:
    return blob.tobytes().decode("utf-8").split(_SEPARATOR)


def unigram_file_bytes(
    pieces: Sequence[tuple[str, float]],
    normalization: Mapping[int, str],
    special_ids: Mapping[str, int],
    tokenizer_json: bytes,
) -> bytes:
    """The file's contents for the tokenizer.json ``tokenizer_json`` written from the same inputs."""
    codepoints = sorted(normalization)
    header = {
        "format": FORMAT,
        "tokenizer_json_sha256": hashlib.sha256(tokenizer_json).hexdigest(),
        "unk_id": special_ids["unk"],
        "bos_id": special_ids["bos"],
        "eos_id": special_ids["eos"],
        "added": [[t.content, t.id, t.lstrip] for t in xlmr_added_tokens(pieces, special_ids)],
    }
    out = io.BytesIO()
    np.savez(
        out,
        header=np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8),
        pieces=_joined([piece for piece, _ in pieces], "piece"),
        scores=np.array([score for _, score in pieces], np.float64),
        norm_codepoints=np.array(codepoints, np.int32),
        norm_replacements=_joined([normalization[c] for c in codepoints], "replacement"),
    )
    return out.getvalue()


def read_unigram_file(path: Path, tokenizer_path: Path) -> UnigramModel | None:
    """The model in ``path``, or None if it was not made from ``tokenizer_path`` as it is now."""
    with np.load(path, allow_pickle=False) as arrays:
        header = json.loads(arrays["header"].tobytes())
        if header.get("format") != FORMAT or header.get("tokenizer_json_sha256") != file_sha256(tokenizer_path):
            return None
        pieces = _split(arrays["pieces"])
        scores = arrays["scores"].tolist()
        codepoints = arrays["norm_codepoints"].tolist()
        replacements = _split(arrays["norm_replacements"])
    return UnigramModel(
        pieces=pieces,
        scores=scores,
        normalization=dict(zip(codepoints, replacements, strict=True)),
        added=[AddedToken(content, int(token_id), bool(lstrip)) for content, token_id, lstrip in header["added"]],
        unk_id=int(header["unk_id"]),
        bos_id=int(header["bos_id"]),
        eos_id=int(header["eos_id"]),
    )


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
