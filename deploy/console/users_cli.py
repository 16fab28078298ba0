"""`defectscope console user add|passwd|list|disable|enable`: manage console users in the store, no restart.

The running console sees a change within a few seconds (its session cache); setting a password
or disabling a user ends their sessions.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from deploy.console.config import ROLES
from deploy.console.password import HELP as PASSWORD_HELP
from deploy.console.password import PasswordMissing, read_password

PROG = "defectscope console user"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=f"manage console users in the results store. {PASSWORD_HELP}")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, text in (
        ("add", "add a user"),
        ("passwd", "set a user's password (ends their sessions)"),
        ("list", "list users"),
        ("disable", "disable a user (ends their sessions)"),
        ("enable", "enable a disabled user"),
    ):
        s = sub.add_parser(
            name, help=text, description=f"{text}. {PASSWORD_HELP}" if name in ("add", "passwd") else text
        )
        s.add_argument("--config", required=True, help="the console TOML (its [store] url is used)")
        if name != "list":
            s.add_argument("name")
        if name == "add":
            s.add_argument("--role", required=True, choices=ROLES)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from deploy.console.config import ConsoleConfigError, load
    from deploy.console.store import Store, StoreError
    from deploy.console.users import UserError, Users

    try:
        cfg = load(args.config)
        store = Store(cfg.store.url, cfg.store.retention_days)
    except (ConsoleConfigError, StoreError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    users = Users(store.engine)
    try:
        if args.cmd == "list":
            for u in users.all():
                changed = datetime.fromtimestamp(u.updated_at, timezone.utc).isoformat(timespec="seconds")
                print(f"{u.name}\t{u.role}\t{'disabled' if u.disabled else 'active'}\t{changed}")
        elif args.cmd == "add":
            users.add(args.name, args.role, read_password(f"password for {args.name}: ", confirm=True))
            print(f"added {args.name} ({args.role})")
        elif args.cmd == "passwd":
            if users.get(args.name) is None:
                raise UserError(f"no user {args.name!r}")
            users.set_password(args.name, read_password(f"new password for {args.name}: ", confirm=True))
            print(f"password of {args.name} set; their sessions ended")
        else:
            users.set_disabled(args.name, args.cmd == "disable")
            print(f"{args.name} {args.cmd}d")
    except (UserError, PasswordMissing) as exc:
        print(f"{PROG} {args.cmd}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0
