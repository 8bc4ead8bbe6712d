#!/usr/bin/env bash
# The wheelhouse for the GPU machine (see docs/speed.md, "The GPU check"): downloads here, into .whl/, the wheels of
# the packages this project imports that the lent GPU image lacks (Python 3.12, torch 2.11, torchvision 0.26, no
# kornia, lpips or pyautoattack), at the versions requirements.txt pins. scripts/gpu_check.sh installs them into a
# temporary folder at the start of each call when the image cannot import them. Everything else the project imports
# (numpy, scipy, scikit-image, pillow, torchmetrics, tensorboard, tqdm, safetensors, matplotlib) is in that image.
#
#     make wheelhouse            # or: bash scripts/wheelhouse.sh [FOLDER]
#
# pyautoattack's wheel is 42 MB, 45 MB of it (unpacked) an example model that nothing imports; a call carries 64 MiB
# with the working tree (about 36 MB), so scripts/slim_wheel.py drops the examples (RECORD rewritten to match).
# The result is about 7 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
pin() { sed -n "s/^$1==\(.*\)$/\1/p" requirements.txt; }
# kornia-rs: kornia 0.9.0's one compiled dependency (kornia-rs>=0.2.0); 0.2.0 is what pip resolves here with it.
PACKAGES=("kornia==$(pin kornia)" "kornia-rs==0.2.0" "lpips==$(pin lpips)" "pyautoattack==$(pin pyautoattack)")
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${PACKAGES[@]}"
"$PY" scripts/slim_wheel.py "$DEST"/pyautoattack-*.whl --drop /examples/
ls -l "$DEST"
du -sh "$DEST"
