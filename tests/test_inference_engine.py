"""The embedding engine: batching, cancellation, timeouts, settings, unloading, the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from inference import (
    BatchingConfig,
    EmbeddingEngine,
    EmbeddingTimeout,
    EngineClosed,
    EngineSettings,
    ModelFiles,
    ModelFilesError,
)
from inference.engine import _return_freed_memory
from inference.runtime import ModelRuntime

from . import test_inference_fixtures as shared

data_dir, e5_q4 = shared.data_dir, shared.e5_q4  # session fixtures

LONG = "passage: " + " ".join(f"token{i}" for i in range(600))  # truncated to 512 tokens


@pytest.fixture
async def engine() -> AsyncIterator[EmbeddingEngine]:
    engine = EmbeddingEngine(EngineSettings.default(), BatchingConfig(max_wait_ms=50))
    yield engine
    await engine.close()


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def test_concurrent_callers_share_model_runs(engine: EmbeddingEngine, e5_q4: ModelFiles) -> None:
    texts = [f"query: question number {i} about topic {i * 7}" for i in range(16)]
    engine.load(e5_q4)
    before = engine.stats.runs
    results = await asyncio.gather(*(engine.embed(e5_q4, [text]) for text in texts))
    assert engine.stats.runs - before <= 2  # 16 callers, one (at most two) model runs
    alone = ModelRuntime(e5_q4, EngineSettings.default())
    for text, result in zip(texts, results, strict=True):
        assert result.shape == (1, 384)
        assert np.abs(result - alone.embed_texts([text])).max() < 1e-4


async def keep_company(engine: EmbeddingEngine, files: ModelFiles, callers: int = 8) -> None:
    """Callers that share a dispatch: the first dispatch is held until all of them are queued or taken
    (a caller starved on a busy machine would otherwise come after it, alone)."""
    gate, taken, dispatch = threading.Event(), [], engine._dispatch

    def held(snapshot: list) -> None:
        taken.append(len(snapshot))
        gate.wait(10)
        dispatch(snapshot)

    engine._dispatch = held  # type: ignore[method-assign]
    calls = asyncio.gather(*(engine.embed(files, [f"query: caller {i}"]) for i in range(callers)))
    for _ in range(1000):
        if sum(taken) + engine.queue_depth >= callers:
            break
        await asyncio.sleep(0.01)
    gate.set()
    await calls
    engine._dispatch = dispatch  # type: ignore[method-assign]


async def test_the_batching_window_is_waited_only_in_company(e5_q4: ModelFiles) -> None:
    """A lone caller after a lone caller runs at once; after a dispatch that served several callers,
    the next caller waits the window for others (a one-second window makes both plain)."""
    engine = EmbeddingEngine(EngineSettings.default(), BatchingConfig(max_wait_ms=1000))
    try:
        engine.load(e5_q4)

        async def seconds(*texts: str) -> float:
            started = time.perf_counter()
            await asyncio.gather(*(engine.embed(e5_q4, [text]) for text in texts))
            return time.perf_counter() - started

        assert await seconds("query: the first call") < 0.5
        assert await seconds("query: a lone call after a lone call") < 0.5
        before = engine.stats.runs
        await keep_company(engine, e5_q4)
        assert engine.stats.runs - before <= 2  # the first may go alone; the others share a run
        assert await seconds("query: after company") >= 0.9
        assert await seconds("query: alone again") < 0.5
    finally:
        await engine.close()


async def test_results_keep_input_order_and_batch_size_caps_runs(engine: EmbeddingEngine, e5_q4) -> None:
    texts = [f"passage: {'word ' * (i % 5)}item {i}" for i in range(10)]
    engine.load(e5_q4)
    before = engine.stats.runs
    vectors = await engine.embed(e5_q4, texts, batch_size=3)
    assert engine.stats.runs - before == 4  # ceil(10 / 3)
    singles = np.vstack([await engine.embed(e5_q4, [text]) for text in texts])
    assert np.abs(vectors - singles).max() < 1e-4


async def test_runs_respect_the_token_budget(e5_q4: ModelFiles) -> None:
    engine = EmbeddingEngine(EngineSettings.default(), BatchingConfig(max_wait_ms=0, max_batch_tokens=64))
    try:
        texts = [f"passage: {'alpha beta gamma ' * 5}{i}" for i in range(8)]
        await engine.embed(e5_q4, texts)
        assert engine.stats.runs >= 3
        assert engine.stats.padded_tokens <= 64 * engine.stats.runs
        assert engine.stats.sequences == 8
    finally:
        await engine.close()


def _peak_rss_reset() -> None:
    """Start a new high-water mark of resident memory (VmHWM) for this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        kb = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    return kb * 1024 / 1e6


