#!/usr/bin/env python
"""The station under qemu-aarch64 vs x86 (run by .ci/aarch64.sh, which builds the sysroot).

One tiny bundle and one replay of ``--frames`` synthetic frames: on the guest ``bundle verify``,
``serve --check`` and the replay (a real ``serve`` process; verdicts collected over ZeroMQ by this x86
process), then the same replay on the host. Fails (exit 1) unless both runs give the frame count in
verdicts, 0 dropped, the same (seq, source, verdict) list, and the bit-exact resizes
(runtime.inference.preprocess ``linear_exact`` / ``bilinear_exact``) give the same pixels on both CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATTERN = ("ok", "defect", "uncertain")
# Resize digests of a fixed image; "linear" (INTER_LINEAR) is reported, not required to agree.
RESIZE_PROBE = """
import hashlib, json, numpy as np
from runtime.inference.preprocess import resize
y, x = np.mgrid[0:37, 0:53]
g = ((x * 37 + y * 91 + (x * y) % 29) % 256).astype(np.uint8)
img = np.dstack([g, g[::-1], 255 - g])
out = {f"{n}@{h}x{w}": hashlib.sha256(resize(img, h, w, n).tobytes()).hexdigest()[:16]
       for n in ("linear_exact", "bilinear_exact", "linear", "bilinear") for h, w in ((16, 24), (50, 70))}
print(json.dumps(out))
"""
STOPPED = re.compile(r"stopped \((.*)\)")


class Guest:
    """Commands under qemu-aarch64 with the sysroot's Python and the aarch64 wheels."""

    def __init__(self, qemu: str, sysroot: Path, site: Path) -> None:
        self.prefix = [qemu, "-L", str(sysroot), str(sysroot / "usr/bin/python3.11")]
        self.env = {
            **os.environ,
            "PYTHONPATH": f"{site}{os.pathsep}{ROOT}",
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }


def host_cmd() -> tuple[list[str], dict[str, str]]:
    return [sys.executable], {**os.environ, "PYTHONPATH": str(ROOT)}


