"""The catalog's one error type: a SQLSTATE, a message that says what to do, and an optional hint.

The proxy turns a CatalogError into a PostgreSQL ErrorResponse unchanged, so every code here is the one
PostgreSQL itself uses for the same situation:

- 22023 invalid_parameter_value: unknown setting key, invalid setting value, empty model uri or path.
- 22004 null_value_not_allowed: a NULL key or value inside the arrays of set_setting/get_setting.
- 2202E array_subscript_error: set_setting(keys, values) with arrays of different lengths (as jsonb_object).
- 42704 undefined_object: an unknown model_uri. PostgreSQL uses it whenever an argument names an object
  that does not exist (current_setting('nosuch'), 'nosuch'::regtype, DROP ... without IF EXISTS).
- 42710 duplicate_object: model_register of a uri that is already registered.
- 42501 insufficient_privilege: model_unregister of the built-in model, and a model path outside the
  configured model roots. Unregistering the built-in model is refused for everyone, whatever their roles,
  as PostgreSQL refuses changes to system catalogs with 42501 ("permission denied: ... is a system
  catalog"); retrying cannot succeed, which is what 42501 tells a client.
- 58P01 undefined_file: a model path that lies inside the roots but does not exist (as pg_read_file).
- XX001 data_corrupted, 55000 object_not_in_prerequisite_state, 55P03 lock_not_available, 53100 disk_full,
  58030 io_error: the catalog file itself is unusable.
"""

from __future__ import annotations

INVALID_PARAMETER_VALUE = "22023"
NULL_VALUE_NOT_ALLOWED = "22004"
ARRAY_SUBSCRIPT_ERROR = "2202E"
UNDEFINED_OBJECT = "42704"
DUPLICATE_OBJECT = "42710"
INSUFFICIENT_PRIVILEGE = "42501"
UNDEFINED_FILE = "58P01"
DATA_CORRUPTED = "XX001"
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
LOCK_NOT_AVAILABLE = "55P03"
DISK_FULL = "53100"
IO_ERROR = "58030"


class CatalogError(Exception):
    """An error a client may see: `sqlstate`, `message` (what is wrong) and `hint` (what to do)."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint

    def __repr__(self) -> str:
        return f"CatalogError({self.sqlstate!r}, {self.message!r}, hint={self.hint!r})"
