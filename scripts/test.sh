#!/usr/bin/env bash
# Set up (if needed) and run the test suite, test files spread over two processes (most tests wait on
# servers in subprocesses, so two share a 2-core machine well). Extra arguments go to pytest (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
