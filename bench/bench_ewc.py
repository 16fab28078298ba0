#!/usr/bin/env python
"""EWC on ELPV: two product lines (mono / poly cells), new defect classes, and a harder shift.

Protocol: ELPV reference split (stratified 75/25 by class x cell type, seed 0; validation 10%
carved from train), efficientnet_lite0 from ImageNet. Every split is then divided by cell
type, so line A = the mono cells of each split and line B = the poly cells.

Scenarios (``--scenarios``):
  mono-poly    binary; base model trained on A (mono), extended with B (poly)
  poly-mono    the reverse order
  classinc     ELPV 4-class: the base knows {ok, defect_33}; {defect_67, defect_100} arrive as new classes
               (head grows 2 -> 4; old accuracy = 4-way argmax on the old classes' test images)
  hard         mono > poly with the poly images *inverted* (255 - x: another camera polarity / imaging
               mode): a documented harder domain shift, run when ELPV alone shows little forgetting
               ("auto": when naive forgetting is below --little in both orders) or when asked for
Methods per scenario: naive fine-tune, EWC, replay (--replay of the old line's train split, class-
balanced), EWC + replay, and joint training on both lines (the upper bound; same recipe as the base).
EWC uses --lambda (default "auto": the grid is searched on validation, mean of old and new accuracy;
EWC + replay reuses the chosen lambda). Every extension starts from the same base checkpoint and its
fisher.safetensors (computed once per base, timed as "fisher").

Targets (domain scenarios): EWC forgetting <= 1/3 of naive; EWC new-task accuracy within 2 points
of naive; EWC + replay mean(old, new) accuracy within 1 point of joint.

Efficiency: images are decoded and resized once per line and shared by all methods; base models,
their Fisher files and the joint models are trained once and reused by both orders. Roughly
(2 idle cores, 224 px, 5 epochs): a run over poly ~4-5 min; everything ~35 training runs -> ~2.5 h.
--image-size 160 halves that, --lambda 100 skips the grid (-6 runs), --scenarios narrows it.

Usage:
  python bench/bench_ewc.py                                     # -> bench/results/ewc/{results.json,results.md,ewc.png}
  python bench/bench_ewc.py --image-size 160 --scenarios mono-poly,poly-mono
  python bench/bench_ewc.py --backbone tiny_cnn --image-size 32 --limit 24 --epochs 1 --base-epochs 1 \\
      --lambda-grid 10,1000 --fisher-samples 16 --scenarios all           # smoke (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ewc_lines import inverted_copy, reference_split, write_line  # noqa: E402  (bench/)
from ewc_report import TARGETS, markdown, plot, row_text, targets  # noqa: E402, F401  (bench/, the script's folder)

SCENARIOS = ("mono-poly", "poly-mono", "classinc", "hard")
METHODS = ("naive", "ewc", "replay", "ewc+replay")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scenarios",
        default="auto",
        help="comma-separated from mono-poly, poly-mono, classinc, hard; 'all'; or 'auto' "
        "(the first three, plus hard when naive forgetting is small)",
    )
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=224, help="input size (cells are 300 px; 160 is ~2x faster)")
    p.add_argument("--base-epochs", type=int, default=6, help="fine-tuning epochs of base and joint models")
    p.add_argument("--head-epochs", type=int, default=2, help="head warm-up epochs of base/joint (cached features)")
    p.add_argument("--epochs", type=int, default=5, help="extension epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4, help="extension head LR (lower groups x 0.75 per group)")
    p.add_argument("--lambda", dest="lam", default="auto", help="EWC lambda or 'auto'")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"extension methods to run, comma-separated from {','.join(METHODS)} (all)",
    )
    p.add_argument("--lambda-grid", default="10,100,1000,10000")
    p.add_argument("--replay", default="5%", help="replay buffer size: share of the old train split or a count")
    p.add_argument(
        "--replay-share",
        type=float,
        default=0.2,
        help="the buffer's share of each extension epoch (repeated); 0: seen once (0.2)",
    )
    p.add_argument("--fisher-samples", type=int, default=512)
    p.add_argument("--bn", default="frozen", choices=("frozen", "update"), help="BN statistics while extending")
    p.add_argument(
        "--bn-ablation",
        default="mono-poly",
        help="scenarios where naive and EWC also run with the other BN mode (BN statistics "
        "updating): BN's share of forgetting; comma-separated, 'none' or 'all' (mono-poly)",
    )
    p.add_argument(
        "--little",
        type=float,
        default=0.03,
        help="naive forgetting below this in every order run counts as 'little' -> hard scenario",
    )
    p.add_argument("--limit", type=int, help="at most N images per split and line (smoke runs)")
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="training seed (model init order, batches, Fisher draws)")
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the reference split (0: the published protocol); --seed varies only training",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ewc"))
    p.add_argument("--reuse", action="store_true", help="reuse base/joint runs already in --out")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from training.engine import pick_device, setup_runtime

        self.a = args
        self.out = Path(args.out)
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        setup_runtime(args.threads, args.seed)
        self.device = pick_device(args.device)
        self.tasks: dict[tuple, object] = {}
        self.runs: dict[str, dict] = {}
        self.log = (lambda s: None) if args.quiet else print
        self.torch = torch

    # -- pieces
    def spec(self, manifest: Path):
        from training.classification.data import DataSpec

        return DataSpec(source="csv", path=str(manifest), seed=self.a.split_seed)

    def train_run(self, name: str, manifest: Path, *, fisher: bool) -> dict:
        """A base / joint model via the project's Trainer; Fisher file for bases (timed)."""
        from training.backbones import get_spec
        from training.classification.config import TrainConfig
        from training.classification.extend_run import finalize_run
        from training.classification.trainer import train

        if name in self.runs:
            return self.runs[name]
        run = self.out / "runs" / name
        spec = get_spec(self.a.backbone)
        cfg = TrainConfig(
            out=str(run),
            data=self.spec(manifest),
            backbone=self.a.backbone,
            weights="imagenet" if spec.has_pretrained else "none",
            image_size=self.a.image_size,
            epochs=self.a.base_epochs,
            head_epochs=self.a.head_epochs,
            batch_size=self.a.batch_size,
            threads=self.a.threads,
            device=self.a.device,
            seed=self.a.seed,
            max_steps_per_epoch=self.a.max_steps_per_epoch,
        )
        info: dict = {"run": str(run)}
        reuse = self.a.reuse and (run / "best.safetensors").is_file() and (run / "report.json").is_file()
        if reuse:
            saved = json.loads((run / "config.json").read_text())
            reuse = saved.get("config_hash") == cfg.resolved().hash()  # what the trainer records
        if reuse:
            info["train_s"] = json.loads((run / "report.json").read_text()).get("wall_s")
            self.log(f"[{name}] reusing {run}")
        else:
            t = time.perf_counter()
            print(f"[{name}] training on {manifest.name} ...", flush=True)
            train(cfg, overwrite=True, progress=False, echo=self.log)
            info["train_s"] = time.perf_counter() - t
        if fisher:
            fp = run / "fisher.safetensors"
            if not (reuse and fp.is_file()):
                t = time.perf_counter()
                finalize_run(
                    run, n_samples=self.a.fisher_samples, seed=self.a.seed, device=self.a.device, echo=self.log
                )
                info["fisher_s"] = time.perf_counter() - t
        self.runs[name] = info
        return info

    def task(self, name: str, manifest: Path, classes, input_spec):
        """A TaskSet per (line, class order, input): decoded images shared by every method."""
        from training.classification.config import AugmentConfig
        from training.classification.data import resolve_splits
        from training.classification.taskset import TaskSet

        key = (str(manifest), tuple(classes), json.dumps(input_spec.to_dict(), sort_keys=True))
        if key not in self.tasks:
            splits = resolve_splits(self.spec(manifest))
            self.tasks[key] = TaskSet.from_splits(
                name, splits, list(classes), input_spec, AugmentConfig(), spec=self.spec(manifest)
            )
        return self.tasks[key]

    def evaluate(self, run: str, tasks: dict[str, Path]) -> dict[str, float]:
        from training.checkpoint import load_model
        from training.classification.taskset import evaluate_task

        model, card = load_model(run, device=self.device)
        out = {}
        for role, manifest in tasks.items():
            t = self.task(role, manifest, card.classes, card.input)
            m, _ = evaluate_task(model, t, "test", card.classes)
            out[role] = m["accuracy"]
        return out

    def extend(
        self, base: dict, old: Path, new: Path, *, method: str, lam, replay: str | None, bn: str, names: tuple[str, str]
    ) -> dict:
        from training import ewc_state
        from training.checkpoint import load_model
        from training.classification.data import resolve_splits
        from training.classification.extend import extend_model
        from training.classification.extend_config import ExtendConfig

        model, card = load_model(base["run"], device=self.device)
        state = ewc_state.EWCState.load(Path(base["run"]))
        state.check_model(model, backbone=card.backbone)
        new_classes = resolve_splits(replace(self.spec(new), verify=False)).classes
        classes = list(card.classes) + [c for c in new_classes if c not in card.classes]
        t_new = self.task(names[1], new, classes, card.input)
        t_old = self.task(names[0], old, classes, card.input)
        cfg = ExtendConfig.from_dict(
            {
                "source": base["run"],
                "out": "",
                "data": self.spec(new),
                "old_data": (self.spec(old),),
                "method": "naive" if method in ("naive", "replay") else "ewc",
                "lam": lam if method.startswith("ewc") else 100.0,
                "lambda_grid": tuple(float(x) for x in self.a.lambda_grid.split(",")),
                "replay": replay if "replay" in method else None,
                "replay_share": self.a.replay_share,
                "bn": bn,
                "epochs": self.a.epochs,
                "batch_size": self.a.batch_size,
                "lr": self.a.lr,
                "fisher_samples": self.a.fisher_samples,
                "seed": self.a.seed,
                "device": self.a.device,
                "threads": self.a.threads,
                "max_steps_per_epoch": self.a.max_steps_per_epoch,
                "write_fisher": False,
            }
        )
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*vmap.*")
            o = extend_model(
                model,
                card.classes,
                t_new,
                [t_old],
                state,
                cfg,
                backbone=card.backbone,
                device=self.device,
                echo=self.log,
            )
        r = o.report
        row = {
            "method": method + ("" if bn == self.a.bn else f" (BN {bn})"),
            "old_before": r["old_accuracy_before"],
            "old_after": r["old_accuracy_after"],
            "forgetting": r["forgetting"],
            "new_before": r["new_accuracy_before"],
            "new_after": r["new_accuracy_after"],
            "penalty_share": r["penalty_share"],
            "lambda": r["lambda"] if cfg.method == "ewc" else None,
            "lambda_search": r["lambda_search"],
            "wall_s": time.perf_counter() - t,
            "train_s": r["timing_s"]["train"],
        }
        if r.get("old_class_logits"):
            row["old_class_logits"] = next(iter(r["old_class_logits"].values()))
        if r.get("replay"):
            row["replay_size"] = r["replay"]["size"]
        return row

    def scenario(self, name: str, base: dict, old: Path, new: Path, joint: dict, names: tuple[str, str]) -> dict:
        print(f"\n== {name}: {names[0]} -> {names[1]}", flush=True)
        rows = []
        lam = self.a.lam if self.a.lam == "auto" else float(self.a.lam)
        for method in [m for m in METHODS if m in self.a.methods.split(",")]:
            row = self.extend(base, old, new, method=method, lam=lam, replay=self.a.replay, bn=self.a.bn, names=names)
            if method == "ewc" and lam == "auto":
                lam = row["lambda"]  # EWC + replay reuses the lambda chosen on validation
            rows.append(row)
            print(row_text(row), flush=True)
        if self.a.bn_ablation == "all" or name in self.a.bn_ablation.split(","):
            other = "update" if self.a.bn == "frozen" else "frozen"
            for method in ("naive", "ewc"):
                row = self.extend(base, old, new, method=method, lam=lam, replay=None, bn=other, names=names)
                rows.append(row)
                print(row_text(row), flush=True)
        acc = self.evaluate(joint["run"], {"old": old, "new": new})
        jrow = {
            "method": "joint (upper bound)",
            "old_after": acc["old"],
            "new_after": acc["new"],
            "wall_s": joint["train_s"],
        }
        rows.append(jrow)
        print(row_text(jrow), flush=True)
        return {
            "name": name,
            "old_task": names[0],
            "new_task": names[1],
            "rows": rows,
            "base": {"run": base["run"], "train_s": base["train_s"], "fisher_s": base.get("fisher_s")},
            "targets": targets(rows) if name != "classinc" else None,
        }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    wanted = (
        SCENARIOS[:3]
        if a.scenarios == "auto"
        else SCENARIOS
        if a.scenarios == "all"
        else tuple(s.strip() for s in a.scenarios.split(","))
    )
    bad = [s for s in wanted if s not in SCENARIOS]
    if bad:
        print(f"error: unknown scenario(s) {bad}; choose from {SCENARIOS}", file=sys.stderr)
        return 2
    b = Bench(a)
    out = b.out
    data = out / "data"
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "settings": vars(a),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, device {b.device}",
        "scenarios": [],
        "notes": [],
    }

    def save():
        from runtime.fsio import atomic_write_json

        atomic_write_json(out / "results.json", results)
        (out / "results.md").write_text(markdown(results))
        if results["scenarios"]:
            plot(results, out / "ewc.png")

    need_binary = any(s in wanted for s in ("mono-poly", "poly-mono", "hard")) or a.scenarios == "auto"
    if need_binary:
        ref = reference_split("binary", a.split_seed)
        mono = write_line(data / "mono.csv", ref, lambda s: s.group == "mono", a.limit, a.split_seed)
        poly = write_line(data / "poly.csv", ref, lambda s: s.group == "poly", a.limit, a.split_seed)
        both = write_line(
            data / "mono+poly.csv", ref, lambda s: True, None if a.limit is None else 2 * a.limit, a.split_seed
        )
        base_mono = b.train_run("base-mono", mono, fisher=True)
        joint = b.train_run("joint-mono+poly", both, fisher=False)
        naive_f = []
        if "mono-poly" in wanted:
            sc = b.scenario("mono-poly", base_mono, mono, poly, joint, ("mono", "poly"))
            results["scenarios"].append(sc)
            naive_f += [r["forgetting"] for r in sc["rows"] if r["method"] == "naive"]
            save()
        if "poly-mono" in wanted:
            base_poly = b.train_run("base-poly", poly, fisher=True)
            sc = b.scenario("poly-mono", base_poly, poly, mono, joint, ("poly", "mono"))
            results["scenarios"].append(sc)
            naive_f += [r["forgetting"] for r in sc["rows"] if r["method"] == "naive"]
            save()
        little = bool(naive_f) and all(f is not None and f < a.little for f in naive_f)
        run_hard = "hard" in wanted or (a.scenarios == "auto" and little)
        if little:
            note = (
                f"ELPV shows little forgetting under naive fine-tuning: naive forgetting "
                f"{', '.join(f'{f:+.4f}' for f in naive_f)} (threshold {a.little}); "
                + (
                    "see the 'hard' scenario (poly images inverted) for a shift where forgetting is real."
                    if run_hard
                    else "run with --scenarios auto or hard for the harder scenario."
                )
            )
            print("\nnote: " + note, flush=True)
            results["notes"].append(note)
        if run_hard:
            inv = inverted_copy(out / "cache" / "elpv-inverted")
            poly_inv = write_line(
                data / "poly-inverted.csv", ref, lambda s: s.group == "poly", a.limit, a.split_seed, image_map=inv
            )
            mono_inv = write_line(
                data / "mono+poly-inverted.csv",
                ref,
                lambda s: True,
                None if a.limit is None else 2 * a.limit,
                a.split_seed,
                image_map=lambda p, _inv=inv, _poly={s.path for s in ref.train + ref.val + ref.test if s.group == "poly"}: (
                    _inv(p) if p in _poly else p
                ),
            )
            joint_h = b.train_run("joint-mono+poly-inverted", mono_inv, fisher=False)
            sc = b.scenario("hard", base_mono, mono, poly_inv, joint_h, ("mono", "poly-inverted"))
            results["scenarios"].append(sc)
            save()
    if "classinc" in wanted:
        ref4 = reference_split("4class", a.split_seed)
        old_cls, new_cls = {"ok", "defect_33"}, {"defect_67", "defect_100"}
        a4 = write_line(
            data / "4class-old.csv", ref4, lambda s: ref4.classes[s.label] in old_cls, a.limit, a.split_seed
        )
        b4 = write_line(
            data / "4class-new.csv", ref4, lambda s: ref4.classes[s.label] in new_cls, a.limit, a.split_seed
        )
        all4 = write_line(
            data / "4class-all.csv", ref4, lambda s: True, None if a.limit is None else 2 * a.limit, a.split_seed
        )
        base4 = b.train_run("base-4class-old", a4, fisher=True)
        joint4 = b.train_run("joint-4class", all4, fisher=False)
        sc = b.scenario("classinc", base4, a4, b4, joint4, ("{ok, defect_33}", "{defect_67, defect_100}"))
        results["scenarios"].append(sc)
        save()
    results["wall_s"] = time.perf_counter() - t0
    save()
    print("\n" + markdown(results))
    print(f"-> {out / 'results.json'}, {out / 'results.md'}, {out / 'ewc.png'}  ({results['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
