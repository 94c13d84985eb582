#!/usr/bin/env bash
# Set up (if needed) and run the server: the embedded SmolLM2 on the embedded corpus, test preset.
# Extra arguments are Hydra overrides, e.g. ./scripts/serve.sh server.port=9000 generator.source=synthetic
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m actdata.serve +preset=test "$@"
