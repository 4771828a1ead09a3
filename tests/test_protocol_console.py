"""The admin console's pure parts, without sockets: the messages it answers with (checked against
layouts written out by hand from the protocol's documentation), its command grammar, who may log in,
what SHOW CONFIG hides, and what a reload applies."""

from __future__ import annotations

import re
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from proxy import config as cfg
from proxy import messages
from proxy import protocol as pg
from proxy.console.commands import Command, ConsoleError, parse_command, parse_commands
from proxy.console.login import AdminAccess, is_loopback
from proxy.console.views import config_table
from proxy.reload import plan


def frame(msg_type: bytes, body: bytes) -> bytes:
    return msg_type + struct.pack("!I", len(body) + 4) + body


def test_row_description_of_text_columns() -> None:
    field = struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
    assert messages.row_description(("stat", "value")) == frame(b"T", b"\0\2" + b"stat\0" + field + b"value\0" + field)


def test_row_description_takes_bind_formats_one_for_all_or_each() -> None:
    binary = struct.pack("!IhIhih", 0, 0, 25, -1, -1, 1)
    text = struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
    assert messages.row_description(("a", "b"), (1,)) == frame(b"T", b"\0\2a\0" + binary + b"b\0" + binary)
    assert messages.row_description(("a", "b"), (0, 1)) == frame(b"T", b"\0\2a\0" + text + b"b\0" + binary)


def test_data_row_with_null_and_utf8_round_trips() -> None:
    encoded = messages.data_row(("sessions", None, "é"))
    assert encoded == frame(b"D", b"\0\3" + b"\0\0\0\x08sessions" + b"\xff\xff\xff\xff" + b"\0\0\0\x02\xc3\xa9")
    assert messages.parse_data_row(encoded[5:]) == ("sessions", None, "é")


@pytest.mark.parametrize("body", [b"\0\1\0\0\0\x09short", b"\0\1\0\0", b"\0\1\0\0\0\1ab"])
def test_malformed_data_rows_are_refused(body: bytes) -> None:
    with pytest.raises(pg.ProtocolViolation):
        messages.parse_data_row(body)


def test_small_answers() -> None:
    assert messages.command_complete("SHOW") == frame(b"C", b"SHOW\0")
    assert messages.ready_for_query() == frame(b"Z", b"I")
    assert messages.parameter_status("client_encoding", "UTF8") == frame(b"S", b"client_encoding\0UTF8\0")
    ours = (messages.EMPTY_QUERY_RESPONSE, messages.PARSE_COMPLETE, messages.BIND_COMPLETE, messages.CLOSE_COMPLETE,
            messages.NO_DATA, messages.PORTAL_SUSPENDED)
    assert ours == tuple(frame(t, b"") for t in (b"I", b"1", b"2", b"3", b"n", b"s"))


def test_execute_and_query_bodies() -> None:
    assert messages.Execute.decode(b"p1\0\0\0\0\x05") == messages.Execute("p1", 5)
    assert messages.query_text(b"SHOW STATS\0") == "SHOW STATS"
    with pytest.raises(pg.ProtocolViolation):
        messages.Execute.decode(b"p1\0\0\0")
    with pytest.raises(pg.ProtocolViolation):
        messages.query_text(b"SHOW STATS\0extra")


def test_startup_message_is_what_parse_startup_reads() -> None:
    params = {"user": "alice", "database": "postgres", "application_name": "psql"}
    packet = pg.startup_message(params)
    assert packet == (struct.pack("!ii", len(packet), pg.PROTOCOL_3_0)
                      + b"user\0alice\0database\0postgres\0application_name\0psql\0\0")
    assert pg.parse_startup(packet).parameters == params


@pytest.mark.parametrize(("text", "expected"), [
    ("SHOW STATS", [Command("SHOW", "STATS")]),
    ("  show   stats ; ", [Command("SHOW", "STATS")]),
    ("SHOW CLIENTS", [Command("SHOW", "SESSIONS")]),
    ("show sessions; Show Models;show config;SHOW VERSION", [Command("SHOW", "SESSIONS"), Command("SHOW", "MODELS"),
                                                            Command("SHOW", "CONFIG"), Command("SHOW", "VERSION")]),
    ("reload", [Command("RELOAD")]),
    ("PAUSE;RESUME", [Command("PAUSE"), Command("RESUME")]),
    (" ; ", []),
])
def test_commands(text: str, expected: list[Command]) -> None:
    assert parse_commands(text) == expected


