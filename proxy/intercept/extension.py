"""CREATE, DROP and ALTER EXTENSION azure_local_ai, sent through the proxy: the server has no such
extension (nothing can be installed on it), so each becomes a DO block that creates or removes the
extension's SQL objects in the client's own session, with its privileges and inside its transaction,
raising what PostgreSQL raises for a real extension. The statement's command tag is put back (the
server says DO).

As for a real extension, a version is installed by its first script (sql/azure_local_ai--1.0.sql)
and the update scripts after it (sql/azure_local_ai--1.0--1.1.sql, ...), and ALTER EXTENSION ... UPDATE
runs the update scripts from the version installed (azure_local_ai_proxy.version()) on."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from pglast import ast
from pglast.enums import DropBehavior, ObjectType

from .errors import CallError

NAME = "azure_local_ai"
#: Every version, oldest first; the last is the default. Each after the first has an update script.
VERSIONS = ("1.0", "1.1", "1.2", "1.3", "1.4", "1.5")
VERSION = VERSIONS[-1]
#: The schemas the script creates: the extension's functions, and what they need to reach the proxy.
SCHEMAS = (NAME, "azure_local_ai_proxy")
_INSTALLED = "EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'azure_local_ai_proxy')"
_FUNCTIONS = (
    "azure_local_ai.create_embeddings(text, text, integer)",
    "azure_local_ai.create_embeddings(text, text[], bigint, integer)",
    "azure_local_ai.create_embeddings(text, text[], anyarray, bigint, integer)",
    "azure_local_ai.get_setting(text[], integer)",
    "azure_local_ai.get_setting(text, integer)",
    "azure_local_ai.model_loaded(text, integer)",
    "azure_local_ai.model_metadata(text)",
    "azure_local_ai.model_register(text, text, text, integer)",
    "azure_local_ai.model_unload(text, integer)",
    "azure_local_ai.model_unregister(text, integer)",
    "azure_local_ai.set_setting(text[], text[], integer)",
    "azure_local_ai.set_setting(text, text, integer)",
)


@dataclass(frozen=True)
class ExtensionCommand:
    """What replaces one extension statement, and the command tag the client should see."""

    sql: str
    tag: str


@functools.cache
def _file(name: str) -> str:
    return resources.files(__package__).joinpath(f"sql/{NAME}--{name}.sql").read_text(encoding="utf-8")


def script(version: str = VERSION) -> str:
    """What installs `version`: the first version's script, then each update script up to it."""
    return "\n".join([_file(VERSIONS[0]), *_updates(VERSIONS[0], version)])


def _updates(installed: str, version: str) -> list[str]:
    """The update scripts from `installed` to `version` (a later one), in order."""
    start, end = VERSIONS.index(installed), VERSIONS.index(version)
    return [_file(f"{VERSIONS[i]}--{VERSIONS[i + 1]}") for i in range(start, end)]


def extension_command(node: ast.Node) -> ExtensionCommand | None:
    """The command for a statement about the azure_local_ai extension; None for any other statement.
    Raises CallError for what PostgreSQL would refuse before looking at the server (a version or
    schema this extension cannot have)."""
    if isinstance(node, ast.CreateExtensionStmt) and node.extname == NAME:
        return ExtensionCommand(_create(node), "CREATE EXTENSION")
    if (isinstance(node, ast.CommentStmt) and node.objtype == ObjectType.OBJECT_EXTENSION
            and getattr(node.object, "sval", None) == NAME):
        return ExtensionCommand(_comment(node.comment), "COMMENT")
    if isinstance(node, ast.AlterExtensionStmt) and node.extname == NAME:
        return ExtensionCommand(_update(_option(node, "new_version")), "ALTER EXTENSION")
    if isinstance(node, ast.DropStmt) and node.removeType == ObjectType.OBJECT_EXTENSION:
        names = [getattr(o, "sval", None) for o in node.objects or ()]
        if NAME not in names:
            return None
        if len(names) > 1:
            raise CallError("0A000", f"DROP EXTENSION {NAME} must name it alone through azure-local-ai-proxy",
                            "Drop the other extensions in a statement of their own.")
        return ExtensionCommand(_drop(bool(node.missing_ok), node.behavior == DropBehavior.DROP_CASCADE),
                                "DROP EXTENSION")
    return None


def _option(node: ast.CreateExtensionStmt | ast.AlterExtensionStmt, name: str) -> str | None:
    for option in node.options or ():
        if option.defname == name:
            return getattr(option.arg, "sval", None)
    return None


def _check_version(version: str | None) -> str:
    if version is None:
        return VERSION
    if version not in VERSIONS:
        raise CallError(
            "22023", f'extension "{NAME}" has no installation script nor update path for version "{version}"')
    return version


#: Held while the extension is created: two sessions' CREATE EXTENSION IF NOT EXISTS take turns, and
#: the second finds the first's objects (a unique violation otherwise).
_CREATING_LOCK = "PERFORM pg_catalog.pg_advisory_xact_lock(1634496617, 1)"


