# Two commands do everything on a fresh machine (2 CPU cores, no GPU, package registries only):
#   make demo   - install, then the end-to-end demo (ELPV + EfficientNet-Lite0:
#                 train -> export -> INT8 -> serve over ZeroMQ with Prometheus metrics)
#   make test   - install (Python packages and the system tools the tests use), then the tests
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
EXTRAS  ?= train,dev,msgpack,deploy,fleet,openvino,console
# Debian packages some tests drive for real: promtool + Prometheus server, ffmpeg (RTSP/MJPEG
# camera streams), systemd-analyze (unit verification), Chromium headless shell (console browser
# tests, driven by Playwright), PostgreSQL (console results store tests), a real RTSP camera
# (GstRtspServer under the system python3: tests/runtime/rtsp_server.py).
APT_PKGS ?= prometheus ffmpeg systemd chromium chromium-headless-shell chromium-driver postgresql
RTSP_PKGS ?= gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gst-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
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
	/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0'); gi.require_version('Gst', '1.0'); \
	  from gi.repository import Gst; Gst.init(None); assert Gst.ElementFactory.find('rtpjpegpay')" >/dev/null 2>&1 \
	  || missing="$$missing $(RTSP_PKGS)"; \
	[ -x /usr/lib/chromium/chromium-headless-shell ] || missing="$$missing chromium chromium-headless-shell chromium-driver"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system tools:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    systemctl disable --now prometheus >/dev/null 2>&1 || true; \
	    systemctl disable --now postgresql >/dev/null 2>&1 || true; \
	  else \
	    echo "note: missing$$missing (apt-get install$$missing as root); tests that need them are skipped"; \
	  fi; \
	fi

demo: install
	$(VENV)/bin/defectscope demo $(DEMO_ARGS)

# Lint coverage. ruff check: every package. ruff format --check and mypy: the modules listed in
# TYPED_PATHS (the rest still has older type errors). Widen the list to cover more of the tree.
LINT_PATHS ?= training calibration runtime deploy bench defectscope
TYPED_PATHS ?= training/engine.py training/tasks.py training/extend_run.py training/heads.py training/replay.py training/persample.py \
	training/extend_config.py training/ewc.py training/config.py training/schedule.py training/metrics.py \
	training/trainer.py training/extend_cli.py training/extend.py training/cli.py training/evaluate_cli.py training/evaluate.py \
	training/distributed.py runtime/tta.py runtime/preprocess.py

# The runtime and the backbone modules.
TYPED_PATHS += training/backbones.py training/classifier.py training/weights.py training/backbone_lite.py \
	runtime/__init__.py runtime/backend_openvino.py runtime/backend_tensorrt.py runtime/backends.py \
	runtime/batcher.py runtime/boxes.py runtime/bundle.py runtime/bundle_cli.py runtime/bundle_fs.py \
	runtime/bundle_output.py runtime/bundle_stage.py runtime/config.py runtime/config_table.py runtime/config_types.py \
	runtime/daemon.py runtime/pipeline.py runtime/sources.py \
	runtime/decision.py runtime/engine_build.py runtime/engine_gate.py runtime/engine_meta.py runtime/fsio.py \
	runtime/messages.py runtime/metrics.py runtime/model.py runtime/model_store.py runtime/notify.py \
	runtime/preview.py runtime/publisher.py runtime/reload_cli.py runtime/serve_cli.py runtime/service.py \
	runtime/signature.py runtime/snapshots.py runtime/viewer.py runtime/image_header.py runtime/subscriptions.py bench/profile_detection_ops.py bench/bench_detection_ewc.py

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
