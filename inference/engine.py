"""The embedding engine: one per process, shared by every client session.

    engine = EmbeddingEngine(EngineSettings.default(), BatchingConfig())
    vectors = await engine.embed(files, ["query: ..."], timeout=5.0)   # float32 (n, dim)

* Never blocks the event loop: tokenising runs in a small thread pool, model runs in one
  dispatcher thread (ONNX Runtime parallelises inside each run with its own threads), all of
  them at a lower priority than the event loop's thread, so that relaying comes first.
* Dynamic batching: inputs queued by any caller within ``max_wait_ms`` of each other are
  merged, sorted by length and cut into runs bounded in rows and tokens (``batching.py``).
  ``stats`` counts runs, so the merging is observable. The window is waited only while callers
  keep each other company (the last dispatch served several, or more came while it ran): a lone
  caller after a lone caller (an interactive call, one-row INSERTs in a row) runs at once.
* Cancelling the awaiting task or passing its ``timeout`` drops the request's queued inputs;
  the caller gets ``CancelledError`` / ``EmbeddingTimeout``.
* Models load lazily on first use, or explicitly with ``load``; ``unload`` frees them.
  ``apply_settings`` takes effect for later runs: sessions are rebuilt lazily.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .batching import BatchingConfig, plan_runs
from .errors import EmbeddingTimeout, EngineClosed
from .model_dir import ModelFiles
from .runtime import ModelRuntime
from .settings import EngineSettings

log = logging.getLogger("azure_local_ai_proxy.engine")

SNAPSHOT_RUNS = 4  # one dispatch takes at most this many runs' worth of queued tokens
#: Inputs up to this many characters in all are tokenised on the caller's thread (an event loop's:
#: about 25 us for a sentence, 0.2 ms at the most), not handed to a tokeniser thread.
INLINE_TOKENIZE_CHARS = 4096
TRIM_IDLE_SECONDS = 0.5  # idle time after model runs before their freed memory is returned to the OS
# A burst of model runs whose largest run held this many padded tokens (~15 MB of activations) or
# more hands the arena's memory back at its end; smaller ones leave it for the next calls to reuse
# (allocating it again for every short call cost them ~5%).
RELEASE_AFTER_TOKENS = 1024
MODEL_NICENESS = 5  # how much nicer than the process the threads of model work run


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model, as ``model_metadata`` describes it."""

    uri: str
    dimensions: int
    max_seq_length: int
    onnx_path: Path
    tokenizer_path: Path
    onnx_bytes: int
    pooled_in_graph: bool
    load_seconds: float


@dataclass
class EngineStats:
    """Counters since the engine started (read them, don't write them)."""

    runs: int = 0
    sequences: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    dropped: int = 0
    session_builds: int = 0
    restarts: int = 0  # times the dispatcher thread had to be restarted (should stay 0)
    run_rows: dict[int, int] = field(default_factory=dict)  # model runs by their number of rows


@dataclass
class Usage:
    """What a caller's texts cost: tokens the model ran on, special tokens included, after truncation
    (the embeddings API reports it as usage.prompt_tokens)."""

    tokens: int = 0


@dataclass(eq=False)
class _Request:
    model: ModelFiles
    size: int
    cap: int
    future: concurrent.futures.Future[np.ndarray] = field(default_factory=concurrent.futures.Future)
    out: np.ndarray | None = None
    remaining: int = 0

    @property
    def abandoned(self) -> bool:
        return self.future.done()


@dataclass(eq=False)
class _Item:
    request: _Request
    index: int
    ids: np.ndarray
    arrived: float


