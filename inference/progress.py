"""Progress display for long operations (model builds, downloads), written to stderr."""

from __future__ import annotations

import sys
from typing import TextIO


class ProgressPrinter:
    """Callable ``(stage, fraction)``: redraws one line on a terminal, prints stage changes otherwise."""

    def __init__(self, title: str, stream: TextIO | None = None) -> None:
        self.title = title
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.last_stage = ""

    def __call__(self, stage: str, fraction: float) -> None:
        line = f"{self.title}: {stage} [{fraction:4.0%}]"
        if self.live:
            self.stream.write("\r\033[K" + line)
            if fraction >= 1.0:
                self.stream.write("\n")
        elif stage != self.last_stage:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.last_stage = stage
