"""``defectscope reload``: SIGHUP a running daemon; with ``--wait``, report whether the swap worked."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from runtime.config.station import ConfigError, load_config


class _Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_reloads(url: str) -> dict[str, float] | None:
    """``defectscope_model_reloads_total`` by result from a /metrics URL; None when unreachable."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out = {"success": 0.0, "failure": 0.0}
    for fam in text_string_to_metric_families(text):
        if fam.name == "defectscope_model_reloads":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[s.labels.get("result", "")] = s.value
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="defectscope reload",
        description="Ask a running daemon to reload the model bundle named in its config (SIGHUP). The old model "
        "keeps serving if the new bundle is invalid. Exit 0 = signalled (or reloaded with --wait), "
        "1 = reload failed, 3 = no answer within --wait seconds.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help="station TOML: the pid comes from [daemon] pid_file, --wait uses [metrics]")
    g.add_argument("--pid", type=int, help="process id of the daemon")
    g.add_argument("--pid-file", help="file holding the daemon's pid")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the result (needs --config or --metrics-url)",
    )
    p.add_argument("--metrics-url", help="the daemon's /metrics URL (default: from the config's [metrics])")
    return p


def _target(args: argparse.Namespace) -> tuple[int, str | None, str | None]:
    """(pid, pid file, /metrics URL) from the arguments; _Fail when they lead nowhere."""
    url, pid_file = args.metrics_url, args.pid_file
    if args.config:
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            raise _Fail(2, str(exc)) from None
        if cfg.daemon.pid_file is None:
            raise _Fail(2, f"{args.config}: key 'daemon.pid_file' is not set; use --pid")
        pid_file = str(cfg.daemon.pid_file)
        if url is None:
            host = "127.0.0.1" if cfg.metrics.host in ("0.0.0.0", "", "::") else cfg.metrics.host
            host = f"[{host}]" if ":" in host else host
            url = f"http://{host}:{cfg.metrics.port}/metrics"
    pid = args.pid
    if pid is None:
        assert pid_file is not None
        try:
            pid = int(Path(pid_file).read_text().strip())
        except (OSError, ValueError) as exc:
            raise _Fail(1, f"{pid_file}: no readable pid ({exc}); is the daemon running?") from None
    return pid, pid_file, url


def _wait(pid: int, url: str, before: dict[str, float], seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = read_reloads(url)
        if now is not None:
            if now["failure"] > before["failure"]:
                print(
                    f"reload of process {pid} FAILED; the previous model keeps serving (see its log)", file=sys.stderr
                )
                return 1
            if now["success"] > before["success"]:
                print(f"process {pid} reloaded its model")
                return 0
        time.sleep(0.2)
    print(f"defectscope reload: no result from process {pid} within {seconds:g}s", file=sys.stderr)
    return 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        pid, pid_file, url = _target(args)
    except _Fail as exc:
        print(f"defectscope reload: {exc}", file=sys.stderr)
        return exc.code
    before = read_reloads(url) if (url and args.wait > 0) else None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"defectscope reload: no process {pid}" + (f" (stale {pid_file})" if pid_file else ""), file=sys.stderr)
        return 1
    except PermissionError:
        print(f"defectscope reload: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    if args.wait <= 0:
        print(f"sent SIGHUP to {pid}")
        return 0
    if before is None or url is None:
        print(
            f"defectscope reload: sent SIGHUP to {pid}, but cannot read {url} to wait for the result", file=sys.stderr
        )
        return 3
    return _wait(pid, url, before, args.wait)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
