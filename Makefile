# `make test` and `make demo` set themselves up from nothing: they create .venv,
# install torch/torchvision (the pinned builds this machine carries) and the
# package, then run. The install is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mnpo-installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo-output

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# The demo: a synthetic 'parts' set, two model-free baseline maps for val and
# test, and the evaluation engine on them (boxes with both protocols, PxAP).
DEMO_DATA := $(DEMO_DIR)/parts
demo: $(STAMP)
	$(VENV)/bin/mnpo synth --out $(DEMO_DATA) --preset parts --image-size 96 --classes 4 --seed 0
	for split in val test; do \
	  $(PY) examples/baseline_maps.py --metadata $(DEMO_DATA)/metadata/$$split --method center \
	    --out $(DEMO_DIR)/maps/center/$$split && \
	  $(PY) examples/baseline_maps.py --metadata $(DEMO_DATA)/metadata-masks/$$split \
	    --mask-root $(DEMO_DATA)/masks --method blurred-mask --out $(DEMO_DIR)/maps/blurred-mask/$$split \
	  || exit 1; \
	done
	for method in center blurred-mask; do \
	  echo "== $$method maps, boxes (test; thresholds calibrated on val) =="; \
	  $(VENV)/bin/mnpo evaluate-maps -q --maps $(DEMO_DIR)/maps/$$method/test --metadata $(DEMO_DATA)/metadata/test \
	    --val-maps $(DEMO_DIR)/maps/$$method/val --val-metadata $(DEMO_DATA)/metadata/val \
	    --json $(DEMO_DIR)/$$method-boxes.json || exit 1; \
	  echo "== $$method maps, masks (test) =="; \
	  $(VENV)/bin/mnpo evaluate-maps -q --maps $(DEMO_DIR)/maps/$$method/test \
	    --metadata $(DEMO_DATA)/metadata-masks/test --mask-root $(DEMO_DATA)/masks \
	    --json $(DEMO_DIR)/$$method-masks.json || exit 1; \
	done

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
