"""Data-parallel training: real torchrun jobs (gloo, 2 CPU processes) against one process.

Each job is a subprocess (``python -m torch.distributed.run`` or ``defectscope ...
--nproc-per-node 2``) on tiny_cnn and 32 px synthetic images; the in-process tests cover the
sampler arithmetic the jobs rely on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.training.conftest import write_folder  # noqa: E402
from training import distributed as dist  # noqa: E402
from training.classification.loader import make_loader  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
JOB_TIMEOUT = 240  # a 2-process job here takes ~15 s; the 2-core machine is shared


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        DEFECTSCOPE_THREADS="1",
        DEFECTSCOPE_CACHE=str(tmp_path / "cache"),
        DEFECTSCOPE_OFFLINE="1",
        DEFECTSCOPE_DIST_TIMEOUT="60",
    )
    env.update(extra)
    return env


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def _run(cmd: list[str], tmp_path: Path, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture
def ddp_data(tmp_path) -> Path:
    # 49 images -> 29 train (balance=loss weights differ from 1); batch 8 leaves a last batch of 5 (3 + 2)
    return write_folder(tmp_path / "parts", {"ok": 31, "defect": 18}, size=32)


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--out", str(out), "--backbone", "tiny_cnn", "--weights", "none",
        "--image-size", "32", "--batch-size", "8", "--strategy", "two-phase", "--head-epochs", "1",
        "--epochs", "2", "--bn", "frozen", "--no-augment", "--lr", "5e-3", "--head-lr", "1e-2",
        "--val-fraction", "0.25", "--test-fraction", "0.2", "--threads", "1", "--device", "cpu",
        "--patience", "99", "--quiet", *extra,
    ]  # fmt: skip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(str(run / "last.pt"), map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("n,batch,balance", [(29, 8, "none"), (29, 8, "sampler"), (33, 8, "loss"), (30, 6, "none")])
def test_sharded_batches_are_the_single_process_batches(n, batch, balance):
    ds = torch.utils.data.TensorDataset(torch.arange(n))
    labels = (np.arange(n) % 3 == 0).astype(np.int64)
    one = [b[0].tolist() for b in make_loader(ds, labels, 2, batch, train=True, balance=balance, seed=7)]
    ranks = [
        [b[0].tolist() for b in make_loader(ds, labels, 2, batch, train=True, balance=balance, seed=7, shard=(r, 2))]
        for r in range(2)
    ]
    assert [a + b for a, b in zip(*ranks)] == one
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    assert all(abs(len(a) - len(b)) <= 1 for a, b in zip(*ranks))


def test_global_batch_arithmetic():
    assert dist.global_batches(29, 8, 1, drop_last=False) == 4
    assert dist.global_batches(33, 8, 1, drop_last=True) == 4  # a trailing batch of 1 is dropped
    assert dist.global_batches(33, 8, 4, drop_last=True) == 4
    assert dist.global_batches(35, 8, 4, drop_last=False) == 4  # 3 images cannot feed 4 ranks
    assert [dist.shard_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert dist.per_rank_batch(32, 4) == 8
    with pytest.raises(dist.DistributedError, match="global batch.*multiple of 3"):
        dist.per_rank_batch(32, 3)


def test_launch_flag_is_stripped_and_relaunches_through_torchrun():
    n, rest = dist.split_launch_args(["--data", "d", "--nproc-per-node", "2", "--quiet"])
    assert (n, rest) == (2, ["--data", "d", "--quiet"])
    assert dist.split_launch_args(["--nproc-per-node=3"]) == (3, [])
    with pytest.raises(dist.DistributedError, match="positive"):
        dist.split_launch_args(["--nproc-per-node", "0"])
    cmd = dist.launch_command("train", ["--quiet"], 2)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and cmd[-3:] == [
        "defectscope",
        "train",
        "--quiet",
    ]


def test_a_bad_process_count_is_one_error_line_and_exit_2(capsys):
    from defectscope.tasks import extend
    from training.classification.cli import train_main

    assert train_main(["--data", "elpv", "--nproc-per-node", "0"]) == 2
    assert extend(["--from", "r", "--data", "d", "--out", "o", "--nproc-per-node", "-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and "positive" in line for line in err)


def test_help_states_the_global_batch(capsys):
    from training.classification.cli import build_train_parser
    from training.classification.config import OPTIM
    from training.classification.extend_cli import build_parser

    for parser in (build_train_parser(), build_parser()):
        text = " ".join(parser.format_help().split())
        assert f"GLOBAL batch size ({OPTIM.batch_size})" in text
        assert "--nproc-per-node" in text and "--sync-bn" in text


# ----------------------------------------------------------------------------- torchrun jobs


def test_two_processes_train_the_weights_of_one_and_only_rank_0_writes(tmp_path, ddp_data):
    """Same global batch, seed and data: 2 gloo ranks end at 1 process's weights; rank 1 writes nothing."""
    _run([sys.executable, "-m", "defectscope", *_train_args(ddp_data, tmp_path / "one")], tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    job = _torchrun(str(WORKER), "audit", str(tmp_path / "two"), str(logs), "--",
                    *_train_args(ddp_data, tmp_path / "two"))  # fmt: skip
    _run(job, tmp_path)
    _assert_same_weights(_weights(tmp_path / "one"), _weights(tmp_path / "two"))
    one, two = (json.loads((tmp_path / r / "report.json").read_text()) for r in ("one", "two"))
    assert two["distributed"]["world_size"] == 2 and one["distributed"]["world_size"] == 1
    assert two["n"] == one["n"] and two["accuracy"] == pytest.approx(one["accuracy"])
    h1, h2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    for a, b in zip(h1, h2):  # epoch losses are reduced over ranks: the global batch's
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val"]["accuracy"] == pytest.approx(a["val"]["accuracy"])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    w0, w1 = (json.loads((logs / f"writes-{r}.json").read_text()) for r in (0, 1))
    assert any(p.endswith("last.pt") for _, p in w0)
    assert w1 == [], f"rank 1 wrote into the run directory: {w1[:5]}"
    state = torch.load(str(tmp_path / "two" / "last.pt"), weights_only=True)
    assert state["world"] == 2 and len(state["rng_ranks"]) == 2


def test_fisher_over_two_ranks_equals_one_process(tmp_path, ddp_data):
    """``extend --finalize``: each rank its shard of the same inputs, all-reduced = the 1-process Fisher."""
    from training.ewc_state import EWCState

    run = tmp_path / "src"
    _run([sys.executable, "-m", "defectscope", *_train_args(ddp_data, run, "--epochs", "1")], tmp_path)
    fin = ["extend", "--from", str(run), "--finalize", "--fisher-samples", "13", "--fisher-draws", "2",
           "--threads", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    _run([sys.executable, "-m", "defectscope", *fin], tmp_path)
    one = EWCState.load(run / "fisher.safetensors")
    (run / "fisher.safetensors").unlink()
    _run([sys.executable, "-m", "defectscope", *fin, "--nproc-per-node", "2"], tmp_path)  # the re-launch flag
    two = EWCState.load(run / "fisher.safetensors")
    assert one.anchor_sha256 == two.anchor_sha256 and one.tasks[0].n_samples == two.tasks[0].n_samples == 13
    for n in one.fisher:
        assert one.fisher[n].abs().sum() > 0 or "bias" in n
        torch.testing.assert_close(two.fisher[n], one.fisher[n], rtol=1e-5, atol=1e-9, msg=n)


@pytest.mark.slow
def test_extend_with_replay_and_new_class_on_two_ranks_matches_one(tmp_path, ddp_data):
    """extend (EWC + a replay buffer, a grown head): 2 ranks end at 1 process's weights and Fisher."""
    from safetensors.torch import load_file

    from training.ewc_state import EWCState

    src = tmp_path / "src"
    _run([sys.executable, "-m", "defectscope", *_train_args(ddp_data, src, "--epochs", "1", "--fisher", "8")], tmp_path)
    new = write_folder(tmp_path / "line2", {"ok": 12, "defect": 8, "stain": 10}, size=32, seed=1)
    ext = ["extend", "--from", str(src), "--data", str(new), "--replay", "25%", "--epochs", "2", "--batch-size", "8",
           "--lambda", "100", "--fisher-samples", "8", "--no-augment", "--threads", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    _run([sys.executable, "-m", "defectscope", *ext, "--out", str(tmp_path / "one")], tmp_path)
    _run([sys.executable, "-m", "defectscope", *ext, "--out", str(tmp_path / "two"), "--nproc-per-node", "2"], tmp_path)
    _assert_same_weights(*(load_file(str(tmp_path / r / "best.safetensors")) for r in ("one", "two")))
    f1, f2 = (EWCState.load(tmp_path / r / "fisher.safetensors") for r in ("one", "two"))
    for n in f1.fisher:
        torch.testing.assert_close(f2.fisher[n], f1.fisher[n], rtol=1e-4, atol=1e-8, msg=n)
    r1, r2 = (json.loads((tmp_path / r / "report.json").read_text()) for r in ("one", "two"))
    assert r2["distributed"]["world_size"] == 2 and r2["replay"]["size"] == r1["replay"]["size"] > 0
    assert r2["new_accuracy_after"] == pytest.approx(r1["new_accuracy_after"])


def test_a_rank_that_raises_ends_the_job_nonzero_within_the_timeout(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run(_torchrun(str(WORKER), "raise", "3"), env=_env(tmp_path, DEFECTSCOPE_DIST_TIMEOUT="30"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=JOB_TIMEOUT)  # fmt: skip
    assert p.returncode != 0
    assert time.monotonic() - t0 < 120
    assert "rank 1 fails on purpose after step 3" in p.stderr + p.stdout


@pytest.mark.slow
def test_c10d_rendezvous_on_localhost(tmp_path, ddp_data):
    """The multi-node form (README): explicit c10d rendezvous on a localhost endpoint, 1 node x 2."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=test", "-m", "defectscope",
           *_train_args(ddp_data, tmp_path / "c10d", "--epochs", "1")]  # fmt: skip
    _run(job, tmp_path)
    assert json.loads((tmp_path / "c10d" / "report.json").read_text())["distributed"]["world_size"] == 2


@pytest.mark.slow
def test_resume_after_killing_the_job_mid_run(tmp_path, ddp_data):
    """SIGKILL the whole 2-rank job after its first epoch; --resume ends where one uninterrupted process does."""
    args = ["--epochs", "30", "--head-epochs", "0", "--strategy", "full"]
    _run([sys.executable, "-m", "defectscope", *_train_args(ddp_data, tmp_path / "one", *args)], tmp_path)
    out = tmp_path / "two"
    job = subprocess.Popen([sys.executable, "-m", "defectscope", *_train_args(ddp_data, out, *args),
                            "--nproc-per-node", "2"], env=_env(tmp_path), cwd=tmp_path, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (out / "last.pt").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert not (out / "report.json").exists(), "the job finished before it was killed"
    killed_at = torch.load(str(out / "last.pt"), weights_only=True)["epoch"]
    assert killed_at < 29
    _run([sys.executable, "-m", "defectscope", "train", "--out", str(out), "--resume", "--quiet",
          "--nproc-per-node", "2"], tmp_path)  # fmt: skip
    _assert_same_weights(_weights(tmp_path / "one"), _weights(out))
    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 31))


@pytest.mark.slow
def test_detector_trains_on_two_ranks(tmp_path):
    """Faster R-CNN through the same engine under torchrun: rank 0 writes the run, the job exits 0."""
    from tests.training.detection.conftest import TINY, write_squares_coco

    data = write_squares_coco(tmp_path / "coco", ("square", "bar")) / "train.json"
    out = tmp_path / "detrun"
    _run(_torchrun("-m", "defectscope", "train", "--data", str(data), "--out", str(out), "--epochs", "1",
                   "--max-steps-per-epoch", "2", *TINY, "--threads", "1", "--device", "cpu"), tmp_path)  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "detection" and report["distributed"]["world_size"] == 2