class EmbeddingEngine:
    """Thread-safe embedding service; see the module docstring."""

    def __init__(self, settings: EngineSettings | None = None, batching: BatchingConfig | None = None,
                 builds: Path | None = None) -> None:
        """`builds`: where registered models' integer builds are kept between loads (buildcache.py)."""
        self.settings = settings or EngineSettings.default()
        self.batching = batching or BatchingConfig()
        self.builds = builds
        self.stats = EngineStats()
        self._runtimes: dict[str, ModelRuntime] = {}
        self._load_lock = threading.Lock()
        self._queue: deque[_Item] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._untrimmed = False  # model runs happened since memory was last returned to the OS
        self._burst_tokens = 0  # padded tokens of the largest run since the arena was last shrunk
        # Read and written on the dispatcher thread only:
        self._several = False  # the last dispatch served several requests
        self._run_ended = 0.0  # when the last model run ended (time.monotonic), before its results went out
        self._tokenizers = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="embed-tokenize", initializer=_lower_priority)
        # ONNX Runtime's threads inherit their priority from the thread that creates the session.
        self._builder = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="embed-build", initializer=_lower_priority)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="embed-dispatch", daemon=True)
        self._dispatcher.start()

    # ---- models -----------------------------------------------------------------------

    def load(self, model: ModelFiles) -> ModelInfo:
        """Load (if needed) and describe a model. Blocking: call it via asyncio.to_thread."""
        runtime = self._runtime(model)
        return ModelInfo(
            uri=model.uri,
            dimensions=model.dimensions,
            max_seq_length=model.max_seq_length,
            onnx_path=model.onnx_path,
            tokenizer_path=model.tokenizer_path,
            onnx_bytes=model.onnx_path.stat().st_size,
            pooled_in_graph=runtime.pooled_in_graph,
            load_seconds=runtime.load_seconds,
        )

    def unload(self, model: ModelFiles | str) -> bool:
        """Drop a model's session and tokenizer; True if it was loaded."""
        uri = model if isinstance(model, str) else model.uri
        with self._load_lock:
            runtime = self._runtimes.pop(uri, None)
        if runtime is None:
            return False
        del runtime
        _return_freed_memory()
        return True

    def is_loaded(self, model: ModelFiles | str) -> bool:
        uri = model if isinstance(model, str) else model.uri
        with self._load_lock:
            return uri in self._runtimes

    def apply_settings(self, settings: EngineSettings) -> None:
        """Use new thread settings from the next model run on (sessions are rebuilt lazily)."""
        self.settings = settings

    def _loaded(self, model: ModelFiles) -> ModelRuntime | None:
        """The model's runtime if it is loaded under the current settings; None if not, or if the lock
        is held (a session being built, for seconds): never waits, as the event loop calls it."""
        if not self._load_lock.acquire(blocking=False):
            return None
        try:
            runtime = self._runtimes.get(model.uri)
            return runtime if runtime is not None and runtime.files == model and runtime.settings == self.settings \
                else None
        finally:
            self._load_lock.release()

    def _runtime(self, model: ModelFiles) -> ModelRuntime:
        """The model's runtime under the current settings, loading or rebuilding as needed."""
        with self._load_lock:
            runtime = self._runtimes.get(model.uri)
            settings = self.settings
            if runtime is not None and runtime.files == model and runtime.settings == settings:
                return runtime
            if runtime is not None and runtime.files == model:
                self._runtimes.pop(model.uri)
                fresh = self._builder.submit(runtime.with_settings, settings).result()
            else:
                self._runtimes.pop(model.uri, None)
                fresh = self._builder.submit(ModelRuntime, model, settings, builds=self.builds).result()
            del runtime
            self.stats.session_builds += 1
            self._runtimes[model.uri] = fresh
            _return_freed_memory()  # what loading parsed and dropped (the ONNX file, the tokenizer's arrays)
            return fresh

    # ---- requests ---------------------------------------------------------------------

    async def embed(
        self,
        model: ModelFiles,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
        usage: Usage | None = None,
    ) -> np.ndarray:
        """L2-normalised embeddings, float32 (len(texts), dim), in input order.

        ``batch_size`` caps how many of these texts share one model run; ``timeout`` (seconds)
        bounds the whole call and raises EmbeddingTimeout, dropping the queued work; ``usage``
        gets the texts' token count added.
        """
        if not texts:
            return np.zeros((0, model.dimensions), np.float32)
        request = self._new_request(model, len(texts), batch_size)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                runtime = self._loaded(model) if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS else None
                if runtime is not None:  # tens of microseconds: a thread's wake-up costs more
                    self._submit(request, list(texts), usage, runtime)
                else:
                    await loop.run_in_executor(self._tokenizers, self._submit, request, list(texts), usage)
                return await asyncio.wrap_future(request.future)
        except TimeoutError:
            raise EmbeddingTimeout(f"embedding {len(texts)} input(s) took longer than {timeout} s") from None
        finally:
            self._abandon(request)

    def embed_sync(
        self,
        model: ModelFiles,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """``embed`` for threads without an event loop (CLI, benchmarks)."""
        if not texts:
            return np.zeros((0, model.dimensions), np.float32)
        request = self._new_request(model, len(texts), batch_size)
        try:
            self._submit(request, list(texts))
            return request.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise EmbeddingTimeout(f"embedding {len(texts)} input(s) took longer than {timeout} s") from None
        finally:
            self._abandon(request)

    def _new_request(self, model: ModelFiles, size: int, batch_size: int | None) -> _Request:
        if self._closed:
            raise EngineClosed("the embedding engine is shut down")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return _Request(model=model, size=size, cap=batch_size or self.batching.max_batch_size, remaining=size)

    def _submit(self, request: _Request, texts: list[str], usage: Usage | None = None,
                runtime: ModelRuntime | None = None) -> None:
        """Tokenise (with `runtime`, or the model's, loaded if need be: then in a worker thread) and queue;
        the request's future will get the result."""
        sequences = (runtime or self._runtime(request.model)).tokenize(texts)
        if usage is not None:
            usage.tokens += sum(len(ids) for ids in sequences)
        now = time.monotonic()
        items = [_Item(request, i, ids, now) for i, ids in enumerate(sequences)]
        with self._wakeup:
            if self._closed:
                raise EngineClosed("the embedding engine is shut down")
            if request.abandoned:  # cancelled while tokenising
                return
            self._ensure_dispatcher()
            self._queue.extend(items)
            self._wakeup.notify()

    def _abandon(self, request: _Request) -> None:
        """Drop whatever a cancelled or timed-out request still has queued."""
        if not request.future.cancel():  # it finished: nothing of it is queued
            return
        with self._wakeup:
            before = len(self._queue)
            self._queue = deque(item for item in self._queue if item.request is not request)
            self.stats.dropped += before - len(self._queue)

    # ---- dispatcher thread ------------------------------------------------------------

    def _take_snapshot(self) -> list[_Item] | None:
        """Wait for queued work and the batching window; take one model's share of it. None: closed.
        Queued items may vanish at any moment (their callers gave up), so the queue is re-read after
        every wait."""
        window = self.batching.max_wait_ms / 1000.0
        budget = self.batching.max_batch_tokens
        with self._wakeup:
            while not self._closed:
                if not self._queue:
                    self._wait_idle()
                    continue
                first = self._queue[0]
                left = first.arrived + window - time.monotonic()
                company = self._several or first.arrived < self._run_ended  # it queued while a run went on
                alone = not company and all(item.request is first.request for item in self._queue)
                if left > 0 and not alone and sum(len(item.ids) for item in self._queue) < budget:
                    self._wakeup.wait(left)
                    continue
                taken = self._take_locked(SNAPSHOT_RUNS * budget)
                self._several = any(item.request is not first.request for item in taken)
                return taken
            return None

    def _wait_idle(self) -> None:
        """Wait for work (lock held). Idle a while after runs, give their freed buffers back, which
        keeps RSS near the model size; not after every run, or back-to-back calls would pay ~0.5 ms."""
        if not self._untrimmed:
            self._wakeup.wait()
        elif not self._wakeup.wait(TRIM_IDLE_SECONDS):
            self._untrimmed = False
            _return_freed_memory()

    def _take_locked(self, max_tokens: int) -> list[_Item]:
        """Take queued items of the first item's model, up to `max_tokens` (lock held)."""
        uri = self._queue[0].request.model.uri
        taken: list[_Item] = []
        kept: deque[_Item] = deque()
        tokens = 0
        for item in self._queue:
            if item.request.model.uri == uri and tokens < max_tokens:
                taken.append(item)
                tokens += len(item.ids)
            else:
                kept.append(item)
        self._queue = kept
        return taken

    def _dispatch_loop(self) -> None:
        """Serve until closed. Nothing a request does may end this thread: a failure goes to the
        requests it concerns, is logged, and the loop goes on."""
        _lower_priority()  # ONNX Runtime runs part of each model run on this thread
        while not self._closed:
            snapshot: list[_Item] = []
            try:
                snapshot = self._take_snapshot() or []
                if snapshot:
                    self._dispatch(snapshot)
            except Exception as exc:
                log.exception("embedding dispatch failed", extra={"event": "engine_error"})
                self._fail(snapshot, exc)

    def _dispatch(self, snapshot: list[_Item]) -> None:
        model = snapshot[0].request.model
        runs = plan_runs([len(i.ids) for i in snapshot], [i.request.cap for i in snapshot], self.batching)
        for number, run in enumerate(runs, 1):
            items = [snapshot[i] for i in run if not snapshot[i].request.abandoned]
            if not items:
                continue
            self._burst_tokens = max(self._burst_tokens, len(items) * max(len(item.ids) for item in items))
            release = number == len(runs) and not self._queue and self._burst_tokens >= RELEASE_AFTER_TOKENS
            if release:
                self._burst_tokens = 0
            self._run(model, items, release=release)
        self._untrimmed = True

    async def count_tokens(self, model: ModelFiles, texts: Sequence[str]) -> int:
        """How many tokens the model would run on for these texts (special tokens included, after
        truncation), as ``usage`` counts them: for texts whose vectors come from elsewhere (a cache)."""
        sequences = await asyncio.get_running_loop().run_in_executor(
            self._tokenizers, lambda: self._runtime(model).tokenize(list(texts)))
        return sum(len(ids) for ids in sequences)

    @property
    def queue_depth(self) -> int:
        """Inputs tokenised and waiting for a model run."""
        return len(self._queue)

    @property
    def alive(self) -> bool:
        """Whether the engine can serve: open, with its dispatcher thread running."""
        return not self._closed and self._dispatcher.is_alive()

    def _ensure_dispatcher(self) -> None:
        """Restart the dispatcher if it ever stopped (lock held); it is not meant to, so say so."""
        if not self._closed and not self._dispatcher.is_alive():
            log.error("the embedding dispatcher had stopped; restarting it", extra={"event": "engine_restart"})
            self.stats.restarts += 1
            self._dispatcher = threading.Thread(target=self._dispatch_loop, name="embed-dispatch", daemon=True)
            self._dispatcher.start()

    @staticmethod
    def _fail(items: list[_Item], exc: BaseException) -> None:
        for request in {id(item.request): item.request for item in items}.values():
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                request.future.set_exception(exc)

    def _run(self, model: ModelFiles, items: list[_Item], *, release: bool) -> None:
        """One model run; ``release``: a burst of large runs ends with it, so the arena is shrunk after it."""
        try:
            runtime = self._runtime(model)
            vectors = runtime.run([item.ids for item in items], release=release)
        except Exception as exc:  # deliver any failure to the callers, keep serving others
            self._fail(items, exc)
            return
        finally:
            self._run_ended = time.monotonic()
        width = max(len(item.ids) for item in items)
        self.stats.runs += 1
        self.stats.sequences += len(items)
        self.stats.tokens += sum(len(item.ids) for item in items)
        self.stats.padded_tokens += width * len(items)
        self.stats.run_rows[len(items)] = self.stats.run_rows.get(len(items), 0) + 1
        for item, vector in zip(items, vectors, strict=True):
            request = item.request
            if request.abandoned:
                continue
            if request.out is None:
                request.out = np.empty((request.size, vectors.shape[1]), np.float32)
            request.out[item.index] = vector
            request.remaining -= 1
            if request.remaining == 0:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    request.future.set_result(request.out)

    # ---- shutdown ---------------------------------------------------------------------

    async def close(self) -> None:
        """Stop accepting work, fail queued requests with EngineClosed, free all models."""
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)

    def close_sync(self) -> None:
        with self._wakeup:
            self._closed = True
            queued, self._queue = self._queue, deque()
            self._wakeup.notify_all()
        self._fail(list(queued), EngineClosed("the embedding engine is shut down"))
        self._dispatcher.join()
        self._tokenizers.shutdown(wait=True)
        self._builder.shutdown(wait=True)
        with self._load_lock:
            self._runtimes.clear()
        _return_freed_memory()


def _lower_priority() -> None:
    """Run this thread under SCHED_IDLE: model work then yields the CPU to the event loop that relays
    every session (and to the server's backends), and takes what is left. Linux: the policy is per
    thread and inherited by the threads it starts. Elsewhere, MODEL_NICENESS steps nicer."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + MODEL_NICENESS))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_freed_memory() -> None:
    """Ask glibc to hand freed arenas back to the OS, so unloading shows in resident memory."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.malloc_trim(0)
