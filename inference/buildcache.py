"""Integer builds of registered models (quantize.py): made by a child process, and kept on disk
between loads where the engine is given a directory for them (the proxy's DATA_DIR/builds).

A build is kept under the SHA-256 of the model's files (model_dir.files_sha256: its external data
among them), the build asked for and BUILD_FORMAT: changed files, or a rewrite that writes another
graph, are built again. A load that finds its build there reads it like a model as exported, without
the child process (2.4 s and the float model's memory for all-MiniLM-L6-v2). The builds used last
are kept, KEEP of them; a partial build older than STALE_S was left by a proxy that died writing it,
and goes too."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .errors import ModelFilesError
from .model_dir import ModelFiles, files_sha256
from .quantize import BUILD_FORMAT

log = logging.getLogger("azure_local_ai_proxy.engine")

KEEP = 8
STALE_S = 600  # writing a build takes under a second


def integer_build(files: ModelFiles) -> bytes:
    """The model's integer build (quantize.py), made by a child process: parsing and writing a model
    holds the GIL (for 50-400 ms with all-MiniLM-L6-v2, which would stall the event loop), and the
    float model it reads, twice the build's size or more, is never in this process's memory."""
    assert files.weights is not None
    done = subprocess.run([sys.executable, "-m", "inference.quantize", str(files.onnx_path), files.weights],
                          capture_output=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise ModelFilesError(lines[-1] if lines else f"building {files.onnx_path} as {files.weights} failed")
    return done.stdout


def build_source(files: ModelFiles, directory: Path | None) -> bytes | str:
    """What ONNX Runtime loads for the model's integer build: the path of the build kept in
    `directory`, or the build made now (and kept there, with a directory)."""
    if directory is None:
        return integer_build(files)
    path = directory / f"{files_sha256(files)}-{files.weights}-{BUILD_FORMAT}.onnx"
    if path.is_file():
        os.utime(path)  # used last: kept longest
        return str(path)
    built = integer_build(files)
    try:
        _keep(directory, path, built)
    except OSError as exc:  # only time is lost: the next load builds it again
        log.warning("an integer build was not kept", extra={"event": "build_not_kept", "reason": str(exc)})
    return built


def _keep(directory: Path, path: Path, built: bytes) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = directory / f".{path.name}.{os.getpid()}"
    partial.write_bytes(built)
    os.replace(partial, path)  # whole or not at all, for a proxy sharing the directory
    kept = sorted(directory.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[KEEP:]:
        old.unlink(missing_ok=True)
    for left in directory.glob(".*.onnx.*"):
        with contextlib.suppress(FileNotFoundError):  # another proxy sharing the directory pruned it first
            if time.time() - left.stat().st_mtime > STALE_S:
                left.unlink()
