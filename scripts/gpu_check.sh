#!/usr/bin/env bash
# The GPU check (about 8 minutes on one GPU, plus the step profile: not yet timed, estimated 2-3 minutes): each
# training script with --recipe original at batch 64 on 400x400 for 200 steps, AMP off and on; torchrun with one
# process; evaluate.py --quick; bench.py --quick; the step profile (each script and recipe, channels_last on and
# off: host-device syncs per step and images/s). Prints images/s and peak GPU memory per entry and exits 1 if any
# entry failed. Extra flags go to scripts/gpu_check.py (e.g. --steps 100, or --only "step profile" for the
# profile alone). Uses .venv/bin/python when there is one (make install), else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
