"""bench_ewc's report: per-row text, the issue's targets, the markdown table and the plot."""

from __future__ import annotations

from pathlib import Path

from runtime.fsio import atomic_write

TARGETS = {"ewc_forgetting_ratio": 1 / 3, "ewc_new_gap": 0.02, "ewc_replay_vs_joint": 0.01}


def _fmt(v, spec=".4f"):
    return "   n/a" if v is None else format(v, spec)


def row_text(r: dict) -> str:
    return (
        f"  {r['method']:<24} old {_fmt(r.get('old_before'))} -> {_fmt(r.get('old_after'))}  "
        f"forgetting {_fmt(r.get('forgetting'), '+.4f')}  new {_fmt(r.get('new_before'))} -> "
        f"{_fmt(r.get('new_after'))}  penalty share {_fmt(r.get('penalty_share'), '.3f')}  "
        f"lambda {r.get('lambda') if r.get('lambda') is not None else '-'}  {r.get('wall_s', 0):.0f}s"
    )


def targets(rows: list[dict]) -> dict:
    by = {r["method"]: r for r in rows}
    naive, e, er, joint = by.get("naive"), by.get("ewc"), by.get("ewc+replay"), by.get("joint (upper bound)")
    out = {}
    if naive and e:
        nf, ef = naive["forgetting"], e["forgetting"]
        if nf is not None and nf > 0.005:
            out["ewc_forgetting_le_third_of_naive"] = {
                "naive": nf,
                "ewc": ef,
                "ratio": ef / nf,
                "pass": ef <= nf * TARGETS["ewc_forgetting_ratio"],
            }
        else:
            out["ewc_forgetting_le_third_of_naive"] = {
                "naive": nf,
                "ewc": ef,
                "ratio": None,
                "pass": None,
                "note": "naive fine-tuning does not forget here",
            }
        gap = naive["new_after"] - e["new_after"]
        out["ewc_new_within_2_points_of_naive"] = {
            "naive": naive["new_after"],
            "ewc": e["new_after"],
            "gap": gap,
            "pass": gap <= TARGETS["ewc_new_gap"],
        }
    if er and joint:
        m_er = (er["old_after"] + er["new_after"]) / 2
        m_j = (joint["old_after"] + joint["new_after"]) / 2
        out["ewc_replay_within_1_point_of_joint"] = {
            "ewc+replay": m_er,
            "joint": m_j,
            "gap": m_j - m_er,
            "pass": m_j - m_er <= TARGETS["ewc_replay_vs_joint"],
        }
    return out


def markdown(results: dict) -> str:
    a = results["settings"]
    lines = [
        f"EWC benchmark ({a['backbone']}, {a['image_size']} px, base {a['base_epochs']} epochs, extension "
        f"{a['epochs']} epochs, lambda {a['lam']}, replay {a['replay']}, BN {a['bn']}; {results['machine']})",
        "",
        "Accuracy on each line's test split; forgetting = old before - old after; wall s = the whole method "
        "(for ewc with lambda auto: every grid run); base training and Fisher times are in results.json.",
        "",
    ]
    for sc in results["scenarios"]:
        lines += [
            f"### {sc['name']}: {sc['old_task']} -> {sc['new_task']}",
            "",
            "| method | old before | old after | forgetting | new before | new after | penalty share | lambda | wall s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sc["rows"]:
            lines.append(
                f"| {r['method']} | {_fmt(r.get('old_before'), '.3f')} | {_fmt(r.get('old_after'), '.3f')} | "
                f"{_fmt(r.get('forgetting'), '+.3f')} | {_fmt(r.get('new_before'), '.3f')} | "
                f"{_fmt(r.get('new_after'), '.3f')} | {_fmt(r.get('penalty_share'), '.3f')} | "
                f"{r.get('lambda') if r.get('lambda') is not None else '-'} | {r.get('wall_s', 0):.0f} |"
            )
        for k, v in (sc.get("targets") or {}).items():
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[v["pass"]]
            detail = ", ".join(f"{kk} {vv:.4f}" for kk, vv in v.items() if isinstance(vv, float))
            lines.append(f"- {k}: **{verdict}** ({detail}){' - ' + v['note'] if v.get('note') else ''}")
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"> {note}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scs = results["scenarios"]
    fig, axes = plt.subplots(1, len(scs), figsize=(5.2 * len(scs), 4), squeeze=False)
    for ax, sc in zip(axes[0], scs):
        rows = sc["rows"]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["old_after"] for r in rows], 0.4, label=f"old ({sc['old_task']})")
        ax.bar([x + 0.2 for x in xs], [r["new_after"] for r in rows], 0.4, label=f"new ({sc['new_task']})")
        base = rows[0].get("old_before")
        if base is not None:
            ax.axhline(base, color="k", ls=":", lw=1, label="old before")
        ax.set_xticks(list(xs), [r["method"].replace(" (upper bound)", "") for r in rows], rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(sc["name"])
        ax.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel("test accuracy after extension")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
