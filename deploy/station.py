"""Install, roll back, prune and report model bundles on one station.

An install verifies everything (signature if the station requires one, manifest
schema, every sha256, ONNX graph I/O) in a hidden staging directory on the same
filesystem, renames the verified tree to ``<name>/<version>``, then switches
``current`` atomically. With ``reload`` it asks every station daemon that follows
``<name>/current`` to reload and waits until each ``/readyz`` reports the new
version; if one does not within the timeout, ``current`` is switched back, the
daemons are reloaded again and the install fails (exit code 3).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.config import DeployConfig, DeployError, Station, check_component, discover_stations, rooted
from deploy.service import Readiness, query_readyz, reload_failures, run_reload, wait_for_version
from deploy.signing import default_signature_path, verify_manifest
from deploy.status_report import status_report
from deploy.store import BUILDS, ModelStore
from deploy.store_state import version_key
from deploy.trust import owned_by_root, read_checked
from runtime.bundle.archive import _world_readable

MANIFEST = "manifest.json"
MAX_SIGNATURE_BYTES = 64 << 10  # a signature file is ~400 bytes of JSON


class HealthCheckError(DeployError):
    """The daemon did not report the new version in time; the previous one was restored."""

    exit_code = 3


class RollbackFailedError(DeployError):
    """The health check failed and restoring the previous version failed too: the station needs attention."""

    exit_code = 4


@dataclass
class Options:
    """Per-command choices that override ``deploy.toml``."""

    reload: bool = False
    stations: list[str] | None = None
    timeout_s: float | None = None
    keep: int | None = None
    public_keys: list[Path] | None = None  # controller-local paths (not under --root)
    signature: Path | None = None
    force: bool = False
    allow_downgrade: bool = False
    from_version: str | None = None  # rollback: only when this version is active (a re-run is a no-op)


@dataclass
class Outcome:
    """What a command did, printed as text or ``--json``."""

    action: str
    name: str
    version: str | None
    previous: str | None = None
    changed: bool = False
    path: str | None = None
    signed_by: str | None = None
    reloaded: dict[str, str] = field(default_factory=dict)  # station -> readiness description
    pruned: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Deployer:
    """Deploy operations on the tree under ``root`` (``/`` on a real station)."""

    def __init__(self, root: Path, cfg: DeployConfig):
        self.root = Path(root)
        self.cfg = cfg
        self.store = ModelStore(rooted(self.root, cfg.models_dir))

    @property
    def is_system_root(self) -> bool:
        return self.root.resolve() == Path("/")

    # ---- verification --------------------------------------------------------
    def _trusted_keys(self, opts: Options) -> list[Path]:
        if opts.public_keys:
            return list(opts.public_keys)
        return [rooted(self.root, k) for k in self.cfg.public_keys]

    def _limits(self) -> Any:
        from runtime.bundle.stage import Limits

        return Limits(max_bytes=self.cfg.max_bundle_mib << 20, max_files=self.cfg.max_files)

    def _check_signature(
        self, source: Path, manifest_bytes: bytes, opts: Options, outcome: Outcome, private_dir: Path
    ) -> None:
        from runtime.bundle.signature import SignatureError

        keys = self._trusted_keys(opts)
        sig = Path(opts.signature) if opts.signature else default_signature_path(source)
        if not keys:
            if sig.is_file():
                outcome.warnings.append(
                    f"{sig} not checked: this station trusts no signing keys ([signing] public_keys)"
                )
            return
        if not os.path.lexists(sig):
            verify_manifest(manifest_bytes, sig, keys)  # raises the "missing" SignatureError
        # Read once through a checked descriptor (a FIFO or a huge file swapped in cannot hang or
        # flood root), then verify a private copy of those bytes.
        copy = private_dir / f"{uuid.uuid4().hex[:12]}.sig"
        copy.write_bytes(read_checked(sig, "signature", MAX_SIGNATURE_BYTES))
        try:
            verified = verify_manifest(manifest_bytes, copy, keys)
        except SignatureError as exc:
            raise SignatureError(exc.check, str(exc).split(": ", 1)[1].replace(str(copy), str(sig))) from None
        finally:
            copy.unlink(missing_ok=True)
        outcome.signed_by = verified.key_id

    def _check_downgrade(self, name: str, version: str, opts: Options, outcome: Outcome) -> None:
        """Anti-rollback (TUF-style): a signed bundle older than the newest one installed needs --allow-downgrade."""
        if not outcome.signed_by or opts.allow_downgrade:
            return
        newest = self.store.highest_version(name)
        if newest is not None and version_key(version) < version_key(newest):
            raise DeployError(
                f"{name} {version} is older than {newest}, the newest version installed on this station: refusing a "
                f"downgrade (a replayed old signed bundle); use `deploy rollback --to {version}` for an installed "
                "version, or install with --allow-downgrade"
            )

    # ---- install -------------------------------------------------------------
    def install(self, source: Path, opts: Options) -> Outcome:
        from runtime.bundle.manifest import BundleError
        from runtime.bundle.stage import BundleSource

        source = Path(source)
        try:
            # Opened once, owner checked on the open descriptor, every read from it (a swap later is never read);
            # reads only manifest.json and the listing: nothing is written before the signature passes.
            src = BundleSource(source, self._limits(), trust=owned_by_root("bundle") if os.geteuid() == 0 else None)
        except BundleError as exc:
            raise DeployError(f"bundle verification (manifest, checksums, ONNX graph) failed: {exc}") from None
        with contextlib.closing(src), self.store.lock():
            staging = self.store.prepare_staging()
            staged = staging / uuid.uuid4().hex[:12]
            outcome = Outcome(action="install", name="?", version=None)
            try:
                self._check_signature(source, src.manifest_bytes, opts, outcome, staging)
                manifest = src.manifest
                name = check_component("name", manifest.model.name, str(source))
                version = check_component("version", manifest.model.version, str(source))
                outcome.name, outcome.version = name, version
                self._check_downgrade(name, version, opts, outcome)
                vdir = self.store.version_dir(name, version)
                vdir.parent.mkdir(parents=True, exist_ok=True)
                outcome.warnings += self.store.recover(name)
                if not vdir.is_dir() or self._replace_existing(vdir, manifest, opts):
                    try:
                        src.extract(staged)  # copies, fsyncs and verifies every file (+ ONNX graphs)
                    except BundleError as exc:
                        raise DeployError(
                            f"bundle verification (manifest, checksums, ONNX graph) failed: {exc}"
                        ) from None
                    _world_readable(staged)
                    self.store.place_version(name, version, staged)
                    outcome.changed = True
                    self.store.record_install(
                        name,
                        version,
                        source=str(source),
                        signed_by=outcome.signed_by,
                        manifest_sha256=src.manifest_sha256,
                    )
            finally:
                if staged.exists():
                    shutil.rmtree(staged, ignore_errors=True)
            outcome.path = str(vdir)
            outcome.previous = self.store.current(name)
            self._activate(name, version, outcome.previous, "install", opts, outcome)
            keep = self.cfg.keep if opts.keep is None else opts.keep
            outcome.pruned = self.store.prune(name, keep, protect=self._pinned(name))
            return outcome

    def _replace_existing(self, vdir: Path, manifest: Any, opts: Options) -> bool:
        """Same version already installed: False to reuse it (same files), True to replace it (--force or damaged)."""
        from runtime.bundle.load import load_bundle, read_manifest
        from runtime.bundle.manifest import BundleError

        try:
            installed = read_manifest(vdir)
            # The station may have added artifacts (a TensorRT engine); every shipped file must match.
            same = all(installed.files.get(f) == d for f, d in manifest.files.items())
            if same:
                load_bundle(vdir, verify=True, check_graph=False)
        except BundleError:
            return True  # a damaged installed copy is always replaced by the verified one
        if same:
            return bool(opts.force)
        if not opts.force:
            raise DeployError(
                f"{vdir}: version {manifest.model.version} of {manifest.model.name} is already installed with "
                "different files; give the new bundle a new version (or --force to replace it)"
            )
        return True

    def _pinned(self, name: str) -> set[str]:
        """Versions named directly by a station config: never pruned."""
        pinned = set()
        for st in discover_stations(self.root, self.cfg):
            pv = st.pinned_version(self.cfg)
            if pv and pv[0] == name:
                pinned.add(pv[1])
        return pinned

    # ---- activation + health gate -------------------------------------------
    def followers(self, name: str, only: list[str] | None) -> list[Station]:
        """Stations whose config follows ``<name>/current`` (optionally only the named ones)."""
        stations = discover_stations(self.root, self.cfg, only)
        following = [s for s in stations if s.model_name(self.cfg) == name]
        if only:
            other = [s.name for s in stations if s not in following]
            if other:
                raise DeployError(
                    f"station(s) {', '.join(other)} do not follow {self.cfg.models_dir}/{name}/current "
                    "(see [model] bundle in their config); nothing to reload there"
                )
        return following

    def _activate(
        self, name: str, version: str, previous: str | None, action: str, opts: Options, outcome: Outcome
    ) -> None:
        switched = previous != version
        if switched:
            self.store.switch(name, version)
            self.store.record_activation(name, version, action)
            outcome.changed = True
        if not opts.reload:
            return
        stations = self.followers(name, opts.stations)
        if not stations:
            outcome.warnings.append(
                f"no station config in {self.cfg.config_dir} follows {self.cfg.models_dir}/{name}/current: nothing reloaded"
            )
            return
        timeout = self.cfg.ready_timeout_s if opts.timeout_s is None else opts.timeout_s
        if not switched and not outcome.changed:
            # Nothing switched (a re-run): reload only stations not already serving this version.
            answers0 = {st.name: query_readyz(st.readyz_url(self.cfg)) for st in stations}
            stations = [st for st in stations if not _serves(answers0[st.name], name, version)]
            outcome.reloaded = {s: r.describe() for s, r in answers0.items()}
            if not stations:
                return
        ok, answers = self._reload_and_wait(stations, name, version, timeout)
        outcome.reloaded = {s: r.describe() for s, r in answers.items()}
        if ok:
            self.store.mark_last_activation(name, version, health="ok")
            return
        failing = {s: r.describe() for s, r in answers.items() if not _serves(r, name, version)}
        detail = "; ".join(f"{s}: {d}" for s, d in failing.items())
        if not switched:
            raise HealthCheckError(
                f"health check failed: {name} {version} is active but not served ({detail}; timeout {timeout:.0f} s)"
            )
        self.store.mark_last_activation(name, version, health="failed")
        self.store.switch(name, previous)
        if previous is None:
            raise HealthCheckError(
                f"health check failed: {name} {version} not served ({detail}; timeout {timeout:.0f} s); "
                f"there was no previous version, so {name}/current was removed"
            )
        self.store.record_activation(name, previous, "auto-rollback", reason=f"{version} failed its health check")
        ok_back, back = self._reload_and_wait(stations, name, previous, timeout)
        outcome.reloaded = {s: r.describe() for s, r in back.items()}
        if not ok_back:
            raise RollbackFailedError(
                f"health check failed for {name} {version} ({detail}) and after switching back to {previous} the "
                f"station still does not serve it: " + "; ".join(f"{s}: {r.describe()}" for s, r in back.items())
            )
        raise HealthCheckError(
            f"health check failed: {name} {version} not served ({detail}; timeout {timeout:.0f} s); "
            f"rolled back to {previous}, which is serving again"
        )

    def _reload_and_wait(
        self, stations: list[Station], name: str, version: str, timeout: float
    ) -> tuple[bool, dict[str, Readiness]]:
        errors: dict[str, Readiness] = {}
        failures_before = {st.name: reload_failures(st.readyz_url(self.cfg)) for st in stations}
        reload_before = {st.name: query_readyz(st.readyz_url(self.cfg)).last_reload for st in stations}
        for st in stations:
            try:
                run_reload(self.cfg, st)
            except DeployError as exc:
                errors[st.name] = Readiness(st.readyz_url(self.cfg), reachable=False, error=str(exc))
        pending = {st.name: st.readyz_url(self.cfg) for st in stations if st.name not in errors}
        ok, answers = (
            wait_for_version(
                pending, name, version, timeout, failures_before=failures_before, reload_before=reload_before
            )
            if pending
            else (True, {})
        )
        answers.update(errors)
        return ok and not errors, answers

    # ---- rollback / prune / status ------------------------------------------
    def resolve_name(self, name: str | None) -> str:
        names = self.store.names()
        if name:
            if name not in names:
                raise DeployError(
                    f"{self.store.models_dir}: no model named {name!r} installed (installed: {names or 'none'})"
                )
            return name
        if len(names) == 1:
            return names[0]
        if not names:
            raise DeployError(f"{self.store.models_dir}: no models installed")
        raise DeployError(
            f"{self.store.models_dir}: several models installed ({', '.join(names)}); pick one with --name"
        )

    def rollback(self, name: str | None, to: str | None, opts: Options) -> Outcome:
        """Walk back one step in the install history (never forward), or to ``to``.

        With ``opts.from_version`` nothing happens unless that version is active, so a
        re-run of the rollback playbook after a partial run changes nothing more.
        """
        with self.store.lock():
            name = self.resolve_name(name)
            recovered = self.store.recover(name)
            current = self.store.current(name)
            if opts.from_version is not None and current != opts.from_version and not (to and current == to):
                return Outcome(
                    action="rollback",
                    name=name,
                    version=current,
                    previous=current,
                    path=str(self.store.version_dir(name, current)) if current else None,
                    warnings=[f"{name} {opts.from_version} is not active (active: {current}); nothing to do"],
                )
            target = to or self.store.rollback_target(name)
            if target is None:
                raise DeployError(
                    f"{self.store.model_dir(name)}: no older version of {name} in the install history to roll back "
                    f"to (rollback never moves forward; use --to VERSION, installed: {', '.join(self.store.versions(name))})"
                )
            if target not in self.store.versions(name):
                raise DeployError(
                    f"{self.store.model_dir(name)}: version {target} is not installed "
                    f"(installed: {', '.join(self.store.versions(name)) or 'none'})"
                )
            outcome = Outcome(
                action="rollback",
                name=name,
                version=target,
                previous=current,
                path=str(self.store.version_dir(name, target)),
                warnings=recovered,
            )
            self._activate(name, target, current, "rollback-to" if to else "rollback", opts, outcome)
            return outcome

    def prune(self, name: str | None, keep: int | None) -> list[Outcome]:
        keep = self.cfg.keep if keep is None else keep
        with self.store.lock():
            names = [self.resolve_name(name)] if name else self.store.names()
            outcomes = []
            for n in names:
                recovered = self.store.recover(n)
                doomed = self.store.prune(n, keep, protect=self._pinned(n))
                outcomes.append(
                    Outcome(
                        action="prune",
                        name=n,
                        version=self.store.current(n),
                        pruned=doomed,
                        changed=bool(doomed),
                        warnings=recovered,
                    )
                )
            self.store.clear_staging()
            self.store.clean_builds(BUILDS)
            return outcomes

    def status(self, query: bool = True) -> dict[str, Any]:
        """Installed versions, the active one, and what each station's service and daemon report."""
        return status_report(self.root, self.cfg, self.store, self.is_system_root, query)


def _serves(r: Readiness, name: str, version: str) -> bool:
    return r.ready and r.model is not None and r.model.get("name") == name and str(r.version) == version
