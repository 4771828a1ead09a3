"""A model's tokenizer: our compact Unigram tokenizer where the build left its file, else ``tokenizers``.

The built-in model's directory has ``tokenizer.unigram.npz`` beside its tokenizer.json
(unigram_file.py), whose ids equal the ``tokenizers`` library's on that tokenizer.json in
a sixth of the memory.  Any other tokenizer.json (a registered model's WordPiece, BPE or
Unigram file) is read by the ``tokenizers`` library, imported only then.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .errors import ModelFilesError
from .unigram import UnigramTokenizer
from .unigram_file import beside, read_unigram_file


class TextTokenizer(Protocol):
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens added, truncated to the model's maximum length."""
        ...


class HFTokenizer:
    """A tokenizer.json read by the ``tokenizers`` library, truncating, unpadded."""

    def __init__(self, path: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        try:
            self.tokenizer: Any = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for bad files
            raise ModelFilesError(f"{path} is not a usable tokenizer.json: {exc}") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]


def load_tokenizer(tokenizer_path: Path, max_length: int) -> TextTokenizer:
    """The tokenizer of ``tokenizer_path`` (a tokenizer.json), truncating to ``max_length`` tokens."""
    compact = beside(tokenizer_path)
    if compact.is_file():
        try:
            model = read_unigram_file(compact, tokenizer_path)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFilesError(f"{compact} is not a usable tokenizer file: {exc}") from None
        if model is not None:
            return UnigramTokenizer(model, max_length)
    return HFTokenizer(tokenizer_path, max_length)