def _create(node: ast.CreateExtensionStmt) -> str:
    wanted = _option(node, "new_version")
    # A version of another numbering (Azure's own, in a dump of a server where the extension is native)
    # installs the latest of ours, and says so: a restore must not stop there.
    version = _check_version(wanted if wanted in VERSIONS else None)
    foreign = (f"RAISE NOTICE 'version \"%\" of extension \"{NAME}\" is not one of azure-local-ai-proxy''s: "
               f"installing {version}', {_quote(wanted)};\n" if wanted is not None and wanted not in VERSIONS else "")
    schema = _option(node, "schema")
    if schema is not None and schema != NAME:
        raise CallError("0A000", f'extension "{NAME}" must be installed in schema "{NAME}"')
    if node.if_not_exists:
        exists = f"RAISE NOTICE 'extension \"{NAME}\" already exists, skipping'"
    else:
        exists = f"RAISE EXCEPTION 'extension \"{NAME}\" already exists' USING ERRCODE = '42710'"
    return _do(
        f"{_CREATING_LOCK};\n"
        f"IF {_INSTALLED} THEN {exists}; RETURN; END IF;\n"
        f"{foreign}EXECUTE {_dollar(script(version))};"
    )


def _comment(comment: str | None) -> str:
    """COMMENT ON EXTENSION, as pg_dump writes it: the comment goes on the extension's schema."""
    text = "NULL" if comment is None else _quote(comment)
    return _do(
        f"IF NOT {_INSTALLED} THEN\n"
        f"  RAISE EXCEPTION 'extension \"{NAME}\" does not exist' USING ERRCODE = '42704';\n"
        "END IF;\n"
        f"EXECUTE pg_catalog.format('COMMENT ON SCHEMA {NAME} IS %s', pg_catalog.quote_nullable({text}));"
    )


def _update(wanted: str | None) -> str:
    """Run the update scripts from the installed version to `wanted` (the latest if None), as
    PostgreSQL does: a NOTICE if it is installed already, an error for a way back."""
    version = _check_version(wanted)
    steps = "".join(
        f"WHEN {_quote(installed)} THEN\n" + "".join(f"  EXECUTE {_dollar(update)};\n"
                                                     for update in _updates(installed, version))
        for installed in VERSIONS[: VERSIONS.index(version)]
    )
    return _do(
        f"IF NOT {_INSTALLED} THEN\n"
        f"  RAISE EXCEPTION 'extension \"{NAME}\" does not exist' USING ERRCODE = '42704';\n"
        "END IF;\n"
        "installed := azure_local_ai_proxy.version();\n"
        "CASE installed\n"
        f"WHEN {_quote(version)} THEN\n"
        f"  RAISE NOTICE 'version \"{version}\" of extension \"{NAME}\" is already installed';\n"
        f"{steps}"
        "ELSE\n"
        f"  RAISE EXCEPTION 'extension \"{NAME}\" has no update path from version \"%\" to version "
        f"\"{version}\"', installed USING ERRCODE = '22023';\n"
        "END CASE;"
    )


def _drop(missing_ok: bool, cascade: bool) -> str:
    if missing_ok:
        missing = f"RAISE NOTICE 'extension \"{NAME}\" does not exist, skipping'"
    else:
        missing = f"RAISE EXCEPTION 'extension \"{NAME}\" does not exist' USING ERRCODE = '42704'"
    behavior = "CASCADE" if cascade else "RESTRICT"
    return _do(
        f"IF NOT {_INSTALLED} THEN {missing}; RETURN; END IF;\n"
        "BEGIN\n"
        f"  DROP FUNCTION {', '.join(_FUNCTIONS)} {behavior};\n"
        "EXCEPTION WHEN dependent_objects_still_exist THEN\n"
        "  GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;\n"
        f"  RAISE EXCEPTION 'cannot drop extension {NAME} because other objects depend on it'\n"
        "    USING ERRCODE = '2BP01',\n"
        "    DETAIL = detail,\n"
        "    HINT = 'Use DROP ... CASCADE to drop the dependent objects too.';\n"
        "END;\n"
        "DROP FUNCTION azure_local_ai_proxy.ask(text, jsonb, integer), azure_local_ai_proxy.version();\n"

        f"DROP SCHEMA {', '.join(SCHEMAS)};"
    )


def _do(body: str) -> str:
    return f"DO {_dollar('DECLARE detail text; installed text; BEGIN ' + body + ' END')}"


def _quote(version: str) -> str:
    return "'" + version.replace("'", "''") + "'"


def _dollar(text: str) -> str:
    """`text` as a dollar-quoted constant whose tag it does not contain."""
    tag = "alp"
    while f"${tag}$" in text:
        tag += "_"
    return f"${tag}${text}${tag}$"
