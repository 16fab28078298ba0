"""Issue 25 item 14: the demo's /metrics figure counts every verdict it received, however loaded the machine."""

from __future__ import annotations

import sys
from pathlib import Path

from defectscope.demo_steps import FRAMES_INFERRED, metric_sum, stream_first_verdicts
from tests.factories import free_port

DAEMON = Path(__file__).with_name("lagging_daemon.py")


def test_the_demo_waits_for_the_daemons_counter_before_reporting_it(tmp_path):
    frames, zmq_port, metrics_port = 3, free_port(), free_port()
    command = [
        sys.executable,
        str(DAEMON),
        "--zmq-port",
        str(zmq_port),
        "--metrics-port",
        str(metrics_port),
        "--frames",
        str(frames),
        "--lag-scrapes",
        "3",
    ]
    first, received, metrics = stream_first_verdicts(
        tmp_path / "unused.toml",
        zmq_port,
        metrics_port,
        frames,
        lambda m: m["source"],
        tmp_path,
        timeout_s=120.0,
        command=command,
    )
    assert len(first) == frames and received >= frames
    # The counter lagged for 3 scrapes: a single scrape after the stream read 0 here (2 < 3 in the issue).
    assert metric_sum(metrics, FRAMES_INFERRED) >= received
