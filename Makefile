# `make test` and `make demo` set themselves up from nothing: they create .venv,
# install torch/torchvision (the pinned builds this machine carries) and the
# package, then run. The install is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mnpo-installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo-output

.PHONY: test test-matrix demo install clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2

# Chromium for the browser tests (tests/browser.py): apt-get installs it when missing and we
# are root; otherwise those tests skip. Never fails the make run.
CHROMIUM_FOUND := test -x /usr/bin/chromium || command -v chromium || command -v chromium-browser || command -v google-chrome
browser:
	@if { $(CHROMIUM_FOUND); } >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "browser: Chromium not found; installing it with apt-get for the browser tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	    || echo "browser: warning: installing Chromium failed; the browser tests will be skipped"; \
	else \
	  echo "browser: Chromium not found; the browser tests will be skipped (install it: apt-get install chromium)"; \
	fi

# The numerics-heavy tests again under every lower CPU kernel path this machine has
# (ATEN_CPU_CAPABILITY, with oneDNN and MKL capped alike) and with all cores in one process.
test-matrix: $(STAMP)
	$(PY) tests/capability_matrix.py

# The demo (mnpo demo): a synthetic 'parts' set, a reduced-width MNPO trained on the CPU,
# CAM vs MNPO vs MNPOs under both protocols (report.md, gallery.png); then the same
# checkpoint through `mnpo evaluate` (maps saved in wsolevaluation's layout), those maps
# through `mnpo evaluate-maps`, `mnpo localize` on a few test images, and last `mnpo report`:
# demo-output/report.html compares CAM, MNPO and MNPOs from the demo's results files.
DEMO_DATA := $(DEMO_DIR)/parts
demo: $(STAMP)
	$(VENV)/bin/mnpo demo --out $(DEMO_DIR)
	$(VENV)/bin/mnpo evaluate -q --checkpoint $(DEMO_DIR)/run/best.pt --data $(DEMO_DATA)/images \
	  --metadata $(DEMO_DATA)/metadata/test --val-metadata $(DEMO_DATA)/metadata/val --input-size 64 \
	  --method mnpos --workers 0 --save-maps $(DEMO_DIR)/maps/mnpos --json $(DEMO_DIR)/evaluate-mnpos.json
	$(VENV)/bin/mnpo evaluate-maps -q --maps $(DEMO_DIR)/maps/mnpos --metadata $(DEMO_DATA)/metadata/test
	$(VENV)/bin/mnpo localize --checkpoint $(DEMO_DIR)/run/best.pt --input-size 64 --method mnpos \
	  --out $(DEMO_DIR)/localize $(DEMO_DATA)/images/test/*/*_0000.png
	$(VENV)/bin/mnpo report $(DEMO_DIR)/results/cam.npz $(DEMO_DIR)/results/mnpo.npz \
	  $(DEMO_DIR)/results/mnpos.npz --out $(DEMO_DIR)/report.html

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
