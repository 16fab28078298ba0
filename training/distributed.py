"""Data-parallel training over ``torch.distributed``: process group, rank helpers, collectives.

One code path: ``defectscope train|extend`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
as set by ``torchrun``; ``--nproc-per-node N`` only re-launches the same command line through
``python -m torch.distributed.run --standalone`` (``relaunch``). Without those variables (or
with ``WORLD_SIZE=1``) every helper here is a no-op and nothing is initialised.

Backend: NCCL when the job trains on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU.
Collectives time out after ``$DEFECTSCOPE_DIST_TIMEOUT`` seconds (default ``DEFAULT_TIMEOUT_S``),
so a rank that died or hangs ends the job with an error; torchrun itself ends the surviving
ranks as soon as one worker exits non-zero.

Batches: ``ShardedBatchSampler`` draws the single-process order (the same seeded sampler,
uniform or class-balanced, on every rank) and gives each rank its contiguous slice of every
*global* batch, so ``--batch-size`` is the global batch and a step sees the same images as a
one-process step. Model wrapping (DDP) happens inside ``training.engine.Engine``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch.utils.data import Sampler

T = TypeVar("T")
M = TypeVar("M", bound=torch.nn.Module)
DEFAULT_TIMEOUT_S = 1800  # NCCL/gloo default is 30 min too; tests set $DEFECTSCOPE_DIST_TIMEOUT lower
TIMEOUT_ENV = "DEFECTSCOPE_DIST_TIMEOUT"
NPROC_HELP = (
    "processes on this node: re-launches this command through torch.distributed.run (torchrun "
    "--standalone); one per GPU (NCCL), or CPU processes (gloo). Under torchrun, leave it out"
)
SYNC_BN_HELP = "convert BatchNorm to SyncBatchNorm (batch statistics over the global batch; CUDA only)"


class DistributedError(RuntimeError):
    """A distributed setup that cannot work (batch not divisible, SyncBN on CPU, bad env)."""


@dataclass(frozen=True)
class DistEnv:
    """What torchrun put in the environment (``rank 0 of 1`` without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistEnv:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise DistributedError(f"RANK / WORLD_SIZE / LOCAL_RANK: expected integers ({exc})") from None
        if world < 1 or not 0 <= rank < world:
            raise DistributedError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
        return cls(rank, world, local)


# ----------------------------------------------------------------------------- setup


def timeout_s() -> float:
    v = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(v) if v else float(DEFAULT_TIMEOUT_S)
    except ValueError:
        raise DistributedError(f"${TIMEOUT_ENV}: expected seconds, got {v!r}") from None


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else the CPU; a CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def setup(device_name: str = "auto") -> torch.device:
    """The training device; initialises the process group when torchrun started >1 rank.

    ``device_name`` is the config's (auto | cpu | cuda[:N]); under NCCL each rank takes
    ``cuda:LOCAL_RANK`` whatever index was given. Idempotent.
    """
    env = DistEnv.from_env()
    device = pick_device(device_name)
    if env.world == 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=timeout_s()), rank=env.rank, world_size=env.world, **kw
        )
    return device