async def test_a_long_batch_is_split_into_bounded_runs_with_the_same_vectors(e5_q4: ModelFiles) -> None:
    """32 texts of ~400 tokens in one call: split into runs of at most max_batch_tokens padded tokens,
    each vector as the text gets alone, and the batch's peak memory bounded (the arena's work: ~20 MB
    over the loaded engine; with a malloc per tensor, glibc kept freed activations: ~180 MB here)."""
    words = [f"w{i % 97}" for i in range(200)]
    texts = [f"passage: {i} " + " ".join(words[i:] + words[:i]) for i in range(32)]
    engine = EmbeddingEngine(EngineSettings.default(), BatchingConfig(max_wait_ms=0))
    try:
        engine.load(e5_q4)
        start_mb = _rss_mb()
        _peak_rss_reset()
        vectors = await engine.embed(e5_q4, texts)
        peak_mb = _peak_rss_mb() - start_mb
        runs, padded = engine.stats.runs, engine.stats.padded_tokens
        assert padded >= 32 * 400 and runs >= padded / engine.batching.max_batch_tokens
        assert padded <= runs * engine.batching.max_batch_tokens
        alone = np.vstack([await engine.embed(e5_q4, [text]) for text in texts[::4]])
        assert np.abs(vectors[::4] - alone).max() < 1e-4
        assert peak_mb < 100, peak_mb
    finally:
        await engine.close()


async def _busy(engine: EmbeddingEngine, files: ModelFiles) -> asyncio.Task:
    """Start a request of several long runs; return once its first run has finished."""
    before = engine.stats.runs
    task = asyncio.create_task(engine.embed(files, [LONG] * 8))
    while engine.stats.runs == before:
        await asyncio.sleep(0.005)
    return task


async def test_timeout_raises_and_drops_queued_work(engine: EmbeddingEngine, e5_q4: ModelFiles) -> None:
    engine.load(e5_q4)
    busy = await _busy(engine, e5_q4)
    started = time.monotonic()
    with pytest.raises(EmbeddingTimeout):
        await engine.embed(e5_q4, ["query: too late", "query: also too late"], timeout=0.05)
    assert time.monotonic() - started < 1.0
    assert engine.stats.dropped == 2
    await busy
    assert engine.stats.sequences == 8  # the timed-out inputs never ran


async def test_cancellation_drops_queued_work(engine: EmbeddingEngine, e5_q4: ModelFiles) -> None:
    engine.load(e5_q4)
    busy = await _busy(engine, e5_q4)
    victim = asyncio.create_task(engine.embed(e5_q4, ["query: never mind"]))
    await asyncio.sleep(0.05)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    await busy
    assert engine.stats.dropped == 1 and engine.stats.sequences == 8


async def test_event_loop_stays_responsive(engine: EmbeddingEngine, e5_q4: ModelFiles) -> None:
    engine.load(e5_q4)
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - started - 0.01)

    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    await engine.embed(e5_q4, [LONG] * 8)
    total = time.monotonic() - started
    tick.cancel()
    # Blocking the loop would show as one lag about as long as the whole call; a busy machine's
    # scheduling delays are shorter than that (an absolute bound would measure the machine, not us).
    assert len(lags) > 5 and max(lags) < total / 2


