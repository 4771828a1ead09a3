"""The extension's three settings (ONNX Runtime thread-pool parameters): their types, defaults and validation.

Values travel as TEXT, as in get_setting/set_setting, and are stored in canonical form ('4', 'true'), so a
value reads back the same whichever spelling was accepted. Keys are matched case-insensitively, as
PostgreSQL matches configuration parameter names, and always reported in lower case. The value 'default'
(any case) removes a stored value, so the setting follows its default again, like `SET x TO DEFAULT`.

Defaults are computed when read, not stored: intra_op_parallelism's default, "all available CPUs", is the
number of CPUs this process may run on (len(os.sched_getaffinity(0)), which respects taskset and cgroup
cpusets), capped at MAX_THREADS, so a data directory moved to another machine follows that machine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import (
    ARRAY_SUBSCRIPT_ERROR,
    INVALID_PARAMETER_VALUE,
    NULL_VALUE_NOT_ALLOWED,
    CatalogError,
)

MAX_THREADS = 256
"""Upper bound of both thread counts: far beyond any useful ONNX Runtime pool, low enough to catch typos."""

RESET_VALUE = "default"

_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_bool(text: str) -> bool | None:
    """PostgreSQL's boolean input (parse_bool): unique prefixes of true/false/yes/no, on/off, 1/0, any case,
    surrounding whitespace ignored. None if `text` is not a boolean."""
    s = text.strip().lower()
    if not s:
        return None
    if "true".startswith(s) or "yes".startswith(s) or s in ("on", "1"):
        return True
    if "false".startswith(s) or "no".startswith(s) or s in ("of", "off", "0"):
        return False
    return None


@dataclass(frozen=True)
class Setting:
    """One setting: what it means, its type, its accepted range and how its default is found."""

    key: str
    kind: Literal["integer", "boolean"]
    description: str
    default: Callable[[], str]
    minimum: int = 1
    maximum: int = MAX_THREADS

    @property
    def accepted(self) -> str:
        """The accepted values, for error messages."""
        if self.kind == "integer":
            return f"an integer from {self.minimum} to {self.maximum}"
        return "a boolean (true/false, on/off, yes/no, 1/0)"

    def parse(self, value: str) -> str:
        """The canonical text of `value`, or CatalogError 22023 stating the accepted range."""
        if self.kind == "integer" and _INTEGER.fullmatch(value):
            number = int(value)
            if self.minimum <= number <= self.maximum:
                return str(number)
        elif self.kind == "boolean":
            flag = parse_bool(value)
            if flag is not None:
                return "true" if flag else "false"
        raise CatalogError(
            INVALID_PARAMETER_VALUE,
            f'invalid value for setting "{self.key}": "{value}"; expected {self.accepted}',
            hint=f"{self.key}: {self.description}. Use '{RESET_VALUE}' to return to the default.",
        )

    def typed(self, text: str) -> int | bool:
        """The Python value of canonical text, for the engine."""
        return int(text) if self.kind == "integer" else text == "true"


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting(
            "intra_op_parallelism",
            "integer",
            "threads used inside one operator; default all available CPUs",
            lambda: str(min(available_cpus(), MAX_THREADS)),
        ),
        Setting("inter_op_parallelism", "integer", "threads running operators in parallel; default 1", lambda: "1"),
        Setting(
            "spin_control",
            "boolean",
            "thread-pool spinning while waiting for work; off uses less CPU, adds latency; default true",
            lambda: "true",
        ),
    )
}

VALID_KEYS: tuple[str, ...] = tuple(sorted(SETTINGS))


def lookup(key: str | None) -> Setting:
    """The setting named `key` (any case); 22023 naming the valid keys if there is none."""
    if key is None:
        raise CatalogError(NULL_VALUE_NOT_ALLOWED, "setting key must not be null")
    setting = SETTINGS.get(key.lower())
    if setting is None:
        raise CatalogError(
            INVALID_PARAMETER_VALUE,
            f'unknown setting "{key}"; valid keys: {", ".join(VALID_KEYS)}',
            hint="azure_local_ai.get_setting() with no arguments shows every setting and its value.",
        )
    return setting


def validate(key: str | None, value: str | None) -> tuple[str, str | None]:
    """(canonical key, canonical value), the value None when `value` is 'default' (remove the stored value)."""
    setting = lookup(key)
    if value is None:
        raise CatalogError(
            NULL_VALUE_NOT_ALLOWED,
            f'value of setting "{setting.key}" must not be null',
            hint=f"Give {setting.accepted}, or '{RESET_VALUE}'.",
        )
    if value.strip().lower() == RESET_VALUE:
        return setting.key, None
    return setting.key, setting.parse(value)


def pairs_from_arrays(keys: Sequence[str | None], values: Sequence[str | None]) -> dict[str | None, str | None]:
    """set_setting(keys text[], values text[]) as a mapping; a later duplicate key wins, as in jsonb_object."""
    if len(keys) != len(values):
        raise CatalogError(
            ARRAY_SUBSCRIPT_ERROR,
            f"set_setting got {len(keys)} keys and {len(values)} values; the arrays must have the same length",
        )
    return dict(zip(keys, values, strict=True))


def typed_settings(values: Mapping[str, str]) -> dict[str, int | bool]:
    """Canonical texts -> Python values keyed by setting name, e.g. for `EngineSettings(**typed_settings(...))`."""
    return {key: SETTINGS[key].typed(text) for key, text in values.items()}
