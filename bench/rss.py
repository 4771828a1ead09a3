"""Resident memory of one runner in this (fresh) process: ``python -m bench.rss RUNNER`` prints JSON (MB).

imports: after importing the runner's libraries; loaded: model loaded; after_embed: one short text and a
batch of 32 long texts later, after 2 s idle (engines may hand memory back when idle); peak: the
process's high-water mark (VmHWM), i.e. during that batch. ``ours-tokenizer`` loads only the built-in
model's tokenizer (the engine's compact Unigram tokenizer), to show its share; ``hf-tokenizer`` loads the
same tokenizer.json with the ``tokenizers`` library, as the engine did before.
"""

from __future__ import annotations

import json
import sys
import time

from bench import runners
from bench.common import load_corpus, status_mb

TOKENIZERS = ("ours-tokenizer", "hf-tokenizer")


def _status_mb(field: str) -> float:
    return round(status_mb(field), 1)


def main(name: str) -> None:
    """Load runner ``name``, embed a little, print the RSS figures as one JSON line."""
    if name in TOKENIZERS:
        from bench import ours

        files = ours.builtin_files(ours.VARIANTS[0])
        figures = {"imports": _status_mb("VmRSS")}
        tokenizer = ours.load_tokenizer(files, hf=name == "hf-tokenizer")
        figures["loaded"] = _status_mb("VmRSS")
        tokenizer.encode_batch(["short text"] + [r["text"] for r in load_corpus()[:32]])
        time.sleep(2)
        figures["after_embed"] = _status_mb("VmRSS")
        figures["peak"] = _status_mb("VmHWM")
        print(json.dumps(figures))
        return
    factory = runners.FACTORIES[name]
    if name == "st-torch":
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    elif name.startswith("ours"):
        import bench.ours  # noqa: F401
    figures = {"imports": _status_mb("VmRSS")}
    runner = factory()
    figures["loaded"] = _status_mb("VmRSS")
    long_text = " ".join(r["text"] for r in load_corpus()[:40])[:1500]
    runner.batch(["short text (0)"])
    runner.batch([f"{long_text} ({i})" for i in range(32)])
    time.sleep(2)
    figures["after_embed"] = _status_mb("VmRSS")
    figures["peak"] = _status_mb("VmHWM")
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1])
