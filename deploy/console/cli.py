"""`defectscope console`: serve the line console; `defectscope console hash-password`: make a users[] hash."""

from __future__ import annotations

import argparse
import logging
import sys

from deploy.console.config import DEFAULT_HOST, DEFAULT_PORT
from deploy.console.password import HELP as PASSWORD_HELP
from deploy.console.password import PasswordMissing, read_password


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="defectscope console",
        description="Web console for line operators: live verdict tiles, history, review, CSV export. "
        "`defectscope console user add|passwd|list|disable|enable --config FILE` manages users "
        "(no restart); `defectscope console hash-password` prints an argon2 hash for a [[users]] "
        "seed entry; `defectscope console check-config --config FILE` validates a config. "
        "The database schema is migrated (Alembic) when the console starts. " + PASSWORD_HELP,
    )
    p.add_argument("--config", required=True, help="console TOML (see docs/contracts.md, 'Line console')")
    p.add_argument("--host", default=None, help=f"bind address (config server.host, default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None, help=f"port (config server.port, default {DEFAULT_PORT})")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def hash_password_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="defectscope console hash-password",
        description="print the argon2id hash of a password (for a [[users]] seed entry). " + PASSWORD_HELP,
    )
    p.add_argument(
        "--stdin",
        action="store_true",
        help="read the password from stdin (kept for scripts; the default does so too when stdin is not a terminal)",
    )
    p.parse_args(argv)
    from deploy.console.auth import hash_password
    from deploy.console.users import UserError, check_password

    try:
        pw = read_password(confirm=True)
        check_password(pw)
    except (PasswordMissing, UserError) as exc:
        print(f"defectscope console hash-password: {exc}", file=sys.stderr)
        return 1
    print(hash_password(pw))
    return 0


def check_config_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="defectscope console check-config", description="validate a console TOML")
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    from deploy.console.config import ConsoleConfigError, load

    try:
        cfg = load(args.config)
    except ConsoleConfigError as exc:
        print(f"defectscope console: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(cfg.stations)} stations, {len(cfg.users)} users, store {cfg.store.url})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hash-password"]:
        return hash_password_main(argv[1:])
    if argv[:1] == ["user"]:
        from deploy.console.users_cli import main as users_main

        return users_main(argv[1:])
    if argv[:1] == ["check-config"]:
        return check_config_main(argv[1:])
    args = build_parser().parse_args(argv)
    import uvicorn

    from deploy.console.app import create_app
    from deploy.console.config import ConsoleConfigError, load
    from deploy.console.store import StoreError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load(args.config)
        app = create_app(cfg)
    except (ConsoleConfigError, StoreError) as exc:
        print(f"defectscope console: {exc}", file=sys.stderr)
        return 2
    host = args.host or cfg.server.host
    port = cfg.server.port if args.port is None else args.port

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: close live sockets, then uvicorn's shutdown
            loop = getattr(app.state, "loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(app.state.console.streams.close_clients)
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=args.log_level,
            access_log=False,
            ws_max_size=64 * 1024,
            lifespan="on",
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
    )
    server.run()
    return 0
