"""Resident memory of one runner in this fresh process (MB, one JSON line): ``python -m bench.rss RUNNER``.

After its imports, loaded, then after one short text, a batch of 32 long texts and 2 s idle (engines may hand memory
back), and the peak (VmHWM). ``ours-tokenizer`` and ``hf-tokenizer``: the built-in model's tokenizer alone, the
engine's or read by the ``tokenizers`` library."""

from __future__ import annotations

import json
import sys
import time

from bench import runners
from bench.common import load_corpus, status_mb

TOKENIZERS = ("ours-tokenizer", "hf-tokenizer")


def main(name: str) -> None:
    if name.startswith("ours") or name in TOKENIZERS:
        import inference.build
        import inference.engine  # noqa: F401
    elif name == "st-torch":
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    if name in TOKENIZERS:
        files = runners.builtin_files()  # built, if need be, before the figures
    figures = {"imports": status_mb("VmRSS")}
    if name in TOKENIZERS:
        encode = runners.load_tokenizer(files, hf=name == "hf-tokenizer").encode_batch
        work = [["short text"] + [r["text"] for r in load_corpus()[:32]]]
    else:
        encode = runners.FACTORIES[name]().batch
        long_text = " ".join(r["text"] for r in load_corpus()[:40])[:1500]
        work = [["short text (0)"], [f"{long_text} ({i})" for i in range(32)]]
    figures["loaded"] = status_mb("VmRSS")
    for texts in work:
        encode(texts)
    time.sleep(2)
    figures["after_embed"], figures["peak"] = status_mb("VmRSS"), status_mb("VmHWM")
    print(json.dumps({key: round(value, 1) for key, value in figures.items()}))


if __name__ == "__main__":
    main(sys.argv[1])
