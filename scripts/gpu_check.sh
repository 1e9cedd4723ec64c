#!/usr/bin/env bash
# One command for the GPU paths, one table at the end (about 5-8 minutes on one GPU):
#   bash scripts/gpu_check.sh                  # on a CUDA machine: default job, SmolLM2 bf16 (NCCL,
#                                              # one rank), bench/speed.py --device cuda with MFU,
#                                              # generate and merge on the GPU
#   bash scripts/gpu_check.sh --device cpu     # dry run of the same steps on CPU, tiny sizes
#   PROPULSION_SMOLLM2=/path/SmolLM2-135M-Instruct bash scripts/gpu_check.sh   # a machine without network
# Options: --work DIR (keep the logs there), --skip tiny|smollm2|bench|generate|merge ...
# Exit status 0 when every step passed. Steps are in scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
exec timeout --signal=TERM "${GPU_CHECK_TIMEOUT:-900}" "${PYTHON:-python}" scripts/gpu_check.py "$@"