@pytest.mark.parametrize(("text", "sqlstate", "message"), [
    ("SELECT 1", "0A000", "does not run SELECT"),
    ("begin", "0A000", "does not run BEGIN"),
    ("SHOW", "42601", "at end of input"),
    ("SHOW STATS now", "42601", 'near "now"'),
    ("RELOAD all", "42601", 'near "all"'),
    ("SHOW 'x'", "42601", "near \"'x'\""),
    ("(SHOW STATS)", "42601", 'near "(SHOW"'),
    ("SHOW nonsense", "42704", 'unrecognized SHOW item "nonsense"'),
])
def test_errors_are_postgresql_like(text: str, sqlstate: str, message: str) -> None:
    with pytest.raises(ConsoleError, match=re.escape(message)) as caught:
        parse_command(text)
    assert caught.value.sqlstate == sqlstate


def test_show_tags_are_show_and_actions_their_names() -> None:
    assert [c.tag for c in parse_commands("SHOW STATS; RELOAD; PAUSE; RESUME")] == ["SHOW", "RELOAD", "PAUSE", "RESUME"]


def test_who_may_use_the_console() -> None:
    loopback_default = AdminAccess(frozenset(), loopback=True)
    assert loopback_default.refusal("postgres", superuser=True) is None
    assert "not a superuser" in (loopback_default.refusal("app", superuser=False) or "")
    wide_default = AdminAccess(frozenset(), loopback=False)
    assert "beyond loopback" in (wide_default.refusal("postgres", superuser=True) or "")
    listed = AdminAccess(frozenset({"ops"}), loopback=False)
    assert listed.refusal("ops", superuser=False) is None
    assert "not in admin_users" in (listed.refusal("postgres", superuser=True) or "")
    assert not listed.superusers_only and loopback_default.superusers_only


def test_admin_users_and_loopback_from_the_config() -> None:
    config = replace(cfg.load(None), admin_users=" ops, alice ,,", listen="0.0.0.0:6432")
    assert AdminAccess.of(config) == AdminAccess(frozenset({"ops", "alice"}), loopback=False)
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.1.2.3", "db.example")] == [
        True, True, True, False, False, False]


def test_show_config_hides_secrets_and_says_what_a_reload_changes() -> None:
    config = replace(cfg.load(None), http_api_key="s3cret", service_password="pw", idle_timeout=5.0)
    rows = {row[0]: row for row in config_table(config).rows}
    assert rows["http_api_key"] == ("http_api_key", "(set)", "", "yes")
    assert rows["service_password"] == ("service_password", "(set)", "", "no")
    assert rows["idle_timeout"] == ("idle_timeout", "5.0", "0.0", "yes")
    assert rows["listen"][3] == "no"
    assert "s3cret" not in repr(config_table(config).rows)


def test_a_reload_applies_live_options_and_keeps_the_others() -> None:
    running = cfg.load(None)
    loaded = replace(running, log_level="debug", idle_timeout=3.0, listen="127.0.0.1:7000", cache_mb=8)
    effective, report = plan(running, loaded)
    assert (effective.log_level, effective.idle_timeout) == ("debug", 3.0)
    assert (effective.listen, effective.cache_mb) == (running.listen, running.cache_mb)
    assert report.changed == ("idle_timeout", "log_level")
    assert report.restart == ("listen", "cache_mb")
    assert report.notices()[0] == "changed: idle_timeout, log_level"
    assert plan(running, running)[1].notices() == ["no option that can change live changed"]


@pytest.mark.parametrize(("text", "message"), [
    ('[proxy]\nlog_level = "loud"\n', "log_level must be one of"),
    ("[engine]\nmax_batch_size = 0\n", "must be positive"),
    ('[admin]\nadmin_user = "x"\n', "unknown option 'admin_user'"),
])
def test_what_a_reload_refuses(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(path)
