"""``defectscope deploy``: install, roll back, prune and inspect model bundles on a station.

Exit codes: 0 done, 1 refused or failed before anything changed (bad bundle, bad
signature, bad config), 2 usage, 3 the new version failed its health check and the
previous one was restored, 4 the health check failed and so did the restore.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

MAX_ERROR_CHARS = 2000  # of one error message on stdout/stderr

EPILOG = """\
examples:
  defectscope deploy install elpv-lite0-1.2.0.tar.gz --reload      # verify, switch, reload, wait for /readyz
  defectscope deploy status
  defectscope deploy rollback --reload                              # back to the previously active version
  defectscope deploy install bundle/ --root /tmp/stage              # against a staging tree
  defectscope deploy keygen release.key && defectscope deploy sign bundle.tar.gz --key release.key
  sudo defectscope deploy install-units --station line1 --enable --now

Settings live in /etc/defectscope/deploy.toml ([install] keep, [signing] public_keys,
[service] reload_command / ready_timeout_s); stations are /etc/defectscope/<station>.toml.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        metavar="DIR",
        help="operate on the station tree under DIR instead of / (staging, tests)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="deploy settings file (default: <root>/etc/defectscope/deploy.toml; defaults if absent)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _gate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reload",
        action="store_true",
        help="reload the stations that follow this model and wait until /readyz reports the version; "
        "roll back automatically if it does not in time",
    )
    p.add_argument(
        "--station",
        action="append",
        dest="stations",
        metavar="NAME",
        help="only reload/wait for this station (repeatable; default: every station following the model)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="health-check timeout in seconds (default: [service] ready_timeout_s, 60)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectscope deploy",
        description="Install, roll back, prune and inspect model bundles on an inspection station; "
        "install the systemd units; sign bundles.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("install", help="verify a bundle (dir or .tar.gz), install it and make it current")
    p.add_argument("bundle", type=Path, help="bundle directory or archive")
    _common(p)
    _gate(p)
    p.add_argument(
        "--keep",
        type=int,
        default=None,
        metavar="N",
        help="previous versions to keep after installing (default: [install] keep, 3)",
    )
    p.add_argument(
        "--public-key",
        type=Path,
        action="append",
        dest="public_keys",
        metavar="PEM",
        help="require a signature by this Ed25519 public key (repeatable; overrides [signing] public_keys)",
    )
    p.add_argument(
        "--signature",
        type=Path,
        default=None,
        metavar="SIG",
        help="signature file (default: <bundle>.sig beside the bundle)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an installed version of the same number that has different files"
    )
    p.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="install a signed version older than the newest one installed (anti-rollback off for this run)",
    )

    p = sub.add_parser("rollback", help="step back in the install history (never forward), or --to VERSION")
    _common(p)
    _gate(p)
    p.add_argument("--name", help="model name (needed when several models are installed)")
    p.add_argument("--to", metavar="VERSION", help="activate this installed version")
    p.add_argument(
        "--from",
        dest="from_version",
        metavar="VERSION",
        help="only roll back if VERSION is active (re-running the same rollback then changes nothing)",
    )

    p = sub.add_parser("status", help="installed versions, the active one, service state and what each daemon serves")
    _common(p)
    p.add_argument("--no-query", action="store_true", help="do not ask systemd or the daemons")

    p = sub.add_parser("prune", help="delete old versions, keeping the active one and the N most recent others")
    _common(p)
    p.add_argument("--name", help="only this model")
    p.add_argument(
        "--keep", type=int, default=None, metavar="N", help="previous versions to keep (default: [install] keep)"
    )

    p = sub.add_parser("install-units", help="install the systemd units with this installation's paths")
    _common(p)
    p.add_argument(
        "--exec",
        dest="exec_path",
        default=None,
        metavar="PATH",
        help="station path of the defectscope script (default: the one of this installation)",
    )
    p.add_argument(
        "--station",
        action="append",
        dest="stations",
        metavar="NAME",
        help="station(s) to write path drop-ins for / enable (default: every /etc/defectscope/*.toml)",
    )
    p.add_argument("--enable", action="store_true", help="enable the stations' units (systemctl [--root] enable)")
    p.add_argument("--now", action="store_true", help="also start them (live system only)")
    p.add_argument("--unit-dir", default="/etc/systemd/system", help="station path for unit files")

    p = sub.add_parser("keygen", help="create an Ed25519 signing key pair (PEM)")
    p.add_argument("private_key", type=Path, help="private key file to write (mode 0600)")
    p.add_argument("--public", type=Path, default=None, help="public key file (default: <private>.pub)")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")

    p = sub.add_parser("sign", help="sign a bundle (dir or .tar.gz) with an Ed25519 private key")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="PEM private key")
    p.add_argument("--out", type=Path, default=None, help="signature file (default: <bundle>.sig)")

    p = sub.add_parser("verify", help="check a bundle and its signature without installing it")
    p.add_argument("bundle", type=Path)
    p.add_argument("--public-key", type=Path, action="append", dest="public_keys", metavar="PEM", required=True)
    p.add_argument("--signature", type=Path, default=None, metavar="SIG")

    p = sub.add_parser(
        "build-engine", help="build the TensorRT engine for a station's bundle (run by defectscope-engine@.service)"
    )
    _common(p)
    p.add_argument(
        "--station-config",
        dest="station_config",
        type=Path,
        required=True,
        metavar="TOML",
        help="station config (station path, e.g. /etc/defectscope/line1.toml)",
    )
    p.add_argument("--reload", action="store_true", help="reload the station after building")
    p.add_argument("--force", action="store_true", help="rebuild even if an engine for this TensorRT exists")
    p.add_argument("--build-args", default="", help="extra arguments for `defectscope build-engine`")
    p.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        metavar="FILE",
        help="TensorRT timing cache (the unit passes one in its CacheDirectory; default: build-engine's)",
    )
    return parser


