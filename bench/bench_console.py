"""Line console under load: S stations x C cameras x R verdicts/s from a load generator, one real console.

Measures what issues 24 and 28 ask: rows lost (published - in the store; target 0), the browsers keep
up (age of every tile's newest verdict in each of --browsers real headless Chromium pages, sampled
every second; target p99 <= 1 s), and the console process's CPU (% of one core, from /proc; target
<= 25 % at 4 x 4 x 30) and RSS, with alarm rules on (every kind, webhook to a local receiver).

  python bench/bench_console.py                       # 4 stations x 4 cameras x 30/s, 5 browsers, alarms, 30 s
  python bench/bench_console.py --stations 1 --cameras 1 --rate 5 --duration 3 --browsers 1   # smoke

The generator publishes realistic schema-1 messages (deploy/console/loadgen.py) on real ZeroMQ PUB
sockets from this process, writes a real JPEG snapshot for each defect/uncertain frame, and sends
heartbeats each second. Prints a table, writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.console.loadgen import FakeStation  # noqa: E402

CHROMIUM = "/usr/lib/chromium/chromium-headless-shell"
TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot_jpeg() -> bytes:
    import cv2
    import numpy as np

    img = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


class Generator(threading.Thread):
    """One station: its cameras' verdicts paced at ``rate`` each, heartbeats every second."""

    def __init__(
        self,
        station: FakeStation,
        cameras: int,
        rate: float,
        spool: Path,
        jpeg: bytes,
        defect_share: float,
        uncertain_share: float,
        stop: threading.Event,
    ) -> None:
        super().__init__(daemon=True, name=f"gen-{station.name}")
        self.st, self.cams, self.rate, self.spool, self.jpeg = (
            station,
            [f"cam{i + 1}" for i in range(cameras)],
            rate,
            spool,
            jpeg,
        )
        self.shares = (defect_share, uncertain_share)
        self.stop_event = stop
        self.rng = random.Random(hash(station.name) & 0xFFFF)

    def run(self) -> None:
        period = 1.0 / (self.rate * len(self.cams))
        nxt = time.monotonic()
        beat = 0.0
        seq = {c: 0 for c in self.cams}
        i = 0
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= beat:
                self.st.status({c: True for c in self.cams})
                beat = now + 1.0
            cam = self.cams[i % len(self.cams)]
            i += 1
            r = self.rng.random()
            verdict = "defect" if r < self.shares[0] else "uncertain" if r < sum(self.shares) else "ok"
            snap = None
            if verdict != "ok":
                name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.000000Z_{self.st.name}_{cam}_{seq[cam]:09d}_{verdict}.jpg"
                (self.spool / name).write_bytes(self.jpeg)
                snap = f"/var/spool/defectscope/{name}"
            self.st.verdict(cam, seq[cam], verdict, snapshot=snap)
            seq[cam] += 1
            nxt += period
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:  # fell a second behind: report it instead of bursting
                nxt = time.monotonic()


