"""The `models` and `embed` sub-commands, driven through argparse as the console script does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from inference import ModelFiles, cli
from inference.runtime import ModelRuntime
from inference.settings import EngineSettings

from . import test_inference_fixtures as shared

data_dir, e5_q4 = shared.data_dir, shared.e5_q4  # session fixtures


def run(argv: list[str], data_dir: Path) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=None)
    parser = argparse.ArgumentParser(prog="azure-local-ai-proxy")
    commands = parser.add_subparsers(dest="command", required=True)
    cli.register(commands, common)
    args = parser.parse_args(argv)
    args.data_dir = data_dir
    return args.func(args)


def test_embed_prints_one_json_array_per_text(e5_q4: ModelFiles, data_dir: Path, capsys) -> None:
    texts = ["query: hello", "passage: Bonjour tout le monde"]
    assert run(["embed", *texts], data_dir) == 0
    lines = capsys.readouterr().out.splitlines()
    vectors = np.array([json.loads(line) for line in lines], dtype=np.float32)
    assert vectors.shape == (2, 384)
    expected = ModelRuntime(e5_q4, EngineSettings.default()).embed_texts(texts)
    assert np.abs(vectors - expected).max() < 1e-5


def test_models_list_and_verify(e5_q4: ModelFiles, data_dir: Path, capsys) -> None:
    assert run(["models", "list"], data_dir) == 0
    listing = capsys.readouterr().out
    assert "variant q4 (default): built" in listing and "variant official: not fetched" in listing
    assert run(["models", "verify"], data_dir) == 0
    report = capsys.readouterr().out
    assert "dimensions: 384" in report and "verify: ok" in report


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embed", "--model", "/no/such/model", "x"], "does not exist"),
        (["embed", "--variant", "official", "x"], "models fetch"),
    ],
)
def test_errors_exit_nonzero_with_a_message(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert run(argv, tmp_path) == 1
    assert message in capsys.readouterr().err
