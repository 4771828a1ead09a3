#!/usr/bin/env bash
# Create bench/.venv with the project (editable) and the benchmarks' requirements; idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv"
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$here/requirements.txt" -nt "$stamp" ] || [ "$here/../pyproject.toml" -nt "$stamp" ]; then
  "${PYTHON:-python3.11}" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -e "$here/.." -r "$here/requirements.txt"
  touch "$stamp"
fi
