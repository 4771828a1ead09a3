"""Sub-commands `models` and `embed` of azure-local-ai-proxy (filled in by the engine work)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `models` and `embed` sub-commands; `common` carries --config and --data-dir."""
