"""Model paths given to model_register must lie under the configured model roots.

A client that may register models must still not make the proxy open arbitrary files on its host, so a
path is judged by where it really leads: it is made absolute, `..` is resolved and every symlink followed,
and the result must lie under one of the (equally resolved) roots. Containment is checked before
existence, so a refused path tells the client nothing about files outside the roots.

The returned path is the resolved one, free of symlinks; callers must open that path, not the one they
were given, so that a symlink that was checked cannot be re-pointed before use. (Someone who can write
inside a root could still replace a directory on that path with a symlink afterwards; the roots are meant
to be writable only by whoever administers the proxy.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import INSUFFICIENT_PRIVILEGE, INVALID_PARAMETER_VALUE, UNDEFINED_FILE, CatalogError

_ROOTS_HINT = "Put the model files under one of the model roots, or add their directory to the proxy's model roots."


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_model_path(path: str, roots: Sequence[Path], *, must_exist: bool = True) -> Path:
    """The real path of `path` if it lies under one of `roots`, else CatalogError.

    An absolute path is checked as it is; a relative one is tried under each root in order and the first
    one that exists (or, with must_exist=False, the first inside the roots) wins. Raises 22023 for an
    empty path or one with a NUL byte, 42501 for a path that leads outside the roots (or when no roots are
    configured), 58P01 for a path inside the roots that does not exist (when must_exist).
    """
    if not path or not path.strip() or "\x00" in path:
        raise CatalogError(INVALID_PARAMETER_VALUE, f"invalid model path {path!r}: it must be a non-empty file path")
    real_roots = [Path(root).expanduser().resolve() for root in roots]
    allowed = ", ".join(str(root) for root in real_roots)
    if not real_roots:
        raise CatalogError(
            INSUFFICIENT_PRIVILEGE,
            f'permission denied for model path "{path}": no model roots are configured',
            hint="Configure the proxy's model roots to allow registering models from files.",
        )
    given = Path(path)
    candidates = [given] if given.is_absolute() else [root / given for root in real_roots]
    inside: list[Path] = []
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # symlink loop, unreadable directory
            raise CatalogError(INVALID_PARAMETER_VALUE, f'cannot resolve model path "{path}": {exc}') from exc
        if _within(resolved, real_roots):
            if not must_exist or resolved.exists():
                return resolved
            inside.append(resolved)
    if not inside:
        raise CatalogError(
            INSUFFICIENT_PRIVILEGE,
            f'permission denied for model path "{path}": it lies outside the model roots (allowed: {allowed})',
            hint=_ROOTS_HINT,
        )
    raise CatalogError(
        UNDEFINED_FILE,
        f'model path "{path}" does not exist (looked for {", ".join(str(p) for p in inside)})',
        hint=f"Model paths are absolute or relative to a model root (roots: {allowed}).",
    )
