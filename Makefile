# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_NAME ?= demo
# The demo: a short baseline run on CPU on the photos scikit-image ships (see docs/demo.md).
DEMO_FLAGS ?= --recipe robust --image_size 64 --eval_size 128 --batch_size 8 --max_step 3000 --scanner narrow --lr 3e-4 \
	--img_w 8 --ramp_steps 1000 --val_every 500 --save_every 500 --device cpu

.PHONY: demo test install clean-demo

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

clean-demo:
	rm -rf results/$(DEMO_NAME)
