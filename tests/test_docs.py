"""The documentation: the site builds with --strict (a broken link, anchor or page fails), the
configuration page is the option table's, the pages' lists agree with the code, and every output shown
is either run again by a test (tests/test_docs_sessions.py and the others TRANSCRIPTS names) or marked as
an illustration."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from markdown.extensions.toc import slugify

from proxy import config as cfg
from proxy.console.commands import ACTIONS, SHOW_ITEMS

from .transcripts import DOCS, README, ROOT, TRANSCRIPTS, blocks

CONFIG_PAGE = DOCS / "configuration.md"


def test_the_site_builds_strict(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()


def test_every_page_is_in_the_navigation() -> None:
    """mkdocs warns of a page left out of `nav` only at INFO: a page nobody can reach fails here."""
    listed = set(re.findall(r":\s*([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    assert listed == {page.name for page in DOCS.glob("*.md")}


def test_the_configuration_page_is_written_from_the_options() -> None:
    done = subprocess.run([sys.executable, "tools/config_page.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def toml_value(value: object) -> str:
    """A default as the TOML file writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_the_configuration_page_has_every_option_and_nothing_else() -> None:
    """Read as a user would: each option's heading, with its flag, variable and default under it, in the
    section of the TOML file it belongs to."""
    page = CONFIG_PAGE.read_text()
    sections = re.split(r"^## ", page, flags=re.M)
    found: dict[str, str] = {}
    for section in sections[1:]:
        name = re.match(r"`\[(\w+)\]`", section)
        if name is None:
            continue
        for option, body in re.findall(r"^### `(\w+)`\n\n(.*?)\n\n", section, re.M | re.S):
            found[option] = name.group(1)
            match = next(o for o in cfg.OPTIONS if o.name == option)
            assert f"`{match.flag}`" in body and f"`{match.env}`" in body, body
            assert ("a reload applies it" in body) == match.live, body
            if option != "data_dir":  # its default depends on the user and the environment
                assert f"default `{toml_value(match.default)}`" in body, body
    assert found == {o.name: o.section for o in cfg.OPTIONS}


def test_the_reload_list_names_the_options_a_reload_applies() -> None:
    page = (DOCS / "operations.md").read_text()
    part = page[page.index("## Reloading the configuration"):page.index("Every other option")]
    named = set(re.findall(r"`(\w+)`", part)) & {o.name for o in cfg.OPTIONS}
    assert named == {o.name for o in cfg.OPTIONS if o.live}


def test_the_console_table_names_every_command() -> None:
    page = (DOCS / "operations.md").read_text()
    table = page[page.index("| command | what it does |"):page.index("Who may connect")]
    named = set(re.findall(r"`(SHOW \w+|[A-Z]+)`", table))  # SHOW SESSIONS (or `CLIENTS`): a SHOW item
    commands = {f"SHOW {word}" if word in SHOW_ITEMS else word for word in named}
    assert commands == {f"SHOW {item}" for item in SHOW_ITEMS} | set(ACTIONS)


def test_the_readme_is_short_and_its_links_land() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for target, anchor in re.findall(r"\]\((docs/[\w-]+\.md)(?:#([\w-]+))?\)", text):
        page = ROOT / target
        assert page.exists(), target
        if anchor:
            headings = {slugify(h.strip("`# "), "-") for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}
            assert anchor in headings, f"{target}#{anchor}"


def test_every_output_shown_is_a_checked_transcript_or_an_illustration() -> None:
    unmarked = [str(b) for b in blocks() if b.shows_output and b.kind is None]
    assert not unmarked, f"output without a <!-- transcript: NAME --> or <!-- illustration: WHY --> line: {unmarked}"
    names = [b.name for b in blocks() if b.kind == "transcript"]
    assert sorted(names) == sorted(set(names)), "a transcript name is used twice"
    assert set(names) == set(TRANSCRIPTS)


def test_every_transcript_has_a_test_that_reads_it() -> None:
    """TRANSCRIPTS names, for each transcript, a test function that exists and names the transcript
    (directly, or through the module-level helpers it calls)."""
    for name, where in TRANSCRIPTS.items():
        path, function = where.split("::")
        source = (ROOT / path).read_text()
        functions = {node.name for node in ast.walk(ast.parse(source))
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert function in functions, where
        helper = {"readme-session": "readme_session()", "first-session": "first_session()"}.get(name)
        assert f'"{name}"' in source or (helper is not None and helper in source), where
