#!/usr/bin/env bash
# The exp3 GPU suite on the device machine, from the repository root:
#   bash experiments/exp3_whitebox/run_gpu_suite.sh "$OUT" [part ...]
# The GPU image lacks rpyc and plumbum: carry them as wheels in .whl/ (see the README) and they
# are installed into /tmp/site here. djinn_nb and experiments/ run from the working tree (no pip
# install): the suite runs as a module from the repository root.
set -uo pipefail
OUT_DIR="${1:?usage: run_gpu_suite.sh OUT_DIR [part ...]}"
shift
cd "$(dirname "$0")/../.."
if ! python3 -c "import rpyc" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "rpyc is missing and no wheels in .whl/: pip download --no-deps -d .whl rpyc==6.0.2 plumbum" >&2
    exit 3
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ "$#" -gt 0 ]; then
  exec python3 -m experiments.exp3_whitebox.run_gpu_suite --out "$OUT_DIR" --parts "$@"
fi
exec python3 -m experiments.exp3_whitebox.run_gpu_suite --out "$OUT_DIR"
