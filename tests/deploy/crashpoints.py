"""Kill a deploy operation at each of its durable filesystem steps, and check the store after each kill.

``python -m tests.deploy.crashpoints SCENARIO TEMPLATE WORK`` copies the store under
``TEMPLATE`` (a ``--root`` made by the test with the real CLI) to a fresh ``WORK`` tree for
every step N, forks a child that runs the operation and SIGKILLs itself just before its N-th
``rename``/``replace``/``symlink``/``fsync``/``unlink``/``rmdir`` (the real call, the real
signal), then checks what a station would find: ``current`` resolves to a version whose
files verify, the version is one the operation could leave, and a ``deploy prune`` that
follows keeps it. N grows until the operation completes. Prints one JSON report.

Forked, not exec'd, so each step costs a fork rather than an interpreter start; the parent
never opens an ONNX Runtime session (the child's install does) so the fork is clean.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

MODELS = "opt/defectscope/models"
STEPS = ("rename", "replace", "symlink", "fsync", "unlink", "rmdir")


def _arm(kill_at: int) -> None:
    """Wrap the os calls that change what a reader sees or make it durable; SIGKILL before call ``kill_at``."""
    count = [0]

    def wrap(fn: Any) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return step

    for name in STEPS:
        setattr(os, name, wrap(getattr(os, name)))


def _operation(scenario: str, work: Path, extra: dict[str, str]) -> int:
    from deploy.cli import main

    root = str(work)
    if scenario in ("reinstall", "reinstall-again"):
        return main(["install", extra["archive"], "--root", root, "--force", "--keep", "5"])
    if scenario == "rollback":
        return main(["rollback", "--root", root])
    if scenario == "prune":
        return main(["prune", "--root", root, "--keep", "0"])
    if scenario == "engine":
        from deploy.config import rooted
        from deploy.engine import _manifest_sha, adopt_build
        from deploy.store import ModelStore

        store = ModelStore(rooted(work, "/" + MODELS))
        built = store.models_dir / ".builds/b1/bundle"
        adopt_build(store, "tiny", extra["version"], built, _manifest_sha(store.version_dir("tiny", extra["version"])))
        return 0
    raise SystemExit(f"unknown scenario {scenario}")


def _check(work: Path, allowed: set[str]) -> dict[str, Any]:
    """What the daemon would load now, and after a following ``deploy prune``."""
    from deploy.cli import main
    from runtime.bundle.load import load_bundle
    from runtime.bundle.manifest import BundleError

    mdir = work / MODELS / "tiny"
    out: dict[str, Any] = {}
    for phase in ("after_kill", "after_prune"):
        if phase == "after_prune":
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                out["prune_rc"] = main(["prune", "--root", str(work)])
            out["prune_err"] = err.getvalue()[-300:]
        try:
            version = load_bundle(mdir / "current", verify=True, check_graph=False).manifest.model.version
            out[phase] = version if version in allowed else f"unexpected version {version}"
        except (BundleError, OSError) as exc:
            out[phase] = f"current does not load: {exc}"[:300]
    broken = []
    for p in mdir.iterdir():
        if not p.name.startswith(".") and p.name != "current":
            try:
                load_bundle(p, verify=True, check_graph=False)
            except (BundleError, OSError) as exc:
                broken.append(f"{p.name}: {exc}"[:200])
    out["broken_versions"] = broken
    return out


def main() -> int:
    scenario, template, base = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    allowed = set(extra.get("allowed", "").split(","))
    report: dict[str, Any] = {"scenario": scenario, "kills": [], "completed_at": None}
    for n in range(1, 500):
        work = base / f"n{n}"
        shutil.copytree(template, work, symlinks=True)
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            _arm(n)
            try:
                rc = _operation(scenario, work, extra)
            except BaseException:  # noqa: BLE001 - the child reports by exit code only
                rc = 70
            os._exit(rc if isinstance(rc, int) else 0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if not killed:
            report["completed_at"] = n
            report["exit_code"] = os.waitstatus_to_exitcode(status)
            report["final"] = _check(work, allowed)
            break
        report["kills"].append({"step": n, **_check(work, allowed)})
        shutil.rmtree(work)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
