"""Tokenizer speed: the engine's compact Unigram tokenizer beside the ``tokenizers`` library on the same
tokenizer.json.

Texts: the corpus four times over, with `passage: ` and a running number; one call per text (what the engine does
for a single caller) and one call for all (a batch); the tokenizers take turns within each repeat; tokens/s, the
median and the best of the repeats. Their memory is in bench.engine_speed's (rows ours-tokenizer, hf-tokenizer)."""

from __future__ import annotations

import statistics
import sys
import time

from bench import runners
from bench.common import Cli, Section, load_corpus, table

SECTION = "## Tokenizer speed (bench.tokenizer_speed)"


def main(argv: list[str] | None = None) -> int:
    cli = Cli("tokenizer_speed", __doc__, prog="bench/run.sh tokenizer_speed")
    cli.add_argument("--repeats", type=int, default=5)
    cli.record(SECTION)
    args = cli.parse(argv)
    section = Section(args, SECTION)
    files = runners.builtin_files()
    encoders = {"ours": runners.load_tokenizer(files).encode_batch,
                "tokenizers": runners.load_tokenizer(files, hf=True).encode_batch}
    corpus = [row["text"] for row in load_corpus()]
    rates: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats):
        texts = [f"passage: {text} ({rep}-{i})" for i, text in enumerate(corpus * 4)]
        for name, encode in encoders.items():
            encode(texts[:50])  # warm-up
            start = time.perf_counter()
            tokens = sum(len(encode([text])[0]) for text in texts)
            rates.setdefault(("one text per call", name), []).append(tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            tokens = sum(len(ids) for ids in encode(texts))
            rates.setdefault((f"{len(texts)} texts in one call", name), []).append(
                tokens / (time.perf_counter() - start))
    rows = [(mode, name, statistics.median(r), max(r)) for (mode, name), r in sorted(rates.items())]
    section.publish([], table(("mode", "tokenizer", "tokens/s", "best tokens/s"), rows), "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
