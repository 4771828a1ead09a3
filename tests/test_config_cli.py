"""Options: one table feeds the TOML file, the environment and the flags; the docs must match it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from proxy import config as cfg
from proxy.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_documents_every_option_with_its_default() -> None:
    document = tomllib.loads((ROOT / "config.example.toml").read_text())
    documented = {(section, name): value for section, table in document.items() for name, value in table.items()}
    options = {(o.section, o.name): o for o in cfg.OPTIONS}
    assert set(documented) == set(options)
    for key, option in options.items():
        if option.name != "data_dir":  # its default depends on $HOME
            assert documented[key] == option.default, key


def test_example_config_loads() -> None:
    config = cfg.load(ROOT / "config.example.toml")
    assert config.listen == "127.0.0.1:6432"


def test_precedence_flag_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[proxy]\nlisten = "127.0.0.1:1111"\nidle_timeout = 5\nlog_level = "debug"\n')
    monkeypatch.setenv("AZURE_LOCAL_AI_PROXY_LISTEN", "127.0.0.1:2222")
    monkeypatch.setenv("AZURE_LOCAL_AI_PROXY_IDLE_TIMEOUT", "7.5")
    args = build_parser().parse_args(["serve", "--listen", "127.0.0.1:3333"])
    config = cfg.load(path, args)
    assert (config.listen, config.idle_timeout, config.log_level) == ("127.0.0.1:3333", 7.5, "debug")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[proxy]\nlisten = "nope"\n', "HOST:PORT"),
        ('[proxy]\nbogus = 1\n', "unknown option 'bogus'"),
        ('[other]\nx = 1\n', "unknown section"),
        ('[proxy]\nidle_timeout = "soon"\n', "expected float"),
        ('[proxy]\ntls_cert = "a.pem"\n', "together"),
        ("[proxy\n", "cannot read config file"),
    ],
)
def test_config_errors_are_clear(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_help_lists_every_serve_option() -> None:
    out = run_cli("serve", "--help")
    assert out.returncode == 0
    for option in cfg.OPTIONS:
        assert option.flag in out.stdout
        assert option.env in out.stdout.replace("\n", "").replace(" ", "")


def test_version_and_top_level_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("azure-local-ai-proxy ")
    top = run_cli("--help")
    assert "serve" in top.stdout


def test_bad_config_exits_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[proxy]\nlisten = "nowhere"\n')
    out = run_cli("serve", "--config", str(path))
    assert out.returncode == 2
    assert "HOST:PORT" in out.stderr


def test_upstream_url_parsing() -> None:
    from proxy.upstream import Upstream

    tcp = Upstream.from_url("postgresql://u:p@db.example:6000/app?sslmode=verify-full&connect_timeout=3")
    assert (tcp.host, tcp.port, tcp.sslmode, tcp.connect_timeout) == ("db.example", 6000, "verify-full", 3.0)
    unix = Upstream.from_url("postgresql:///?host=/var/run/postgresql&port=5433")
    assert unix.is_unix and unix.socket_path == "/var/run/postgresql/.s.PGSQL.5433"
    with pytest.raises(ValueError, match="sslmode"):
        Upstream.from_url("postgresql://h/db?sslmode=sometimes")
    with pytest.raises(ValueError, match="postgresql://"):
        Upstream.from_url("mysql://h/db")
