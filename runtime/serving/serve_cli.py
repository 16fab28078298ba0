"""``defectscope serve``: run one station's daemon (signals, logging) or ``--check`` its config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

from runtime.config.station import ConfigError, StationConfig, load_config
from runtime.inference.model import ModelLoadError, load_model
from runtime.serving.daemon import Daemon
from runtime.serving.publisher import Publisher, PublisherError
from runtime.serving.service import port_free
from runtime.sources.gstreamer import check_gstreamer
from runtime.sources.readers import first_frame

log = logging.getLogger("defectscope.daemon")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps each line; elsewhere add the time.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="defectscope serve",
        description="Run the inspection daemon of one station: cameras in, verdicts out over ZeroMQ, "
        "Prometheus metrics and health on HTTP. SIGTERM drains and exits 0; SIGHUP reloads the model "
        "bundle named in the config (defectscope reload).",
    )
    p.add_argument("--config", required=True, help="station TOML (e.g. /etc/defectscope/line3.toml)")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the config, load + warm up the model, check that the metrics and publisher "
        "ports can be bound, every file/directory source has a readable frame and every GStreamer "
        "pipeline has a reader (PyGObject or OpenCV with GStreamer) and parses, print the "
        "resolved config and exit (1 if any check fails)",
    )
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default=None, help="override [daemon] log_level"
    )
    return p


def station_checks(cfg: StationConfig) -> dict[str, str | None]:
    """What ``serve`` needs besides the model, by config key: None = fine, else why not."""
    checks: dict[str, str | None] = {}
    if cfg.metrics.port:
        checks["metrics.port"] = port_free(cfg.metrics.host, cfg.metrics.port)
    try:
        Publisher(cfg.publisher).close(linger_s=0.0)
        checks["publisher.bind"] = None
    except PublisherError as exc:
        checks["publisher.bind"] = str(exc)
    for i, cam in enumerate(cfg.cameras):
        if cam.kind in ("directory", "video"):
            checks[f"cameras[{i}].source"] = first_frame(cam)
        elif cam.kind == "gstreamer":  # a reader exists here and the pipeline parses (not started)
            checks[f"cameras[{i}].source"] = check_gstreamer(cam)
    return checks


def check(cfg: StationConfig) -> int:
    try:
        model = load_model(cfg)
    except ModelLoadError as exc:
        print(f"defectscope serve: {exc}", file=sys.stderr)
        return 1
    try:
        checks = station_checks(cfg)
        report = {
            "config": cfg.to_dict(),
            "model": model.info,
            "frames_per_call": model.frames_per_call,
            "tta_views": model.tta.n_views,
            "min_frame_side": model.min_frame_side,
            "checks": {k: "ok" if v is None else v for k, v in checks.items()},
        }
    finally:
        model.close()
    print(json.dumps(report, indent=2))
    failed = {k: v for k, v in checks.items() if v is not None}
    for key, why in failed.items():
        print(f"defectscope serve: {cfg.source}: key '{key}': {why}", file=sys.stderr)
    return 1 if failed else 0


def serve(cfg: StationConfig, config_path: str) -> int:
    daemon = Daemon(cfg, config_path=config_path)
    interrupts = []

    def on_stop(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT:
            interrupts.append(signum)
            if len(interrupts) > 1:
                log.error("second interrupt: exiting without draining")
                os._exit(130)
        log.info("%s received: draining", signal.Signals(signum).name)
        daemon.request_stop()

    def on_hup(_signum: int, _frame: Any) -> None:
        log.info("SIGHUP received: reloading the model bundle")
        daemon.request_reload()

    previous = {
        sig: signal.signal(sig, handler)
        for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup))
    }
    try:
        try:
            daemon.start()
        except (ModelLoadError, PublisherError, OSError) as exc:
            log.error("cannot start: %s", exc)
            daemon.shutdown()
            return 1
        return daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """``defectscope serve``: exit 0 after a clean stop, 2 for a bad config, 1 when it cannot start."""
    args = serve_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"defectscope serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or cfg.daemon.log_level)
    return check(cfg) if args.check else serve(cfg, args.config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