def run(prefix: list[str], env: dict[str, str], args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def replay(
    prefix: list[str], env: dict[str, str], config: Path, endpoint: str, log: Path, timeout: float
) -> tuple[list[dict[str, Any]], str]:
    """A real ``serve`` of the replay; returns (verdicts, the daemon's 'stopped (...)' summary)."""
    from tests.runtime._helpers import Subscriber

    sub = Subscriber(endpoint)
    with log.open("w") as err:
        proc = subprocess.Popen(
            [*prefix, "-m", "defectscope", "serve", "--config", str(config)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit(f"FAIL: replay did not finish within {timeout:.0f}s; log {log}")
                sub.pump(0.2)
            sub.pump(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            sub.close()
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"FAIL: serve exited {proc.returncode}:\n{text[-3000:]}")
    m = STOPPED.search(text)
    return sub.verdicts(), m.group(1) if m else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qemu", required=True)
    p.add_argument("--sysroot", required=True, type=Path)
    p.add_argument("--site", required=True, type=Path)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per emulated command")
    args = p.parse_args(argv)

    from tests.runtime._helpers import make_bundle, make_images, station_config

    guest = Guest(args.qemu, args.sysroot, args.site)
    host, host_env = host_cmd()
    failures: list[str] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ds-aarch64-") as tmp_s:
        tmp = Path(tmp_s)
        bundle = make_bundle(tmp / "bundle")
        make_images(tmp / "replay", [PATTERN[i % 3] for i in range(args.frames)])
        config, endpoint = station_config(
            tmp,
            bundle,
            [{"id": "cam1", "source": str(tmp / "replay")}],
            publisher={"wait_for_subscribers": 1, "wait_timeout_s": args.timeout},
            daemon={"drain_timeout_s": args.timeout},
        )
        (tmp / "auto").mkdir()  # serve --check with backend auto: ONNX Runtime on aarch64 (no OpenVINO wheel)
        auto_config, _ = station_config(
            tmp / "auto", bundle, [{"id": "cam1", "source": str(tmp / "replay")}], model={"backend": "auto"}
        )

        r = run(guest.prefix, guest.env, ["-c", "import platform; print(platform.machine())"], args.timeout)
        if r.returncode or r.stdout.strip() != "aarch64":
            print(f"FAIL: the guest python does not run as aarch64: {r.stdout.strip()!r} {r.stderr[-2000:]}")
            return 1
        for what, cmd in (
            ("bundle verify", ["bundle", "verify", str(bundle)]),
            ("serve --check", ["serve", "--check", "--config", str(auto_config)]),
        ):
            r = run(guest.prefix, guest.env, ["-m", "defectscope", *cmd], args.timeout)
            ok = r.returncode == 0
            print(f"aarch64 {what}: {'ok' if ok else 'FAILED'} ({time.monotonic() - t0:.0f}s)")
            if not ok:
                failures.append(f"{what} exited {r.returncode}: {(r.stderr or r.stdout)[-2000:]}")
            elif what == "serve --check":
                model = json.loads(r.stdout)["model"]
                print(f"  backend auto -> {model.get('backend')}, artifact {model.get('artifact')}")
                if model.get("backend") != "onnxruntime-cpu":
                    failures.append(f"backend auto chose {model.get('backend')!r} on aarch64, not onnxruntime-cpu")

        pins = {}
        for name, (prefix, env) in (("aarch64", (guest.prefix, guest.env)), ("x86_64", (host, host_env))):
            r = run(prefix, env, ["-c", RESIZE_PROBE], args.timeout)
            if r.returncode:
                failures.append(f"{name} resize probe failed: {r.stderr[-2000:]}")
                continue
            pins[name] = json.loads(r.stdout)
        if len(pins) == 2:
            for key, digest in pins["x86_64"].items():
                same = pins["aarch64"][key] == digest
                exact = key.split("@")[0].endswith("_exact")
                print(f"resize {key:24} {'identical' if same else 'DIFFERS'}{'' if exact else ' (not required)'}")
                if exact and not same:
                    failures.append(f"resize {key} differs between x86_64 and aarch64")

        runs, confidence = {}, {}
        for name, (prefix, env) in (("aarch64", (guest.prefix, guest.env)), ("x86_64", (host, host_env))):
            verdicts, summary = replay(prefix, env, config, endpoint, tmp / f"{name}.log", args.timeout)
            runs[name] = [(m["seq"], m["source"], m["verdict"]) for m in verdicts]
            confidence[name] = {m["seq"]: m["confidence"] for m in verdicts}
            dropped = re.search(r"(\d+) dropped", summary)
            print(f"{name} replay: {len(verdicts)} verdicts; {summary} ({time.monotonic() - t0:.0f}s)")
            if len(verdicts) != args.frames:
                failures.append(f"{name}: {len(verdicts)} verdicts for {args.frames} frames")
            if dropped is None or int(dropped.group(1)) != 0:
                failures.append(f"{name}: dropped frames ({summary or 'no summary in the log'})")
        shared = set(confidence["aarch64"]) & set(confidence["x86_64"])
        if shared:  # reported: ONNX Runtime FP32 differs in the last bits between CPUs
            worst = max(abs(confidence["aarch64"][q] - confidence["x86_64"][q]) for q in shared)
            print(f"largest confidence difference aarch64 vs x86_64: {worst:.2e}")
        if runs.get("aarch64") != runs.get("x86_64"):
            diff = [(a, b) for a, b in zip(runs["aarch64"], runs["x86_64"], strict=False) if a != b][:5]
            failures.append(f"verdicts differ between aarch64 and x86_64: {diff}")
    for f in failures:
        print(f"FAIL: {f}")
    print(f"aarch64 check: {'FAILED' if failures else 'passed'} in {time.monotonic() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
