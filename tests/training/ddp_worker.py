"""A torchrun worker for tests/training/test_distributed.py (run as a script by torchrun).

``audit WATCH LOGDIR -- ARGS...``: record every file-system write under WATCH (Python audit
events: opens for writing, renames/replaces, mkdir, removes) into LOGDIR/writes-<rank>.json,
then run ``defectscope ARGS`` unchanged.

``raise STEP``: train tiny_cnn through the engine on random tensors; rank 1 raises after
STEP optimizer steps while rank 0 carries on into the next gradient all-reduce.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(watch: Path, log_dir: Path, args: list[str]) -> int:
    import atexit

    watch_s, writes = str(watch.resolve()), []

    def under(p) -> bool:
        try:
            return os.path.abspath(os.fsdecode(p)).startswith(watch_s)
        except TypeError:
            return False  # a file descriptor

    def hook(event: str, a: tuple) -> None:
        if event == "open" and a and under(a[0]):
            mode, flags = a[1], a[2] if len(a) > 2 else 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
                writes.append([event, os.fsdecode(a[0])])
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.unlink"):
            paths = [p for p in a[:2] if isinstance(p, (str, bytes, os.PathLike)) and under(p)]
            writes.extend([event, os.fsdecode(p)] for p in paths)

    rank = os.environ.get("RANK", "0")
    atexit.register(lambda: (log_dir / f"writes-{rank}.json").write_text(json.dumps(writes)))
    sys.addaudithook(hook)
    from defectscope.cli import main

    return main(args)


def _raise(step: int) -> int:
    import torch

    from training import distributed as dist
    from training.backbones import REGISTRY, build_model, sized_input
    from training.classification.task import ClassificationTask
    from training.engine import Engine, seed_everything

    torch.set_flush_denormal(True)
    device = dist.setup("cpu")
    seed_everything(0)
    model = build_model("tiny_cnn", 2, weights="none", input_spec=sized_input(REGISTRY["tiny_cnn"], 32))
    done = [0]

    def fail_on_rank_1() -> None:
        done[0] += 1
        if dist.rank() == 1 and done[0] == step:
            raise RuntimeError(f"rank 1 fails on purpose after step {step}")

    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4,))) for _ in range(1000)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    Engine(task=ClassificationTask(), device=device, after_step=[fail_on_rank_1]).run_epoch(model, batches, opt)
    dist.teardown()
    return 0


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "audit":
        sep = sys.argv.index("--")
        sys.exit(_audit(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[sep + 1 :]))
    if mode == "raise":
        sys.exit(_raise(int(sys.argv[2])))
    raise SystemExit(f"unknown mode {mode!r}")
