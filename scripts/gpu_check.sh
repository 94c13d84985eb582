#!/usr/bin/env bash
# The GPU check, from the repository root, in one device session of under 10 minutes:
#   scripts/gpu_check.sh [--device cuda:0] [--small] [--only a,b] [--timeout S]   (arguments go to gpu_check.py)
# It runs scripts/gpu_check.py (what each check proves is in its docstring), every check in a child
# process with its own time limit, and prints one table: check, figure, limit, PASS/FAIL/SKIP.
# Needs `.gpu_check/` from scripts/gpu_check_prepare.py (made here when this machine can, else carry it).
# `--device cpu --small` runs the CPU-capable checks in about half a minute (the test suite does).
# Environment: PYTHON (default: python), LIMIT_S (whole run, default 570 s). Exits non-zero on any failure.
set -uo pipefail
PY=${PYTHON:-python}
LIMIT_S=${LIMIT_S:-570}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
# the corpus where actdata's embedded-data lookup finds it, without the package that ships it
export PYTHONPATH="$PWD:$PWD/.gpu_check/site${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -f .gpu_check/tiny/config.json ]; then
  timeout 120 "$PY" scripts/gpu_check_prepare.py || { echo "no .gpu_check/ and it cannot be made here"; exit 2; }
fi
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=index,name,uuid,memory.used,memory.total \
  --format=csv 2>/dev/null
timeout --kill-after=10 "$LIMIT_S" "$PY" scripts/gpu_check.py "$@"
status=$?
[ $status = 124 ] && echo "GPU check: the whole run passed ${LIMIT_S} s and was ended"
[ $status = 0 ] && echo "GPU check: all passed" || echo "GPU check: FAILED (see the table)"
exit $status
