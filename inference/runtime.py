"""One loaded model: its tokenizer and ONNX Runtime session, and a synchronous embed step.

Thread safety: ``tokenize`` and ``run`` may be called from several threads (our tokenizers
and an ORT InferenceSession allow concurrent calls).  Settings are
fixed per session; the engine makes a new runtime session when they change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .buildcache import build_source
from .errors import ModelFilesError
from .model_dir import POOLED_OUTPUT, ModelFiles, pick_output
from .settings import EngineSettings
from .tokenizer import TextTokenizer
from .tokenizer import load_tokenizer as _load_tokenizer

# How the shared arena grows: by what is asked, not to the next power of two (ORT's kSameAsRequested).
ARENA_SAME_AS_REQUESTED = 1
_arena_lock = threading.Lock()
_arena_registered = False


def register_shared_arena() -> None:
    """Give ONNX Runtime's environment one CPU arena that every session of the process uses
    (``session.use_env_allocators``): models loaded together share their activations' memory.
    Once per process: ORT refuses a second allocator for the same device."""
    global _arena_registered
    with _arena_lock:
        if _arena_registered:
            return
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, ARENA_SAME_AS_REQUESTED, -1, -1))
        _arena_registered = True


def _shrinking_run_options() -> ort.RunOptions:
    """Run options that hand the arena's free regions back at the end of the run."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


SHRINK = _shrinking_run_options()


def load_tokenizer(files: ModelFiles) -> TextTokenizer:
    """The model's tokenizer, truncating to its maximum length (special tokens included), unpadded."""
    return _load_tokenizer(files.tokenizer_path, files.max_seq_length)


def _session(files: ModelFiles, settings: EngineSettings, builds: Path | None) -> ort.InferenceSession:
    source = build_source(files, builds) if files.weights else str(files.onnx_path)
    try:
        return ort.InferenceSession(source, sess_options=settings.session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for invalid models
        if files.weights and isinstance(source, str):  # a kept build it cannot read (damaged): made again
            Path(source).unlink(missing_ok=True)
            return _session(files, settings, builds)
        raise ModelFilesError(f"ONNX Runtime cannot load {files.onnx_path}: {exc}") from None


class ModelRuntime:
    """Tokenizer + session for one model; ``run`` embeds already tokenised inputs."""

    def __init__(self, files: ModelFiles, settings: EngineSettings, tokenizer: TextTokenizer | None = None,
                 builds: Path | None = None) -> None:
        """`builds`: where integer builds are kept between loads (buildcache.py); None: made at each."""
        self.files = files
        self.settings = settings
        self.builds = builds
        self.tokenizer = tokenizer or load_tokenizer(files)
        register_shared_arena()
        started = time.perf_counter()
        self.session = _session(files, settings, builds)
        self.load_seconds = time.perf_counter() - started
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = self.session.get_outputs()
        output = pick_output([o.name for o in outputs], [len(o.shape) for o in outputs])
        if output is None:
            raise ModelFilesError(f"{files.onnx_path} has no usable output")
        self.output_name = output
        self.pooled_in_graph = output == POOLED_OUTPUT

    def with_settings(self, settings: EngineSettings) -> ModelRuntime:
        """A runtime with a new session under other settings, sharing the tokenizer."""
        return ModelRuntime(self.files, settings, self.tokenizer, self.builds)

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.tokenizer.encode_batch(texts)]

    def run(self, sequences: Sequence[np.ndarray], *, release: bool = True) -> np.ndarray:
        """Embeddings (n, dim) float32, L2-normalised, of token id sequences (any lengths).
        ``release``: give the arena's memory back after the run (the last run of a burst); without
        it the next run reuses the memory in place."""
        width = max(len(s) for s in sequences)
        ids = np.zeros((len(sequences), width), np.int64)
        mask = np.zeros((len(sequences), width), np.int64)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        (out,) = self.session.run([self.output_name], feed, SHRINK if release else None)
        if self.pooled_in_graph:
            return np.ascontiguousarray(out, dtype=np.float32)
        return mean_pool_normalize(out, mask)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.run(self.tokenize(texts))


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of token states over the attention mask, L2-normalised, float32 (n, dim)."""
    weights = mask.astype(np.float32)
    # (n, 1, seq) @ (n, seq, dim): no (n, seq, dim) temporary beside the hidden states
    summed = np.matmul(weights[:, None, :], hidden)[:, 0, :]
    mean = summed / np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)
    norms = np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return (mean / norms).astype(np.float32)