def teardown() -> None:
    """Destroy the process group (after the last collective; a no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def main_echo(echo: Callable[[str], None]) -> Callable[[str], None]:
    """``echo`` on rank 0, silence elsewhere (one log per job)."""
    return echo if is_main() else (lambda _s: None)


# ----------------------------------------------------------------------------- collectives


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op_name: str) -> torch.Tensor:
    if not active():
        return t
    import torch.distributed as dist

    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, op_name))
    return buf.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (float64 kept as given); returns a new tensor on ``t``'s device."""
    return _all_reduce(t, "SUM")


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, "MIN")


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors on the CPU), in rank order."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and hand its result (or its exception) to every rank.

    For what one process must do alone (check and create a run directory, read ``last.pt``)
    while the others must not run ahead or fail differently.
    """
    if not active():
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # re-raised on every rank below
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


# ----------------------------------------------------------------------------- batches


def per_rank_batch(global_batch: int, n_ranks: int, what: str = "--batch-size") -> int:
    """The per-process batch of a global one; it must divide evenly (LR semantics stay those of one process)."""
    if global_batch % n_ranks:
        raise DistributedError(
            f"{what} {global_batch} is the global batch and must divide evenly over {n_ranks} processes "
            f"(per-process = global / world size); use a multiple of {n_ranks}"
        )
    return global_batch // n_ranks


def shard_bounds(n: int, r: int, n_ranks: int) -> tuple[int, int]:
    """Contiguous ``[lo, hi)`` of ``n`` items for rank ``r``: shards in rank order concatenate to the whole."""
    base, extra = divmod(n, n_ranks)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def global_batches(n_indices: int, batch_size: int, n_ranks: int, drop_last: bool) -> int:
    """Global batches of one epoch: ``ceil(n / B)``, minus a trailing batch dropped by ``drop_last``
    (size 1, as one process drops it) or too small to give every rank an image."""
    full, rest = divmod(n_indices, batch_size)
    return full + (1 if rest and not (drop_last and rest == 1) and rest >= n_ranks else 0)


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``r``'s part of each global batch drawn from ``base`` (a seeded index sampler).

    Every rank iterates ``base`` identically (same seed, same generator), cuts the order into
    global batches of ``batch_size`` and keeps its contiguous slice (``shard_bounds``), so the
    union over ranks of step ``k`` is exactly the batch one process sees at step ``k``. A
    trailing batch of 1 is dropped with ``drop_last`` (as ``make_loader`` does); a trailing
    batch smaller than the world is dropped (a rank would have nothing to step on). Slices of
    a trailing batch may differ in size by one: the classification loss is normalised by the
    global batch (``training.classification.task.ClassificationTask``), so that stays exact.
    ``set_epoch`` reseeds the base generator with ``seed + epoch`` (DistributedSampler's
    contract); callers that build a fresh seeded sampler per epoch need not call it.
    Not ``torch.utils.data.DistributedSampler``: it strides one permutation (``rank::world``)
    and pads it, so its global step ``k`` is not one process's batch ``k``, and it has no
    class-balanced form; this keeps either sampler's one-process semantics.
    """

    def __init__(
        self,
        base: Sampler[int],
        batch_size: int,
        rank: int,
        world_size: int,
        *,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> None:
        self.base, self.batch_size, self.rank, self.world = base, batch_size, rank, world_size
        self.drop_last, self.generator, self.seed = drop_last, generator, seed

    def set_epoch(self, epoch: int) -> None:
        if self.generator is not None:
            self.generator.manual_seed(self.seed + epoch)

    def __len__(self) -> int:
        return global_batches(len(self.base), self.batch_size, self.world, self.drop_last)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        n_out, total = 0, len(self)
        for i in self.base:
            batch.append(int(i))
            if len(batch) == self.batch_size:
                yield self._slice(batch)
                n_out, batch = n_out + 1, []
        if batch and n_out < total:
            yield self._slice(batch)

    def _slice(self, batch: Sequence[int]) -> list[int]:
        lo, hi = shard_bounds(len(batch), self.rank, self.world)
        return list(batch[lo:hi])


# ----------------------------------------------------------------------------- model


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    if sync_bn and active() and device.type == "cpu":
        raise DistributedError("--sync-bn: torch's SyncBatchNorm runs on CUDA devices only, not with gloo on the CPU")


def convert_sync_bn(model: M, sync_bn: bool) -> M:
    """BatchNorm -> SyncBatchNorm in place (same parameter objects) when asked and distributed."""
    if not (sync_bn and active()):
        return model
    out = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same top module (it is no BN)
    return cast(M, out)


def wrap_ddp(model: torch.nn.Module, device: torch.device, find_unused: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` (rank 0's weights broadcast; gradients averaged).

    Built per epoch by the engine: DDP registers the parameters that require gradients at
    construction, and strategies change that set between epochs.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused)


# ----------------------------------------------------------------------------- launcher


def add_launch_args(p: argparse.ArgumentParser, sync_bn: bool = True) -> None:
    """The ``distributed`` flags of ``train`` / ``extend`` (help texts defined here, once)."""
    g = p.add_argument_group("distributed (torchrun; see README 'Training on several GPUs')")
    g.add_argument("--nproc-per-node", type=int, metavar="N", default=argparse.SUPPRESS, help=NPROC_HELP)
    if sync_bn:
        g.add_argument("--sync-bn", action="store_true", default=argparse.SUPPRESS, help=SYNC_BN_HELP)


def split_launch_args(argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """``(N of --nproc-per-node or None, argv without it)``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--nproc-per-node", type=int, default=None)
    ns, _ = pre.parse_known_args(list(argv))
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        rest.append(a)
    if ns.nproc_per_node is not None and ns.nproc_per_node < 1:
        raise DistributedError(f"--nproc-per-node: expected a positive integer, got {ns.nproc_per_node}")
    return ns.nproc_per_node, rest


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def launch_command(command: str, argv: Sequence[str], nproc: int) -> list[str]:
    """The torchrun command line that runs ``defectscope <command> argv`` on ``nproc`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # c10d rendezvous on a free localhost port
        f"--nproc-per-node={nproc}",
        "-m",
        "defectscope",
        command,
        *argv,
    ]


def launch_or_continue(command: str, argv: Sequence[str] | None) -> tuple[int | None, list[str]]:
    """The CLI entry of ``train`` / ``extend``: :func:`relaunch` on ``argv`` (default: the process's),
    a bad ``--nproc-per-node`` printed as one error line with exit code 2."""
    try:
        return relaunch(command, list(sys.argv[1:] if argv is None else argv))
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, []


def launched(command: str, body: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """``train`` / ``extend`` of either task: ``body(argv)`` in this process, or the same command
    again under torchrun when ``--nproc-per-node`` asks; the process group is torn down after."""
    rc, args = launch_or_continue(command, argv)
    if rc is not None:
        return rc
    try:
        return body(args)
    finally:
        teardown()


def relaunch(command: str, argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """``(exit code, None)`` after re-launching under torchrun when ``--nproc-per-node`` asks;
    else ``(None, argv without the flag)`` for the caller to run itself."""
    nproc, rest = split_launch_args(argv)
    if nproc is None or under_torchrun() or nproc == 1:
        return None, rest
    if any(a in ("-h", "--help") for a in rest):
        return None, rest
    cmd = launch_command(command, rest, nproc)
    try:
        return subprocess.call(cmd), rest
    except KeyboardInterrupt:  # torchrun got the same SIGINT and stops its workers
        return 130, rest


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistEnv",
    "DistributedError",
    "ShardedBatchSampler",
    "active",
    "add_launch_args",
    "all_gather_objects",
    "all_reduce_min",
    "all_reduce_sum",
    "barrier",
    "check_sync_bn",
    "convert_sync_bn",
    "global_batches",
    "is_main",
    "launch_command",
    "launch_or_continue",
    "main_echo",
    "on_main",
    "per_rank_batch",
    "rank",
    "relaunch",
    "setup",
    "shard_bounds",
    "split_launch_args",
    "launched",
    "pick_device",
    "teardown",
    "wrap_ddp",
    "world",
]
