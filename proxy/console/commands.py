"""The admin console's commands, parsed from a statement's text (pure code). The grammar is a few
words, so it is read word by word, not by a SQL parser: `SHOW item`, `RELOAD`, `PAUSE`, `RESUME`,
any case, an optional `;` at the end; a Query may hold several, separated by `;`."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: What SHOW shows (CLIENTS is PgBouncer's name for SESSIONS).
SHOW_ITEMS = ("STATS", "SESSIONS", "CLIENTS", "MODELS", "REMOTE", "CONFIG", "VERSION", "HELP")
#: Commands that take no argument, with what each does (SHOW HELP lists them).
ACTIONS = {
    "RELOAD": "re-read the config file and apply what can change live (as SIGHUP)",
    "PAUSE": "stop reading from each client session once its request in progress is done; return when all are",
    "RESUME": "read from the client sessions again",
}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConsoleError(Exception):
    """A command failed; the client gets an ErrorResponse with `sqlstate`."""

    def __init__(self, sqlstate: str, text: str, hint: str | None = None) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.hint = hint


@dataclass(frozen=True)
class Command:
    verb: str  # SHOW, RELOAD, PAUSE or RESUME
    item: str = ""  # what SHOW shows: one of SHOW_ITEMS, CLIENTS read as SESSIONS

    @property
    def tag(self) -> str:
        """The CommandComplete tag, as PgBouncer's (SHOW for every SHOW)."""
        return self.verb

    def __str__(self) -> str:
        return f"{self.verb} {self.item}".strip()


_USAGE = "The admin console runs SHOW " + "|".join(SHOW_ITEMS) + ", " + ", ".join(ACTIONS) + "."


def parse_commands(text: str) -> list[Command]:
    """The commands of one Query's text, in order; empty for an empty query (only `;` and spaces)."""
    return [parse_command(part) for part in text.split(";") if part.strip()]


def parse_command(text: str) -> Command:
    """One command (a trailing `;` allowed). Raises ConsoleError: 42601 for malformed text, 0A000 for a
    statement the console does not run, 42704 for SHOW of something it does not know."""
    words = text.strip().rstrip(";").split()
    if not words:
        raise ConsoleError("42601", "syntax error at end of input")
    verb = words[0].upper()
    if not _WORD.fullmatch(verb):
        raise ConsoleError("42601", f'syntax error at or near "{words[0]}"', _USAGE)
    if verb != "SHOW" and verb not in ACTIONS:
        raise ConsoleError("0A000", f"the admin console does not run {verb} statements", _USAGE)
    for word in words[1:]:
        if not _WORD.fullmatch(word):
            raise ConsoleError("42601", f'syntax error at or near "{word}"', _USAGE)
    if verb == "SHOW":
        if len(words) != 2:
            near = words[2] if len(words) > 2 else None
            raise ConsoleError("42601", f'syntax error at or near "{near}"' if near else "syntax error at end of input",
                               _USAGE)
        item = words[1].upper()
        if item not in SHOW_ITEMS:
            raise ConsoleError("42704", f'unrecognized SHOW item "{words[1]}"', _USAGE)
        return Command("SHOW", "SESSIONS" if item == "CLIENTS" else item)
    if len(words) > 1:
        raise ConsoleError("42601", f'syntax error at or near "{words[1]}"', _USAGE)
    return Command(verb)
