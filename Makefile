# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_NAME ?= demo
# The demo: a short baseline run on CPU on the photos scikit-image ships (see docs/demo.md).
DEMO_FLAGS ?= --recipe robust_v1 --image_size 64 --eval_size 128 --batch_size 8 --max_step 3000 --scanner narrow --lr 3e-4 \
	--img_w 8 --ramp_steps 1000 --val_every 500 --save_every 500 --device cpu

.PHONY: demo test install clean-demo mutation wheelhouse

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) train.py --run_name $(DEMO_NAME) $(DEMO_FLAGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q tests

# The wheels the lent GPU machine lacks (kornia, kornia-rs, lpips, pyautoattack for Python 3.12), into .whl/ for
# scripts/gpu_check.sh: see docs/speed.md, "The GPU check".
wheelhouse:
	bash scripts/wheelhouse.sh .whl

clean-demo:
	rm -rf results/$(DEMO_NAME)

# Mutation testing (not in CI: about 7 minutes on two CPU cores; see docs/testing.md). mutmut changes one thing at a
# time in the code where a silent change costs most (the statistics, the detection tables, the losses, the
# training step, the recipes) and runs the tests that reach it; scripts/mutation_report.py counts what survived.
MUTANTS ?= "smoothing.core.*" "smoothing.sequential.*" "smoothing.noise.*" "smoothing.certify.x_certif*" \
	"report.calibration.*" "report.detection.*" \
	"engine.losses.x_*yuv*" "engine.losses.x__linear_colour*" "engine.losses.x_residual_regularisation*" \
	"engine.losses.x_perceptual_loss*" "engine.losses.x_pair_labels*" "engine.recipes.*" \
	"engine.training.x*Trainer*step__*" "engine.training.x*Trainer*_train_mode*" "engine.training.x*_Pair*forward*" \
	"engine.training.x_ramp*" "engine.training.x_image_loss_ramp*" "engine.training.x_plain_view*" \
	"engine.training.x_combine_views*"
MUTATION_CHILDREN ?= $(shell nproc)

mutation: $(VENV)/.installed-dev
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN) $(MUTANTS) > mutation.log 2>&1; \
		status=$$?; tail -c 400 mutation.log | tr '\r' '\n' | tail -n 3; test $$status -eq 0
	$(PY) scripts/mutation_report.py $(MUTANTS) | tee mutation-report.txt