def _print(outcome: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(outcome if isinstance(outcome, (dict, list)) else outcome.to_dict(), indent=2, default=str))
        return
    o = outcome
    if o.action == "install":
        what = "installed and activated" if o.changed else "already installed and active"
        print(
            f"{o.name} {o.version}: {what} ({o.path})"
            + (f", previous {o.previous}" if o.previous and o.previous != o.version else "")
        )
        if o.signed_by:
            print(f"  signature ok: {o.signed_by}")
    elif o.action == "rollback":
        print(
            f"{o.name}: {'rolled back' if o.changed else 'already on'} {o.version}"
            + (f" (was {o.previous})" if o.changed else "")
        )
    elif o.action == "prune":
        print(f"{o.name}: removed {', '.join(o.pruned) if o.pruned else 'nothing'} (active {o.version})")
    for station, desc in o.reloaded.items():
        print(f"  station {station}: {desc}")
    if getattr(o, "pruned", None) and o.action != "prune":
        print(f"  pruned {', '.join(o.pruned)}")
    for w in o.warnings:
        print(f"  warning: {w}", file=sys.stderr)


def _when(iso: str | None) -> str:
    """'2026-01-02T03:04:05+00:00' -> '2026-01-02 03:04Z' (the table stays narrow)."""
    return f"{iso[:10]} {iso[11:16]}Z" if iso else "-"