async def test_settings_take_effect_without_restart(engine: EmbeddingEngine, e5_q4: ModelFiles) -> None:
    text = ["query: thread settings"]
    engine.apply_settings(EngineSettings(intra_op_parallelism=1, inter_op_parallelism=1, spin_control=False))
    single = await engine.embed(e5_q4, text)
    threads_single = _threads()
    builds = engine.stats.session_builds
    engine.apply_settings(EngineSettings(intra_op_parallelism=4, inter_op_parallelism=1, spin_control=True))
    quad = await engine.embed(e5_q4, text)
    assert engine.stats.session_builds == builds + 1
    assert _threads() - threads_single >= 3  # ORT's intra-op pool: 3 workers beside the caller
    assert np.abs(single - quad).max() < 1e-5
    engine.apply_settings(EngineSettings(intra_op_parallelism=1))
    await engine.embed(e5_q4, text)
    assert _threads() == threads_single


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="intra_op_parallelism"):
        EngineSettings(intra_op_parallelism=0)
    assert EngineSettings.default().inter_op_parallelism == 1
    assert EngineSettings.default().spin_control is True


def test_threads_stop_spinning_when_a_run_ends(e5_q4: ModelFiles) -> None:
    """With spin_control on (the default), idle pool threads spun on after each run and burned most of a
    core while the server had to store the answer; now they may spin only within a run."""
    if os.cpu_count() == 1:
        pytest.skip("one CPU: ONNX Runtime has no pool threads to spin")
    runtime = ModelRuntime(e5_q4, EngineSettings.default())
    burned = []
    for _ in range(15):
        runtime.embed_texts(["query: how much protein should a female eat"])
        before = time.process_time()
        time.sleep(0.02)
        burned.append(time.process_time() - before)
    assert sorted(burned)[len(burned) // 2] < 0.004, burned  # spinning: 0.015-0.02 of the 0.02 s


async def test_unload_frees_the_model(engine: EmbeddingEngine, e5_q4: ModelFiles) -> None:
    assert not engine.is_loaded(e5_q4)
    _return_freed_memory()  # what building the model in this process freed would otherwise be reused
    base = _rss_mb()
    info = engine.load(e5_q4)
    assert info.dimensions == 384 and info.max_seq_length == 512 and info.pooled_in_graph
    loaded = _rss_mb()
    assert engine.is_loaded(e5_q4.uri)
    assert engine.unload(e5_q4) is True and not engine.is_loaded(e5_q4)
    assert engine.unload(e5_q4) is False
    freed = loaded - _rss_mb()
    assert loaded - base > 50 and freed > 0.7 * (loaded - base)  # session ~80 MB, tokenizer ~60 MB
    vector = await engine.embed(e5_q4, ["query: loads again on use"])
    assert vector.shape == (1, 384) and engine.is_loaded(e5_q4)


async def test_embed_sync_and_empty_input(engine: EmbeddingEngine, e5_q4: ModelFiles) -> None:
    sync = await asyncio.to_thread(engine.embed_sync, e5_q4, ["query: same", "query: twice"])
    asynchronous = await engine.embed(e5_q4, ["query: same", "query: twice"])
    assert np.abs(sync - asynchronous).max() < 1e-5
    assert (await engine.embed(e5_q4, [])).shape == (0, 384)


async def test_a_broken_model_fails_its_callers_only(engine: EmbeddingEngine, e5_q4: ModelFiles, tmp_path: Path):
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    (broken_dir / "model.onnx").write_bytes(b"not an onnx file")
    (broken_dir / "tokenizer.json").write_bytes(e5_q4.tokenizer_path.read_bytes())
    broken = ModelFiles("broken", broken_dir / "model.onnx", broken_dir / "tokenizer.json", None, 384, 512)
    with pytest.raises(ModelFilesError, match="ONNX Runtime cannot load"):
        await engine.embed(broken, ["x"])
    assert (await engine.embed(e5_q4, ["still fine"])).shape == (1, 384)


async def test_closed_engine_refuses_work(e5_q4: ModelFiles) -> None:
    engine = EmbeddingEngine()
    await engine.embed(e5_q4, ["warm"])
    await engine.close()
    with pytest.raises(EngineClosed):
        await engine.embed(e5_q4, ["too late"])
    assert not engine.is_loaded(e5_q4)


async def test_a_request_abandoned_in_the_batching_window_leaves_the_engine_serving(e5_q4: ModelFiles) -> None:
    """The queue empties under the dispatcher while it waits out the batching window (a caller timed
    out, or left): it must go back to waiting, not die, and later calls must be answered."""
    engine = EmbeddingEngine(EngineSettings.default(), BatchingConfig(max_wait_ms=300))
    try:
        engine.load(e5_q4)
        await keep_company(engine, e5_q4)  # from now on a lone caller waits the window (alone after alone would not)
        for _ in range(3):
            with pytest.raises(EmbeddingTimeout):
                await engine.embed(e5_q4, ["query: x"], timeout=0.05)
            await asyncio.sleep(0.4)  # past the window the abandoned item opened
        vectors = await engine.embed(e5_q4, ["query: check"], timeout=5)
        assert vectors.shape == (1, 384)
        assert engine.alive and engine.stats.restarts == 0
    finally:
        await engine.close()


async def test_a_dispatch_failure_fails_its_callers_and_the_engine_goes_on(
    engine: EmbeddingEngine, e5_q4: ModelFiles
) -> None:
    """Fault injection inside the dispatcher (not a stand-in for ONNX Runtime: the real model runs
    afterwards): the callers of that dispatch get the error, the next caller gets its vectors."""
    real_dispatch = engine._dispatch
    calls = 0

    def failing_once(snapshot: list) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected dispatch failure")
        real_dispatch(snapshot)

    engine._dispatch = failing_once  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected"):
        await engine.embed(e5_q4, ["query: first"], timeout=5)
    assert (await engine.embed(e5_q4, ["query: second"], timeout=5)).shape == (1, 384)
    assert engine.alive


async def test_a_stopped_dispatcher_is_restarted(engine: EmbeddingEngine, e5_q4: ModelFiles) -> None:
    """Even a BaseException that ends the dispatcher thread does not end the service: the engine
    reports itself not alive, and the next request restarts the thread and is served."""

    def stop_thread(snapshot: list) -> None:
        raise SystemExit  # ends only the thread it is raised in

    engine.load(e5_q4)
    engine._dispatch = stop_thread  # type: ignore[method-assign]
    with pytest.raises(EmbeddingTimeout):
        await engine.embed(e5_q4, ["query: lost"], timeout=0.5)
    engine._dispatcher.join(2)
    assert not engine.alive
    del engine._dispatch  # back to the class's own method
    assert (await engine.embed(e5_q4, ["query: served"], timeout=10)).shape == (1, 384)
    assert engine.alive and engine.stats.restarts == 1


async def test_model_work_runs_only_on_cpu_the_event_loop_leaves(e5_q4: ModelFiles) -> None:
    """Every thread the engine starts (its own and ONNX Runtime's) runs SCHED_IDLE; the caller's does not."""
    before = set(os.listdir("/proc/self/task"))
    engine = EmbeddingEngine(EngineSettings.default(), BatchingConfig(max_wait_ms=1))
    try:
        engine.load(e5_q4)
        await engine.embed(e5_q4, ["query: what runs when the loop is busy?"])
        started = set(os.listdir("/proc/self/task")) - before
        assert len(started) >= 3  # dispatcher, builder, tokenizer (and ONNX Runtime's pool)
        policies = {tid: os.sched_getscheduler(int(tid)) for tid in started}
        assert set(policies.values()) == {os.SCHED_IDLE}, policies
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        await engine.close()
