# Two commands do everything on a fresh machine (2 CPU cores, no GPU, package registries only):
#   make demo   - install, then the end-to-end demo (ELPV + EfficientNet-Lite0:
#                 train -> export -> INT8 -> serve over ZeroMQ with Prometheus metrics)
#   make test   - install (Python packages and the system tools the tests use), then the tests
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
EXTRAS  ?= train,dev,msgpack,deploy,fleet,openvino,console,plc
# Debian packages some tests drive for real: promtool + Prometheus server, ffmpeg (RTSP/MJPEG
# camera streams), systemd-analyze (unit verification), Chromium headless shell (console browser
# tests, driven by Playwright), PostgreSQL (console results store tests), nginx (the console behind a
# real TLS reverse proxy), a real RTSP camera (GstRtspServer under the system python3:
# tests/runtime/rtsp_server.py); GStreamer cameras through PyGObject
# (tests/runtime/test_source_gstreamer.py puts Debian's gi alone on the venv's path).
APT_PKGS ?= prometheus ffmpeg systemd chromium chromium-headless-shell chromium-driver postgresql nginx
RTSP_PKGS ?= gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gst-1.0 gir1.2-gst-plugins-base-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
DEMO_ARGS ?=
TEST_ARGS ?=

.PHONY: install system-deps demo test test-all lint bench gpu-check clean

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
	/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0'); gi.require_version('Gst', '1.0'); gi.require_version('GstApp', '1.0'); \
	  from gi.repository import Gst; Gst.init(None); assert Gst.ElementFactory.find('rtpjpegpay')" >/dev/null 2>&1 \
	  || missing="$$missing $(RTSP_PKGS)"; \
	[ -x /usr/lib/chromium/chromium-headless-shell ] || missing="$$missing chromium chromium-headless-shell chromium-driver"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system tools:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    systemctl disable --now prometheus >/dev/null 2>&1 || true; \
	    systemctl disable --now postgresql >/dev/null 2>&1 || true; \
	    systemctl disable --now nginx >/dev/null 2>&1 || true; \
	  else \
	    echo "note: missing$$missing (apt-get install$$missing as root); tests that need them are skipped"; \
	  fi; \
	fi

demo: install
	$(VENV)/bin/defectscope demo $(DEMO_ARGS)

# Lint coverage. lint-imports: the package import rules ([tool.importlinter] in pyproject.toml,
# stated in docs/contracts.md). ruff check: every package and the tests. ruff format
# --check: TYPED_PATHS and the tests. mypy: TYPED_PATHS (every package, whole).
LINT_TESTS ?= tests
LINT_PATHS ?= training calibration runtime deploy bench defectscope $(LINT_TESTS)
TYPED_PATHS ?= training calibration defectscope bench runtime deploy



# On a CUDA machine (Jetson or x86 NVIDIA): TensorRT FP16/INT8 engines of the demo bundles, their gates,
# bare and daemon speed against ONNX Runtime CUDA/CPU, one table (bench/results/gpu_check.json).
# Elsewhere it exits 3 with "no CUDA device". GPU_CHECK_ARGS: e.g. --detector demo-det-out/bundle --uint8.
GPU_CHECK_ARGS ?=
gpu-check: install
	$(VENV)/bin/python bench/gpu_check.py $(GPU_CHECK_ARGS)

lint: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(TYPED_PATHS) $(LINT_TESTS)
	$(VENV)/bin/mypy --follow-imports=silent $(TYPED_PATHS)

test: install system-deps
	$(PY) -m pytest $(TEST_ARGS)

test-all: install system-deps
	$(PY) -m pytest -m "slow or not slow" $(TEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache demo-out