def _print_status(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not status["models"]:
        console.print(f"no models installed in {status['models_dir']}")
    for name, m in status["models"].items():
        table = Table(title=f"{name}  ({m['path']})", title_justify="left")
        for col in ("", "version", "installed", "last activated", "health", "signed by"):
            table.add_column(col)
        for v in m["versions"]:
            table.add_row(
                "*" if v["active"] else "",
                v["version"],
                _when(v["installed_at"]),
                _when(v["last_activated"]),
                v["health"] or "-",
                v["signed_by"] or "-",
            )
        console.print(table)
    for st in status["stations"]:
        line = f"station {st['name']}: bundle {st['bundle']}"
        if "service" in st:
            r = st["readyz"]
            served = f"{r['model'].get('name')} {r['model'].get('version')}" if r.get("model") else "-"
            state = ("ready" if r["ready"] else "not ready") if r["reachable"] else f"unreachable ({r['error']})"
            sync = "" if st["in_sync"] else "  [bold red]OUT OF SYNC[/]"
            line += f"\n  service {st['service']}; daemon {state}, serving {served}{sync}"
        console.print(line)


def _manifest_bytes(bundle: Path) -> bytes:
    from deploy.config import DeployError

    if bundle.is_dir():
        path = bundle / "manifest.json"
        if not path.is_file():
            raise DeployError(f"{path}: missing; {bundle} is not a bundle")
        return path.read_bytes()
    if bundle.is_file() and tarfile.is_tarfile(bundle):
        with tarfile.open(bundle, "r:*") as tar:
            try:
                member = tar.getmember("manifest.json")
            except KeyError:
                raise DeployError(f"{bundle}: archive has no manifest.json") from None
            fh = tar.extractfile(member)
            if fh is None:
                raise DeployError(f"{bundle}: manifest.json in the archive is not a regular file")
            return fh.read()
    raise DeployError(f"{bundle}: not a bundle directory or archive")


def _verify_only(args: argparse.Namespace) -> int:
    import tempfile

    from deploy.signing import default_signature_path, verify_manifest
    from runtime.bundle.archive import open_bundle
    from runtime.bundle.load import load_bundle

    with tempfile.TemporaryDirectory(prefix="defectscope-verify-") as tmp:
        bundle = open_bundle(args.bundle, workdir=tmp) if args.bundle.is_file() else load_bundle(args.bundle)
        sig = verify_manifest(
            (bundle.path / "manifest.json").read_bytes(),
            args.signature or default_signature_path(args.bundle),
            args.public_keys,
        )
    m = bundle.manifest.model
    print(f"{args.bundle}: {m.name} {m.version}: checksums ok, signature ok ({sig.key_id}, {sig.key_path})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deploy.config import ConfigError, DeployError, load_deploy_config, rooted
    from runtime.bundle.manifest import BundleError

    try:
        if args.action == "keygen":
            from deploy.signing import generate_keypair

            priv, pub, kid = generate_keypair(args.private_key, args.public, overwrite=args.force)
            print(
                f"wrote {priv} (keep it secret) and {pub}; key id {kid}\n"
                f'stations trust it with [signing] public_keys = ["/etc/defectscope/keys/{pub.name}"]'
            )
            return 0
        if args.action == "sign":
            from deploy.signing import default_signature_path, load_private_key, sign_manifest, write_signature

            doc = sign_manifest(_manifest_bytes(args.bundle), load_private_key(args.key))
            out = write_signature(doc, args.out or default_signature_path(args.bundle))
            print(f"signed {doc['model']['name']} {doc['model']['version']} with {doc['key_id']}: {out}")
            return 0
        if args.action == "verify":
            return _verify_only(args)

        cfg = load_deploy_config(args.root, args.config)
        if args.action == "install-units":
            from deploy.units import install_units

            report = install_units(args.root, cfg, args.exec_path, args.stations, args.enable, args.now, args.unit_dir)
            if args.json:
                print(json.dumps(report.__dict__, indent=2))
            else:
                for path in report.written:
                    print(f"wrote {path}")
                for cmd in report.commands:
                    print(f"ran   {cmd}")
                for w in report.warnings:
                    print(f"warning: {w}", file=sys.stderr)
                if not args.enable:
                    print(
                        "next: defectscope deploy install-units --station NAME --enable --now  (or systemctl enable --now defectscope@NAME)"
                    )
            return 0
        if args.action == "build-engine":
            from deploy.engine import build_for_station

            config = args.station_config
            if config.is_absolute():
                config = rooted(args.root, str(config))
            result = build_for_station(
                args.root, cfg, config, args.force, args.reload, args.build_args, timing_cache=args.timing_cache
            )
            print(result.reason)
            return 0

        from deploy.station import Deployer, Options

        deployer = Deployer(args.root, cfg)
        if args.action == "status":
            status = deployer.status(query=not args.no_query)
            _print(status, True) if args.json else _print_status(status)
            return 0
        if args.action == "prune":
            outcomes = deployer.prune(args.name, args.keep)
            if args.json:
                _print([o.to_dict() for o in outcomes], True)
            else:
                for o in outcomes:
                    _print(o, False)
            return 0
        opts = Options(reload=args.reload, stations=args.stations, timeout_s=args.timeout)
        if args.action == "install":
            if args.keep is not None and args.keep < 0:
                raise ConfigError(f"--keep: expected an integer >= 0, got {args.keep}")
            opts.keep, opts.public_keys, opts.signature, opts.force = (
                args.keep,
                args.public_keys,
                args.signature,
                args.force,
            )
            opts.allow_downgrade = args.allow_downgrade
            outcome = deployer.install(args.bundle, opts)
        else:
            opts.from_version = args.from_version
            outcome = deployer.rollback(args.name, args.to, opts)
        _print(outcome, args.json)
        return 0
    except (DeployError, BundleError, OSError) as exc:
        # Ansible parses stdout: every refusal (a full disk included) ends as one JSON object, no traceback.
        if isinstance(exc, OSError):
            exc = DeployError(f"{getattr(exc, 'filename', None) or 'deploy'}: {exc.strerror or exc}")
        code = getattr(exc, "exit_code", 1)
        message = str(exc)
        if len(message) > MAX_ERROR_CHARS:  # names in errors come from untrusted bundles: never flood a log
            message = f"{message[:MAX_ERROR_CHARS]}... ({len(message)} characters)"
        if getattr(args, "json", False):
            print(json.dumps({"error": message, "exit_code": code}, indent=2))
        print(f"defectscope deploy {args.action}: {message}", file=sys.stderr)
        return code
