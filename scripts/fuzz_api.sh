#!/usr/bin/env bash
# R4: property-based fuzzing of the server's published OpenAPI schema with schemathesis.
# Starts a synthetic server on a free port, runs every check against it, stops it.
#   ./scripts/fuzz_api.sh [max-examples per operation, default 200] [extra server overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}; shift || true
PY=${PYTHON:-.venv/bin/python}
ST=${ST:-$(dirname "$PY")/st}
dir=$(mktemp -d)
"$PY" -m actdata.serve +preset=test generator.source=synthetic server.port=0 server.log_file="$dir/server.log" \
  server.ready_file="$dir/ready.json" "$@" >"$dir/console.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 600); do [ -f "$dir/ready.json" ] && break; kill -0 $pid 2>/dev/null || { cat "$dir/console.log"; exit 1; }; sleep 0.1; done
url=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['url'])" "$dir/ready.json")
echo "fuzzing $url/openapi.json with $N examples per operation"
"$ST" run "$url/openapi.json" --checks all -n "$N" --request-timeout 30 --report-dir "$dir/report"