def _cpu_rss(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    cpu = (int(parts[11]) + int(parts[12])) / TICKS
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return cpu, rss


def _health(base: str) -> dict:
    return json.loads(urllib.request.urlopen(base + "/healthz", timeout=5).read())


ALARM_RULES = """
[alarms]
sound = true
webhook_urls = ["{url}"]
webhook_repeat_s = 5.0

[[alarms.rules]]
name = "defect rate"
kind = "defect_rate"
threshold = 0.01
window_s = 60.0

[[alarms.rules]]
name = "uncertain rate"
kind = "uncertain_rate"
threshold = 0.5

[[alarms.rules]]
name = "defects in a row"
kind = "defects_in_row"
count = 2

[[alarms.rules]]
name = "camera down"
kind = "camera_down"

[[alarms.rules]]
name = "station down"
kind = "station_down"

[[alarms.rules]]
name = "model fallback"
kind = "model_fallback"
"""


def _receiver() -> tuple[object, str, list[int]]:
    """A local HTTP server that counts the console's alarm webhook posts."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got = [0]

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length") or 0))
            got[0] += 1
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/alarms", got


def _write_config(
    path: Path,
    stations: list[FakeStation],
    spools: list[Path],
    store: str,
    port: int,
    coalesce_ms: int,
    alarm_url: str | None = None,
) -> None:
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "kiosk = true",
        f"coalesce_ms = {coalesce_ms}",
        "",
        "[store]",
        f"url = {json.dumps(store)}",
        "retention_days = 0",
        "",
    ]
    for st, spool in zip(stations, spools):
        lines += [
            "[[stations]]",
            f'name = "{st.name}"',
            f'endpoint = "{st.endpoint}"',
            f"snapshot_dir = {json.dumps(str(spool))}",
            "",
        ]
    path.write_text("\n".join(lines) + (ALARM_RULES.format(url=alarm_url) if alarm_url else ""))


def _start_console(cfg: Path, port: int, stations: list[FakeStation]) -> tuple[subprocess.Popen, str]:
    """The console as its own process (its CPU and RSS are what we measure), subscribed to every station."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "defectscope", "console", "--config", str(cfg), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            _health(base)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("console did not start") from None
            time.sleep(0.1)
    while _health(base)["received"]["status"] < len(stations):  # every SUB joined (slow-joiner)
        for st in stations:
            st.status({"cam1": True})
        time.sleep(0.1)
    return proc, base


TILE_AGES_JS = """() => {
  const now = Date.now() / 1000;
  return [...document.querySelectorAll('[data-tile]')].filter(t => t.dataset.captured)
    .map(t => now - parseFloat(t.dataset.captured));
}"""


def p99(values: list[float]) -> float | None:
    """The 99th percentile (None without samples)."""
    if not values:
        return None
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-console-"))
    store = args.store or f"sqlite:///{tmp / 'results.db'}"
    stations = [FakeStation(f"line{i + 1}") for i in range(args.stations)]
    spools = [tmp / f"spool-{s.name}" for s in stations]
    for sp in spools:
        sp.mkdir()
    port = _free_port()
    cfg = tmp / "console.toml"
    receiver, alarm_url, posts = _receiver() if not args.no_alarms else (None, None, [0])
    _write_config(cfg, stations, spools, store, port, args.coalesce_ms, alarm_url)
    proc, base = _start_console(cfg, port, stations)
    stop = threading.Event()
    pw = browser = None
    try:
        pages = []
        if args.browsers > 0:
            from playwright.sync_api import sync_playwright

            pw = sync_playwright().start()
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            for _ in range(args.browsers):  # separate contexts: separate sockets, like separate screens
                page = browser.new_context(viewport={"width": 1920, "height": 1080}).new_page()
                page.goto(base + "/")
                page.wait_for_selector("#conn.up", timeout=15_000)
                pages.append(page)
        jpeg = _snapshot_jpeg()
        gens = [
            Generator(st, args.cameras, args.rate, sp, jpeg, args.defect_share, args.uncertain_share, stop)
            for st, sp in zip(stations, spools)
        ]
        for g in gens:
            g.start()
        time.sleep(args.warmup)
        cpu0, _ = _cpu_rss(proc.pid)
        t0 = time.monotonic()
        ages: list[float] = []
        rss: list[int] = []
        while time.monotonic() - t0 < args.duration:
            time.sleep(1.0)
            rss.append(_cpu_rss(proc.pid)[1])
            for page in pages:
                ages.extend(page.evaluate(TILE_AGES_JS))  # every tile's newest verdict, every browser
        cpu1, _ = _cpu_rss(proc.pid)
        elapsed = time.monotonic() - t0
        stop.set()
        for g in gens:
            g.join()
        published = sum(st.sent for st in stations)
        deadline = time.monotonic() + 60
        while _health(base)["recorded"] < published and time.monotonic() < deadline:
            time.sleep(0.2)
        health = _health(base)
    finally:
        stop.set()
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        for st in stations:
            st.close()
        if receiver is not None:
            receiver.shutdown()  # type: ignore[attr-defined]
    from deploy.console.store import Store

    s = Store(store, retention_days=0)
    in_store = s.count()
    s.close()
    shutil.rmtree(tmp, ignore_errors=True)
    age_p99 = p99(ages)
    return {
        "stations": args.stations,
        "cameras_per_station": args.cameras,
        "rate_per_camera": args.rate,
        "offered_per_s": args.stations * args.cameras * args.rate,
        "duration_s": round(elapsed, 2),
        "published": published,
        "recorded": health["recorded"],
        "in_store": in_store,
        "rejected": health["received"]["rejected"],
        "all_recorded": in_store == published,
        "rows_lost": published - in_store,
        "browsers": args.browsers,
        "alarms": not args.no_alarms,
        "alarm_posts": posts[0],
        "cpu_pct_one_core": round(100.0 * (cpu1 - cpu0) / elapsed, 1),
        "rss_mib_max": round(max(rss) / 2**20, 1) if rss else None,
        "tile_age_s_p50": round(statistics.median(ages), 3) if ages else None,
        "tile_age_s_max": round(max(ages), 3) if ages else None,
        "tile_age_s_p99": None if age_p99 is None else round(age_p99, 3),
        "tile_age_ok": None if age_p99 is None else age_p99 <= 1.0,
        "browser_samples": len(ages),
        "store": store.split(":", 1)[0],
        "coalesce_ms": args.coalesce_ms,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stations", type=int, default=4)
    p.add_argument("--cameras", type=int, default=4, help="per station")
    p.add_argument("--rate", type=float, default=30.0, help="verdicts/s per camera")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds (after --warmup)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--defect-share", type=float, default=0.02)
    p.add_argument("--uncertain-share", type=float, default=0.03)
    p.add_argument("--coalesce-ms", type=int, default=250)
    p.add_argument("--store", default=None, help="SQLAlchemy URL (default: a fresh SQLite file)")
    p.add_argument("--browsers", type=int, default=5, help="Chromium pages on the live view (0: none)")
    p.add_argument("--no-alarms", action="store_true", help="no alarm rules (default: every kind, with a webhook)")
    p.add_argument("--json", default="bench-console.json")
    args = p.parse_args(argv)
    r = run(args)
    rows = [
        (
            "offered",
            f"{r['offered_per_s']:.0f} verdicts/s ({r['stations']}x{r['cameras_per_station']}x{r['rate_per_camera']:g})",
        ),
        ("published / in store", f"{r['published']} / {r['in_store']} ({'OK' if r['all_recorded'] else 'MISSING'})"),
        ("rows lost", f"{r['rows_lost']} (target 0)"),
        ("console CPU", f"{r['cpu_pct_one_core']} % of one core (target <= 25 %)"),
        ("console RSS", f"{r['rss_mib_max']} MiB"),
        ("browsers / alarms", f"{r['browsers']} / {'on' if r['alarms'] else 'off'} ({r['alarm_posts']} webhook posts)"),
        (
            "tile age p50 / p99 / max",
            f"{r['tile_age_s_p50']} / {r['tile_age_s_p99']} / {r['tile_age_s_max']} s (target p99 <= 1 s)",
        ),
        ("rejected messages", str(r["rejected"])),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0 if r["all_recorded"] and r["tile_age_ok"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
