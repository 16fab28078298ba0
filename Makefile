# Two commands do everything on a fresh machine (2 CPU cores, no GPU, package registries only):
#   make demo   - install, then the end-to-end demo (ELPV + EfficientNet-Lite0:
#                 train -> export -> INT8 -> serve over ZeroMQ with Prometheus metrics)
#   make test   - install (Python packages and the system tools the tests use), then the tests
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
EXTRAS  ?= train,dev,msgpack,deploy,fleet,openvino
# Debian packages some tests drive for real: promtool + Prometheus server, ffmpeg (RTSP/MJPEG
# camera streams), systemd-analyze (unit verification).
APT_PKGS ?= prometheus ffmpeg systemd
DEMO_ARGS ?=
TEST_ARGS ?=

.PHONY: install system-deps demo test test-all lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

system-deps:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system tools:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    systemctl disable --now prometheus >/dev/null 2>&1 || true; \
	  else \
	    echo "note: missing$$missing (apt-get install$$missing as root); tests that need them are skipped"; \
	  fi; \
	fi

demo: install
	$(VENV)/bin/defectscope demo $(DEMO_ARGS)

# Lint coverage. ruff check: training/, calibration/ (less the TensorRT engine and gate files),
# bench/ (less bench_runtime.py) and defectscope/demo.py. ruff format --check and mypy: the
# modules listed in TYPED_PATHS. Widen a list to cover more of the tree.
LINT_PATHS ?= training calibration/__init__.py calibration/calibrator.py calibration/calibset.py \
	calibration/cli.py calibration/evaluate.py calibration/export.py calibration/fallback.py \
	calibration/pipeline.py calibration/provenance.py calibration/quantize.py calibration/speed.py \
	bench/bench_calibration.py bench/bench_ewc.py bench/bench_int8_reference.py bench/bench_recipes.py \
	bench/bench_train_step.py bench/bench_training.py bench/recipe_errors.py defectscope/demo.py
TYPED_PATHS ?= training/engine.py training/tasks.py training/extend_run.py training/heads.py training/replay.py training/persample.py \
	training/extend_config.py training/ewc.py training/config.py training/schedule.py training/metrics.py \
	training/trainer.py training/extend_cli.py training/extend.py training/cli.py training/evaluate.py \
	runtime/tta.py runtime/preprocess.py

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(TYPED_PATHS)
	$(VENV)/bin/mypy --follow-imports=silent $(TYPED_PATHS)

test: install system-deps
	$(PY) -m pytest $(TEST_ARGS)

test-all: install system-deps
	$(PY) -m pytest -m "slow or not slow" $(TEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache demo-out
