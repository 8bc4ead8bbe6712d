#!/usr/bin/env bash
# The GPU check, in two calls of at most 5 minutes each on the lent GPU machine (docs/speed.md, "The GPU check"):
#
#     bash scripts/gpu_check.sh --part 1     # training: each script at batch 64, 400², AMP off and on; torchrun;
#                                            # resumes (CPU checkpoint on CUDA, fp16); dtypes; memory at step 50/200
#     bash scripts/gpu_check.sh --part 2     # smoothing chain to scan.py --certify; the loader on 2,000 JPEGs;
#                                            # bench.py --quick; the step profile (syncs per step, channels_last)
#
# The image lacks kornia, lpips and pyautoattack: `make wheelhouse` here puts their wheels in .whl/ (7 MB); carry
# .whl and this script installs them into a temporary folder when the image cannot import them. Rows go to $OUT
# (gpu_check_part<N>.jsonl) as soon as each is known. Extra flags go to scripts/gpu_check.py (--steps, --only,
# --budget). Uses .venv/bin/python when there is one (make install), else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import kornia, lpips, pyautoattack" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "GPU check preflight failed: kornia, lpips or pyautoattack is missing and there is no .whl/ folder:" \
             "run 'make wheelhouse' here and carry .whl"
        exit 2
    fi
    SITE=$(mktemp -d /tmp/deepraft_site.XXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "GPU check preflight failed: the wheels in .whl/ would not install into $SITE"; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" scripts/gpu_check.py "$@"
