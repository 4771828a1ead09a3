"""ONNX Runtime thread settings (the extension's three settings) and how a session uses them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnxruntime as ort


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class EngineSettings:
    """intra_op_parallelism: threads inside one operator (default: all CPUs);
    inter_op_parallelism: operators run in parallel (default 1, i.e. sequential execution);
    spin_control: let idle pool threads spin for new work within a run (lower latency, more CPU).
    Spinning always stops when a run ends: threads left spinning burned ~4 ms of a core in the 5 ms
    after every run, the moment the server and a pooler need the CPU to store the answer."""

    intra_op_parallelism: int
    inter_op_parallelism: int = 1
    spin_control: bool = True

    def __post_init__(self) -> None:
        for name in ("intra_op_parallelism", "inter_op_parallelism"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def default(cls) -> EngineSettings:
        return cls(intra_op_parallelism=available_cpus())

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_parallelism
        options.inter_op_num_threads = self.inter_op_parallelism
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if self.inter_op_parallelism > 1 else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        spin = "1" if self.spin_control else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Activations come from ORT's arena, not from malloc tensor by tensor: glibc kept the freed
        # tensors of runs (its mmap threshold rises to the size of the last one freed), 350-900 MB at
        # the peak of a long batch. The arena is the process's shared one (runtime.py), grown by
        # exactly what a run asks for and shrunk after a burst of runs; initialisers stay outside it,
        # so unloading a model frees them. No memory patterns: batch shapes rarely repeat, and a
        # pattern's one block for a shape comes on top of the pieces its first run left in the arena.
        options.enable_cpu_mem_arena = True
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.use_env_allocators", "1")
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        options.log_severity_level = 3  # errors only: fused-op notices are not for users
        return options
