#!/usr/bin/env python
"""Where the errors are: test errors of saved ``bench_recipes.py --save-preds`` runs per ELPV grade.

ELPV grades each cell with the annotators' defect probability (0, 1/3, 2/3, 1). This splits
the held-out errors of each run (original view and 8-view TTA) by grade and cell type, and
scores the mean of all runs given (a seed / recipe ensemble). The best single decision
threshold on P(defective), chosen on the test split itself, is printed as a ceiling for
what calibration alone could add; it is not a result. ``--gallery`` draws the cells the
ensemble gets wrong on the unambiguous grades (missed grade-1 defects, false alarms on grade 0)
with their P(defective), to see what the model misses (a PNG of dataset images: keep it out of
the repository, the ELPV images are CC BY-NC-SA).

Usage:
  python bench/recipe_errors.py bench/results/recipes/a.npz [b.npz ...] --out bench/results/recipes/errors.json
  python bench/recipe_errors.py bench/results/recipes/a.npz --gallery bench/results/recipes/errors.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRADES = (0.0, 1 / 3, 2 / 3, 1.0)


def breakdown(probs, y, p, groups) -> dict:
    """Accuracy, error count, errors per grade and accuracy per cell type of ``(N,C)`` probabilities."""
    import numpy as np

    ok = probs.argmax(1) == y
    out: dict[str, Any] = {"accuracy": float(ok.mean()), "errors": int((~ok).sum()), "per_grade": {}, "per_type": {}}
    for g in GRADES:
        m = np.isclose(p, g, atol=1e-3)
        out["per_grade"][f"{g:.2f}"] = [int((~ok[m]).sum()), int(m.sum())]
    for t in sorted(set(groups)):
        out["per_type"][t] = float(ok[groups == t].mean())
    return out


def gallery(path: str, q, p, groups, paths, most: int) -> None:
    """PNG grid of the unambiguous errors: missed grade-1 cells first (lowest score first), then false alarms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from runtime.inference.preprocess import read_image

    miss = [i for i in np.argsort(q) if np.isclose(p[i], 1.0) and q[i] < 0.5]
    alarm = [i for i in np.argsort(-q) if np.isclose(p[i], 0.0) and q[i] >= 0.5]
    cells = ([(i, "missed") for i in miss] + [(i, "false alarm") for i in alarm])[:most]
    if not cells:
        print("gallery: no errors on grades 0 and 1")
        return
    cols = 8
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, kind) in zip(axes.flat, cells):
        ax.imshow(read_image(paths[i]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"{kind} {groups[i]}\nP(defective) {q[i]:.2f}",
            fontsize=8,
            color="tab:red" if kind == "missed" else "tab:blue",
        )
    fig.suptitle(f"{len(miss)} missed grade-1 cells, {len(alarm)} false alarms on grade 0 (mean of runs, TTA8)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"-> {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preds", nargs="+", help="npz files written by bench_recipes.py --save-preds (same task)")
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--gallery", default=None, help="PNG path: the ensemble's errors on grades 0 and 1 (binary)")
    ap.add_argument("--gallery-max", type=int, default=48, help="at most this many cells in the gallery")
    a = ap.parse_args(argv)

    import numpy as np

    runs = {Path(f).stem: np.load(f) for f in a.preds}
    first = next(iter(runs.values()))
    nc = first["probs_test"].shape[-1]
    if a.gallery and nc != 2:
        raise SystemExit("--gallery: binary runs only (errors on grade 0 and grade 1)")
    for name, d in runs.items():
        if d["probs_test"].shape != first["probs_test"].shape or not np.array_equal(d["y_test"], first["y_test"]):
            raise SystemExit(f"{name}: not the same task / test split as {next(iter(runs))}")
    y, p = first["y_test"], first["p_test"]
    groups, paths = first.get("group_test"), first.get("path_test")
    if groups is None or (a.gallery and paths is None):
        # npz files from before bench_recipes stored cell types and paths: take them from the split.
        from training.classification.data import DataSpec, resolve_splits

        test = resolve_splits(DataSpec(labels="binary" if nc == 2 else "4class")).split("test")
        groups, paths = np.array([s.group for s in test]), np.array([s.path for s in test])
    if len(groups) != len(y):
        raise SystemExit(f"test split has {len(groups)} images, the predictions {len(y)}: another split")

    rows = {}
    for name, d in runs.items():
        rows[f"{name}"] = breakdown(d["probs_test"][:, 0], y, p, groups)
        rows[f"{name}, TTA8"] = breakdown(d["probs_test"].mean(1), y, p, groups)
    ens_tta = np.mean([d["probs_test"].mean(1) for d in runs.values()], 0)  # (N,C)
    if len(runs) > 1:
        rows[f"mean of {len(runs)} runs"] = breakdown(
            np.mean([d["probs_test"][:, 0] for d in runs.values()], 0), y, p, groups
        )
        rows[f"mean of {len(runs)} runs, TTA8"] = breakdown(ens_tta, y, p, groups)
    types = sorted(set(groups))
    print(
        "| run | accuracy | errors | "
        + " | ".join(f"errors p={g}" for g in ("0", "1/3", "2/3", "1"))
        + " | "
        + " | ".join(f"acc {t}" for t in types)
        + " |"
    )
    print("| --- " * (3 + len(GRADES) + len(types)) + "|")
    for name, r in rows.items():
        grades = " | ".join(f"{e}/{n}" for e, n in r["per_grade"].values())
        print(
            f"| {name} | {r['accuracy']:.4f} | {r['errors']} | {grades} | "
            + " | ".join(f"{r['per_type'][t]:.3f}" for t in types)
            + " |"
        )
    result = {"runs": list(a.preds), "rows": rows}
    if nc == 2:
        q = ens_tta[:, 1]
        ts = np.linspace(0.05, 0.95, 91)
        accs = [float(((q >= t) == y).mean()) for t in ts]
        i = int(np.argmax(accs))
        result["test_chosen_threshold"] = {"threshold": float(ts[i]), "accuracy": accs[i]}
        print(
            f"\nceiling of a threshold chosen on the test split itself (not a result): "
            f"{accs[i]:.4f} at P(defective) >= {ts[i]:.2f}"
        )
    if a.gallery:
        gallery(a.gallery, ens_tta[:, 1], p, groups, paths, a.gallery_max)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
