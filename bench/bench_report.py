"""bench_runtime.py's summary: the machine's-limit headline (printed first), the checks, the tables."""

from __future__ import annotations

import argparse
from typing import Any


def headline(args: argparse.Namespace, result: dict[str, Any], target_ratio: float) -> list[str]:
    """The machine's-limit lines: daemon / fastest bare engine at the same total threads (TTA off).

    Also vs the fastest engine that met its accuracy target (--accuracy) and vs the daemon's own
    engine alone (what the pipeline around the engine costs).
    """
    engines = result["bare_engines"]
    if not engines:
        return ["(no bare engine measured: --engines empty)"]
    fastest = engines[0]
    lines = [
        f"daemon / FASTEST bare engine ({fastest['engine']}, {fastest['fps']:.1f} frames/s) at "
        f"{args.total_threads} total thread(s), target >= {target_ratio}:"
    ]
    accurate = next((e for e in engines if e.get("accurate") is not False), None)
    if args.accuracy and accurate is not None and accurate is not fastest:
        refused = [e["engine"] for e in engines[: engines.index(accurate)]]
        lines.append(
            f"  (fastest that meets its accuracy target: {accurate['engine']}, {accurate['fps']:.1f} "
            f"frames/s; faster but outside the target: {', '.join(refused)})"
        )
    for r in result["runs"]:
        if r["tta"] == "1":
            dm = r["daemon"]
            gated = r["ratio_vs_fastest_accurate"] if args.accuracy else r["ratio_vs_fastest"]
            ok = gated >= target_ratio and dm["expected"] == dm["frames"]
            lines.append(
                f"  {r['artifact']:6} {r['cameras']} camera(s): {r['ratio_vs_fastest']:.2f}x fastest, "
                + (f"{r['ratio_vs_fastest_accurate']:.2f}x fastest accurate, " if args.accuracy else "")
                + f"{r['ratio_vs_same_engine']:.2f}x its own engine alone ({r['daemon_engine']}); "
                f"{dm['fps']:.1f} frames/s, engine threads {args.threads}, lost "
                f"{dm['expected'] - dm['frames']} {'PASS' if ok else 'FAIL'}"
            )
    return lines


def checks_for(result: dict[str, Any], target_ratio: float, target_tta_cost: float) -> list[dict[str, Any]]:
    checks = []
    for r in result["runs"]:
        if r["tta"] == "1":
            checks.append(
                {
                    "check": f"daemon/fastest bare {r['artifact']} {r['cameras']} cam",
                    "value": r["ratio_vs_fastest"],
                    "target": f">= {target_ratio}",
                    "pass": r["ratio_vs_fastest"] >= target_ratio,
                }
            )
            if r["ratio_vs_fastest_accurate"] == r["ratio_vs_fastest_accurate"]:  # not NaN: --accuracy given
                checks.append(
                    {
                        "check": f"daemon/fastest accurate {r['artifact']} {r['cameras']} cam",
                        "value": r["ratio_vs_fastest_accurate"],
                        "target": f">= {target_ratio}",
                        "pass": r["ratio_vs_fastest_accurate"] >= target_ratio,
                    }
                )
            checks.append(
                {
                    "check": f"daemon/same engine alone {r['artifact']} {r['cameras']} cam",
                    "value": r["ratio_vs_same_engine"],
                    "target": "report",
                    "pass": True,
                }
            )
            checks.append(
                {
                    "check": f"daemon/bare ORT {r['artifact']} {r['cameras']} cam",
                    "value": r["ratio"],
                    "target": "report",
                    "pass": True,
                }
            )
        if r["tta"] in ("3", "3a"):
            one = next(
                (
                    o
                    for o in result["runs"]
                    if o["tta"] == "1" and o["artifact"] == r["artifact"] and o["cameras"] == r["cameras"]
                ),
                None,
            )
            label = "3-view TTA" if r["tta"] == "3" else "adaptive 3-view TTA"
            if one is not None:
                cost = one["daemon"]["fps"] / r["daemon"]["fps"]
                checks.append(
                    {
                        "check": f"{label} cost {r['artifact']} {r['cameras']} cam",
                        "value": cost,
                        "target": f"<= {target_tta_cost}",
                        "pass": cost <= target_tta_cost,
                    }
                )
        if r["tta"] == "3a":
            full = next(
                (
                    o
                    for o in result["runs"]
                    if o["tta"] == "3" and o["artifact"] == r["artifact"] and o["cameras"] == r["cameras"]
                ),
                None,
            )
            if full is not None:
                a, b = r["_verdicts"], full["_verdicts"]
                same = sum(1 for k, v in a.items() if k in b and b[k][0] == v[0])
                r["verdict_agreement_with_always_on"] = same / max(1, len(a))
                checks.append(
                    {
                        "check": f"adaptive = always-on verdicts {r['artifact']} {r['cameras']} cam",
                        "value": same / max(1, len(a)),
                        "target": "report",
                        "pass": True,
                    }
                )
    low = result.get("low_load")
    if low:
        checks.append(
            {
                "check": f"low-load p50 at {low['fps_offered']:g} f/s (ms)",
                "value": low["p50_ms"],
                "target": f"<= {low['target_p50_ms']:.1f}",
                "pass": low["pass_"],
            }
        )
    return checks


def print_summary(result: dict[str, Any]) -> None:
    print("\n" + "\n".join(result["headline"]))  # the machine's-limit ratio comes first
    if "stages_table" in result:
        meta = result["stages"]["_meta"]
        print(
            f"\nper-frame CPU time by stage ({meta['backend']} {meta['artifact']}/{meta['inference_precision']}, "
            f"batch {meta['batch']}, {meta['frames']} frames, one thread outside the engine):"
        )
        print(result["stages_table"])
        if "stages_zero_copy_table" in result:
            batches = result["stages_zero_copy"]["_meta"]["batches"]
            print(f"\nthe same with [batching] zero_copy (frames prepared into one arena; batches {batches}):")
            print(result["stages_zero_copy_table"])
    low = result.get("low_load")
    if low:
        print(
            f"\nlow load, 1 camera at {low['fps_offered']:g} frames/s ({low['frames']} frames): capture -> "
            f"publish p50 {low['p50_ms']:.2f} ms, p99 {low['p99_ms']:.2f} ms; inference p50 "
            f"{low['inference_p50_ms']:.2f} ms; target p50 <= {low['target_p50_ms']:.2f} ms "
            f"{'PASS' if low['pass_'] else 'FAIL'}"
        )
    print()
    for c in result["checks"]:
        print(f"{c['check']:46} {c['value']:8.2f}  target {c['target']:8}  {'PASS' if c['pass'] else 'FAIL'}")
    print(
        "\ndaemon latency = capture -> publish per frame (replays block at saturation, so it includes "
        "queueing); CPU ms/f = the daemon process's CPU time per frame (all threads)"
    )
