"""`SHOW azure.extensions`, the first step of Azure's instructions for the extension (it lists the
extensions an administrator allows), and `current_setting('azure.extensions')`. A server that is not
Azure's has no such setting; so, before a statement that names it, the proxy defines it in the
session, where the server lacks it: `AZURE_LOCAL_AI`, and `VECTOR` where the server has pgvector to
create, upper case and comma-separated as Azure writes it. The server then answers the statement
itself, in either protocol and wherever the name is used. On Azure's own servers nothing changes."""

from __future__ import annotations

#: What a statement must contain (in lower case) for the setting to be defined first.
MARKER = b"azure.extensions"
#: Run in the session: defines the setting where the server has none (a placeholder setting, which
#: any role may set); a no-op where it exists. Every operator and function is pg_catalog's.
DEFINE = (
    "SELECT pg_catalog.set_config('azure.extensions', 'AZURE_LOCAL_AI' OPERATOR(pg_catalog.||) CASE WHEN EXISTS ("
    "SELECT FROM pg_catalog.pg_available_extensions WHERE name OPERATOR(pg_catalog.=) 'vector') THEN ',VECTOR' "
    "ELSE '' END, false) WHERE pg_catalog.current_setting('azure.extensions', true) IS NULL"
)


def mentions(body: bytes) -> bool:
    return MARKER in body.lower()
