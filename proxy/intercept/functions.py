"""What each azure_local_ai function does, given its arguments' values: embeddings from the engine,
settings and models from the catalog. Shared by every session through one `Backend`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from catalog import Catalog, CatalogError, resolve_model_path
from catalog.server import ServerCatalog
from catalog.store import BUILTIN_DIMENSIONS
from inference.build import DEFAULT_VARIANT
from inference.engine import EmbeddingEngine, Usage
from inference.errors import EmbeddingTimeout, ModelFilesError
from inference.fetch import builtin_files, needs_build
from inference.graph import Progress
from inference.model_dir import ModelFiles, files_sha256, load_model_dir
from inference.quantize import MIN_COSINE, cosines, probe_texts, split_weights
from inference.settings import EngineSettings

from ..remote.models import RemoteModel, RemoteModels, remote_pool_name
from ..remote.pool import RemotePool
from ..tasks import retrieve
from .embedcache import EmbeddingCache
from .errors import CallError
from .remoteembed import embed_remote, pool_named
from .vectors import LOOKAHEAD_CHUNK, Ready, Vectors

BUILTIN_URI = "multilingual-e5-small:v1"
DEFAULT_CACHE_BYTES = 64 << 20
MAX_CHUNKS_AT_ONCE = 64  # a look-ahead's texts in flight to a pool of inference servers: 16,384 at most


log = logging.getLogger("azure_local_ai_proxy.models")


def from_catalog(exc: CatalogError) -> CallError:
    return CallError(exc.sqlstate, exc.message, exc.hint)


@dataclass
class Backend:
    """The engine, the catalog and the model roots, as one service for all sessions."""

    data_dir: Path
    engine: EmbeddingEngine
    catalog: Catalog | ServerCatalog
    model_roots: tuple[Path, ...]
    variant: str = DEFAULT_VARIANT
    cache: EmbeddingCache = field(default_factory=lambda: EmbeddingCache(DEFAULT_CACHE_BYTES))
    #: The pools of inference servers (remote_pools), and the models they compute.
    remote: RemoteModels | None = None

    def __post_init__(self) -> None:
        self._files: dict[str, ModelFiles | RemoteModel] = {}
        #: A registered model's path and SHA-256 in the catalog when its files were loaded (and checked).
        self._loaded_as: dict[str, tuple[str | None, str | None]] = {}
        self._builtin_lock = asyncio.Lock()
        #: What the built-in model goes through at start-up ("built", "loaded"); None once it is ready.
        self.warming: str | None = None
        #: Why preparing the built-in model at start-up failed (None: it did not), for /healthz.
        self.builtin_error: str | None = None
        self.vectors = Vectors(self.engine, self.cache, self._embed, self._chunks_at_once)

    @classmethod
    def open(
        cls, data_dir: Path, model_roots: Sequence[Path], engine: EmbeddingEngine | None = None,
        variant: str = DEFAULT_VARIANT, cache_bytes: int = DEFAULT_CACHE_BYTES,
        catalog: Catalog | ServerCatalog | None = None, remote: RemoteModels | None = None,
    ) -> Backend:
        """Open the catalog (the data directory's, unless one is given) and start an engine with the
        catalog's thread settings."""
        backend = cls(data_dir, engine or EmbeddingEngine(), catalog or Catalog(data_dir), tuple(model_roots),
                      variant, EmbeddingCache(cache_bytes), remote)
        backend.engine.apply_settings(backend.engine_settings())
        return backend

    def start_remote(self) -> None:
        """Start the pools of inference servers; the built-in model's is checked against the local
        engine (which builds and loads the model for that, once)."""
        if self.remote is not None:
            self.remote.start(BUILTIN_DIMENSIONS, self._local_builtin)

    async def _local_builtin(self, texts: list[str]) -> np.ndarray:
        files = await self.model_files(BUILTIN_URI)
        assert isinstance(files, ModelFiles)
        return await self.engine.embed(files, texts)

    def follow_catalog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Act on changes another proxy makes to a shared catalog (ServerCatalog.on_change, from any
        thread): its settings applied to the engine, models gone or changed forgotten."""
        if isinstance(self.catalog, ServerCatalog):
            self.catalog.on_change = lambda: loop.call_soon_threadsafe(self._catalog_changed)

    def _catalog_changed(self) -> None:
        self.engine.apply_settings(self.engine_settings())
        for uri in list(self._files):
            try:
                record = self.catalog.get_model(uri)
            except CatalogError:
                record = None
            if record is None or (not record.builtin and self._loaded_as.get(uri) != (record.model_path,
                                                                                      record.sha256)):
                self._files.pop(uri, None)
                self.cache.forget_model(uri)
                unloading = asyncio.get_running_loop().run_in_executor(None, self.engine.unload, uri)
                unloading.add_done_callback(retrieve)

    def engine_settings(self) -> EngineSettings:
        values = self.catalog.get_settings(None)
        return EngineSettings(
            intra_op_parallelism=int(values["intra_op_parallelism"]),
            inter_op_parallelism=int(values["inter_op_parallelism"]),
            spin_control=values["spin_control"] == "true",
        )

    async def _blocking(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run catalog and file work off the event loop, translating its errors for the client."""
        try:
            return await asyncio.to_thread(func, *args)
        except CatalogError as exc:
            raise from_catalog(exc) from exc
        except ModelFilesError as exc:
            raise CallError("22023", str(exc), "Check the model and tokenizer paths.") from exc

    async def model_files(self, uri: str) -> ModelFiles | RemoteModel:
        """The files of a registered model (the built-in one is built on first use), or the pool that
        computes it."""
        cached = self._files.get(uri)
        if cached is not None:
            return cached
        record = await self._blocking(self.catalog.get_model, uri)
        pool = remote_pool_name(record.model_path) if not record.builtin else None
        if pool is not None:
            pool_named(self.remote, pool)  # this proxy has it
            files: ModelFiles | RemoteModel = RemoteModel(uri, pool, record.dimensions or 0,
                                                          record.max_seq_length or 0)
            self._loaded_as[uri] = (record.model_path, record.sha256)
        elif record.builtin:
            async with self._builtin_lock:
                files = await self._blocking(builtin_files, self.data_dir, self.variant)
            if record.model_path != str(files.onnx_path):  # the catalog shows where the build lives
                await self._blocking(
                    self.catalog.update_model_files, uri, str(files.onnx_path), str(files.tokenizer_path),
                    files.dimensions, files.max_seq_length,
                )
        else:
            tokenizer = Path(record.tokenizer_path) if record.tokenizer_path else None
            weights, model_path = split_weights(record.model_path)
            files = await self._blocking(partial(load_model_dir, Path(model_path), tokenizer, uri=uri))
            files = dataclasses.replace(files, weights=weights)
            if record.sha256 is not None:
                found = await asyncio.to_thread(files_sha256, files)
                if found != record.sha256:
                    raise CallError(
                        "XX001", f'the files of model "{uri}" here ({files.onnx_path}, {files.tokenizer_path}) are '
                        f"not those registered: SHA-256 {found}, registered {record.sha256}",
                        "Every proxy sharing the catalog must have the same files at the registered path (a shared "
                        "volume, the same image); or register the model anew.")
            self._loaded_as[uri] = (record.model_path, record.sha256)
        self._files[uri] = files
        return files

    def warming_needs_build(self) -> bool:
        """Whether the built-in model has yet to be built (the first run in this data directory)."""
        return needs_build(self.data_dir, self.variant)

    async def prepare_builtin(self, progress: Progress | None = None) -> None:
        """Build (on the first run), load and run the built-in model once, so that the first call after
        start-up costs one model run. Calls that arrive meanwhile wait for it (the hook says why)."""
        try:
            self.warming = "built" if self.warming_needs_build() else "loaded"
            async with self._builtin_lock:
                await self._blocking(partial(builtin_files, self.data_dir, self.variant, progress=progress))
            files = await self.model_files(BUILTIN_URI)
            await self._blocking(self.engine.load, files)
            await self.engine.embed(files, ["query: warm-up"])
        except Exception as exc:
            self.builtin_error = str(exc) or type(exc).__name__
            raise
        else:
            self.builtin_error = None
        finally:
            self.warming = None

    # ------------------------------------------------------------------ the functions

    async def create_embeddings(
        self, uri: str, texts: Sequence[str | None], batch_size: int | None, timeout_ms: int, *,
        max_text: int | None = None, text_per_value: int = 0, usage: Usage | None = None,
    ) -> list[np.ndarray | None]:
        """The texts' embeddings (None for a NULL text). With `max_text`, refuse (54000, before any
        work) a call whose vectors would not fit in that many bytes of SQL text."""
        if batch_size is not None and batch_size < 1:
            raise CallError("22023", f"batch_size must be at least 1, not {batch_size}")
        if timeout_ms < 0:
            raise CallError("22023", f"timeout_ms must not be negative, not {timeout_ms}")
        files = await self.model_files(uri)
        if max_text is not None:
            per_row = files.dimensions * text_per_value + 8
            if len(texts) * per_row > max_text:
                raise CallError(
                    "54000", f"create_embeddings over {len(texts)} inputs would return about "
                    f"{len(texts) * per_row >> 20} MB of values, more than PostgreSQL accepts in one statement",
                    f"Embed at most {max_text // per_row} inputs per call.")
        present = [t for t in texts if t is not None]
        try:
            async with asyncio.timeout(_seconds(timeout_ms)):
                vectors = await self.vectors.get(files, uri, present, batch_size, usage)
        except (EmbeddingTimeout, TimeoutError) as exc:
            raise CallError("57014", f"canceling statement: create_embeddings did not finish within {timeout_ms} ms",
                            "Raise timeout_ms, or embed fewer inputs per call.") from exc
        rows = iter(vectors)
        return [None if t is None else next(rows) for t in texts]

    async def embed_ahead(self, uri: str, texts: Sequence[str], ready: Ready | None = None) -> int:
        """Compute texts into the cache ahead of the calls that will ask for them (Vectors.ahead).
        Returns how many were computed."""
        return await self.vectors.ahead(await self.model_files(uri), uri, texts, ready)

    def _chunks_at_once(self, files: ModelFiles | RemoteModel) -> int:
        """Chunks of a look-ahead computed at once: two keep the engine's batches full; a pool needs
        enough to give each endpoint all the requests it takes at once, and one more each."""
        pool = pool_named(self.remote, files.pool) if isinstance(files, RemoteModel) else (
            self.remote.builtin_pool if self.remote is not None and files.uri == BUILTIN_URI else None)
        if pool is None:
            return 2
        spec = pool.spec
        texts = len(pool.endpoints) * (spec.max_in_flight + 1) * spec.max_batch
        return min(MAX_CHUNKS_AT_ONCE, max(2, -(-texts // LOOKAHEAD_CHUNK)))

    async def _embed(self, files: ModelFiles | RemoteModel, texts: list[str], batch_size: int | None = None,
                     usage: Usage | None = None) -> np.ndarray:
        """The texts' vectors, from the pool that computes the model, or from the local engine."""
        if isinstance(files, RemoteModel):
            return await embed_remote(self.remote, self.engine, files.pool, None, texts, files.dimensions)
        if self.remote is not None and files.uri == BUILTIN_URI and self.remote.builtin_pool is not None:
            vectors = await embed_remote(self.remote, self.engine, self.remote.builtin, files, texts)
            if usage is not None:
                usage.tokens += await self.engine.count_tokens(files, texts)
            return vectors
        return await self.engine.embed(files, texts, batch_size=batch_size, usage=usage)


    async def get_setting(self, key: str) -> str:
        return await self._blocking(self.catalog.get_setting, key)

    async def get_settings(self, keys: Sequence[str | None]) -> dict[str, str]:
        if any(k is None for k in keys):
            raise CallError("22004", "setting keys must not be NULL")
        return await self._blocking(self.catalog.get_settings, list(keys))  # type: ignore[arg-type]

    async def set_settings(self, pairs: dict[str, str]) -> None:
        await self._blocking(self.catalog.set_settings, pairs)
        self.engine.apply_settings(await self._blocking(self.engine_settings))

    def runs_on(self, uri: str, model_path: str | None) -> RemotePool | None:
        """The pool that computes a model (its record's path), or None: the local engine."""
        if self.remote is None:
            return None
        name = self.remote.builtin if uri == BUILTIN_URI else remote_pool_name(model_path)
        return self.remote.pools.get(name) if name else None

    def is_loaded(self, uri: str, model_path: str | None) -> bool:
        """Loaded: in the engine, or for a model a pool computes, an endpoint up (connected and checked)."""
        pool = self.runs_on(uri, model_path)
        return pool.loaded if pool is not None else self.engine.is_loaded(uri)

    async def model_loaded(self, uri: str) -> bool:
        record = await self._blocking(self.catalog.get_model, uri)
        return self.is_loaded(uri, record.model_path)

    async def model_metadata(self, uri: str) -> dict[str, object]:
        record = await self._blocking(self.catalog.get_model, uri)
        metadata = record.to_metadata()
        metadata["loaded"] = self.is_loaded(uri, record.model_path)
        pool = self.runs_on(uri, record.model_path)
        if pool is not None:
            metadata["remote"] = {"pool": pool.spec.name, "model": pool.spec.model,
                                  "endpoints": {e.label: e.state for e in pool.endpoints}}
        weights, _ = split_weights(record.model_path or "")
        if weights is not None:
            metadata["weights"] = weights
        return metadata

    async def model_register(self, uri: str, model_path: str, tokenizer_path: str | None) -> int:
        if remote_pool_name(model_path) is not None:
            return await self._register_remote(uri, model_path)
        weights, model_path = split_weights(model_path)
        if weights is not None and remote_pool_name(model_path) is not None:
            raise CallError("22023", f"{weights}: builds a model this proxy computes, not one a remote pool does",
                            "Register the remote model without the prefix.")
        model = await self._blocking(resolve_model_path, model_path, self.model_roots)
        tokenizer = None
        if tokenizer_path:
            tokenizer = await self._blocking(resolve_model_path, tokenizer_path, self.model_roots)
        files = await self._blocking(partial(load_model_dir, model, tokenizer, uri=uri))
        for found in (files.onnx_path, files.tokenizer_path):  # a file in the directory may be a link out of the roots
            await self._blocking(resolve_model_path, str(found), self.model_roots)
        try:
            if weights is None:
                await self._blocking(self.engine.load, files)  # the model loads and embeds: check it now
                await self.engine.embed(files, ["azure_local_ai model_register check"])
            else:
                await self._check_integer_build(files, weights)
        except CallError:
            raise
        except Exception as exc:
            built = f" as {weights}" if weights else ""
            raise CallError("22023", f"model {uri} at {model} cannot be loaded{built}: {exc}",
                            "Register it without the prefix." if weights else
                            "Give an ONNX text-embedding model with its tokenizer.json.") from exc
        finally:
            await asyncio.to_thread(self.engine.unload, uri)
        digest = await asyncio.to_thread(files_sha256, files)
        stored_path = str(files.onnx_path) if weights is None else f"{weights}:{files.onnx_path}"
        record = await self._blocking(
            partial(self.catalog.register_model, uri, stored_path, str(files.tokenizer_path),
                    files.dimensions, files.max_seq_length, sha256=digest),
        )
        self._files.pop(uri, None)
        self.cache.forget_model(uri)
        return record.id

    async def _check_integer_build(self, files: ModelFiles, weights: str) -> None:
        """Load the model as exported and as the integer build asked for, and compare their vectors of
        the evaluation set's texts: a model the build breaks is refused, with the figures."""
        texts = probe_texts()
        await self._blocking(self.engine.load, files)
        reference = await self.engine.embed(files, texts)
        built = dataclasses.replace(files, weights=weights)
        await self._blocking(self.engine.load, built)
        similarity = cosines(reference, await self.engine.embed(built, texts))
        figures = (f"cosine to the model's own float32 vectors over {len(texts)} texts: "
                   f"mean {similarity.mean():.5f}, lowest {similarity.min():.5f}")
        if not np.isfinite(similarity).all() or similarity.min() < MIN_COSINE:
            raise CallError("22023", f"model {files.uri} loses too much as {weights}: {figures} (under {MIN_COSINE})",
                            "Register it as it is." if weights.startswith("q8") else
                            "Register it with q8: (8-bit weights) or as it is.")
        log.info("model %s registered as %s: %s", files.uri, weights, figures)

    async def _register_remote(self, uri: str, model_path: str) -> int:
        """A model a configured pool computes: it must have an endpoint up (checked), which says the
        vectors' length."""
        name = remote_pool_name(model_path)
        assert name is not None
        pool = pool_named(self.remote, name)
        if self.remote is not None and name == self.remote.builtin:
            raise CallError("22023", f"remote pool {name} computes the built-in model {BUILTIN_URI}",
                            "Use the built-in model's URI, or give the other model a pool of its own.")
        if not pool.loaded or pool.dimensions is None:
            why = "; ".join(pool.problems()) or "none checked yet"
            raise CallError("58030", f"no endpoint of remote pool {name} is up: {why}",
                            "See /healthz; try again once an endpoint is up.")
        record = await self._blocking(partial(self.catalog.register_model, uri, model_path, None, pool.dimensions,
                                              pool.spec.max_tokens))
        self._files.pop(uri, None)
        self.cache.forget_model(uri)
        return record.id

    async def model_unload(self, uri: str) -> None:
        record = await self._blocking(self.catalog.get_model, uri)
        pool = self.runs_on(uri, record.model_path)
        if pool is not None:
            await pool.release()
        await asyncio.to_thread(self.engine.unload, uri)

    async def model_unregister(self, uri: str) -> None:
        await self._blocking(self.catalog.unregister_model, uri)
        self._files.pop(uri, None)
        self.cache.forget_model(uri)
        await asyncio.to_thread(self.engine.unload, uri)




def _seconds(timeout_ms: int) -> float | None:
    return timeout_ms / 1000 if timeout_ms > 0 else None
