"""``models fetch``: download the official ONNX export of intfloat/multilingual-e5-small.

Optional (extra ``fetch``: huggingface_hub) and explicit: nothing else in the engine goes
to the network.  The download lands in a temporary directory beside the cache entry and is
renamed into place only when complete and loadable, like a build.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .build import BUILTIN_URI, builtin_dir, builtin_model, is_current, models_dir
from .errors import FetchError, ModelFilesError
from .graph import Progress
from .model_dir import ModelFiles, load_model_dir

REPO_ID = "intfloat/multilingual-e5-small"
FETCHED_NAME = "multilingual-e5-small-v1-official"
FILES = ("onnx/model.onnx", "tokenizer.json", "config.json", "tokenizer_config.json", "sentence_bert_config.json")


#: The variant name of the fetched official export, beside the variants the builder makes.
OFFICIAL = "official"


def fetched_dir(data_dir: Path) -> Path:
    return models_dir(data_dir) / FETCHED_NAME


def builtin_files(data_dir: Path, variant: str, *, progress: Progress | None = None) -> ModelFiles:
    """The built-in model's files in `variant`: one the builder makes (built first if need be), or the
    official export, which must have been fetched (ModelFilesError otherwise)."""
    if variant != OFFICIAL:
        return builtin_model(data_dir, variant, progress=progress)
    if not fetched_dir(data_dir).is_dir():
        raise ModelFilesError("the official export is not fetched; run: azure-local-ai-proxy models fetch")
    return load_model_dir(fetched_dir(data_dir), uri=BUILTIN_URI)


def needs_build(data_dir: Path, variant: str) -> bool:
    """Whether using the built-in model in `variant` first builds it (the official export is never built)."""
    return variant != OFFICIAL and not is_current(builtin_dir(data_dir, variant))


def fetch_official(data_dir: Path, *, revision: str | None = None) -> ModelFiles:
    """Download (if not yet cached) and return the official export; FetchError if impossible."""
    target = fetched_dir(data_dir)
    if target.is_dir():
        return load_model_dir(target, uri=BUILTIN_URI)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FetchError(
            "models fetch needs the optional package huggingface_hub: "
            "pip install 'azure-local-ai-proxy[fetch]' (or use the built-in model, which needs no download)"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.fetching-", dir=target.parent))
    try:
        try:
            snapshot_download(REPO_ID, revision=revision, allow_patterns=list(FILES), local_dir=work)
        except Exception as exc:  # hub errors, connection errors, timeouts: all mean "no download"
            raise FetchError(f"could not download {REPO_ID} from the Hugging Face hub: {exc}") from None
        shutil.rmtree(work / ".cache", ignore_errors=True)
        try:
            load_model_dir(work, uri=BUILTIN_URI)
        except ModelFilesError as exc:
            raise FetchError(f"the download of {REPO_ID} is incomplete or unusable: {exc}") from None
        work.chmod(0o755)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return load_model_dir(target, uri=BUILTIN_URI)
