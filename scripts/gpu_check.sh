#!/usr/bin/env bash
# The GPU check (issue 10), one run of a few minutes on a machine with a CUDA GPU, from the repository root:
#   1. scripts/gpu_check.py: device placement (two generators on two GPUs when there are two, else
#      generator index 1 on cuda:0), dtype auto = bf16 and fp32 -> TF32, bf16 model -> float32 and float16
#      buffers, outlier filter on the device, compile, blocking copy events, stop with a full buffer,
#      memory freed on restart, a poisoned context ending the process, memory estimate vs peak and the
#      refusal of a config that cannot fit, copy/forward overlap under the profiler (goal <= 10 % of GPU
#      time outside the forward), tokens/s of a ~1.2B Llama into the buffer / its bare forward stopped at
#      the same block (goal >= 0.95). It prints a table and fails if any check fails.
#   2. the model tests with a CUDA variant and the CPU stand-ins of the same design (tests/test_gpu_path.py).
# Exits non-zero on any failure. Environment: PYTHON (default: python), TESTS=0 skips step 2.
set -uo pipefail
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

$PY -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', ok,
        torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 1)" || { echo "no CUDA GPU"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv

status=0
$PY scripts/gpu_check.py --device cuda:0 || status=1
if [ "${TESTS:-1}" != 0 ]; then
  $PY -m pytest -q -x tests/test_model_source.py -k "cuda" tests/test_gpu_path.py || status=1
fi
[ $status = 0 ] && echo "GPU check: all passed" || echo "GPU check: FAILED (see above)"
exit $status
