"""Users and sessions in the database: CLI and admin API changes take effect without a restart; sessions
survive a console restart; CLI password prompts without a terminal end in one clear line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.deploy.console.conftest import ROOT, USERS, Client, wait_for

CODE = "import sys; from defectscope.cli import main; sys.exit(main(sys.argv[1:]))"


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "DEFECTSCOPE_CONSOLE_PASSWORD"}
    full.update(env or {}, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", CODE, *args],
        env=full,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def _config(con) -> str:
    return str(next(p for p in con.proc.args if p.endswith(".toml")))


def test_cli_user_add_passwd_disable_without_restart(console_factory):
    con = console_factory([])
    cfg = _config(con)
    assert Client(con.base).login("nina", "nina-pass-1") == 401
    r = cli(
        "console",
        "user",
        "add",
        "nina",
        "--role",
        "operator",
        "--config",
        cfg,
        env={"DEFECTSCOPE_CONSOLE_PASSWORD": "nina-pass-1"},
    )
    assert r.returncode == 0, r.stderr
    nina = Client(con.base)
    assert nina.login("nina", "nina-pass-1") == 200  # the running console sees the new user at once
    listed = cli("console", "user", "list", "--config", cfg).stdout
    assert "nina\toperator\tactive" in listed and "ada\tadmin\tactive" in listed

    r = cli("console", "user", "passwd", "nina", "--config", cfg, stdin="nina-pass-2\n")  # piped, no terminal
    assert r.returncode == 0, r.stderr
    wait_for(lambda: nina.get("/api/me")[0] == 401, what="the old session ended by the new password")
    assert Client(con.base).login("nina", "nina-pass-1") == 401
    again = Client(con.base)
    assert again.login("nina", "nina-pass-2") == 200

    assert cli("console", "user", "disable", "nina", "--config", cfg).returncode == 0
    wait_for(lambda: again.get("/api/me")[0] == 401, what="the disabled user's session ended")
    assert Client(con.base).login("nina", "nina-pass-2") == 401
    assert cli("console", "user", "enable", "nina", "--config", cfg).returncode == 0
    assert Client(con.base).login("nina", "nina-pass-2") == 200


def test_cli_password_prompts_without_a_terminal_fail_in_one_line(console_factory, tmp_path):
    con = console_factory([])
    cfg = _config(con)
    for args in (
        ["console", "hash-password"],
        ["console", "user", "add", "x1", "--role", "operator", "--config", cfg],
        ["dataset", "export", "--from-console", con.base, "--user", "erik", "--out", str(tmp_path / "o")],
    ):
        r = cli(*args)  # stdin is /dev/null: no terminal, no env
        assert r.returncode != 0
        assert "Traceback" not in r.stderr and "EOFError" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "DEFECTSCOPE_CONSOLE_PASSWORD" in r.stderr, r.stderr
    r = cli("console", "hash-password", env={"DEFECTSCOPE_CONSOLE_PASSWORD": "long-enough-pw"})
    assert r.returncode == 0 and r.stdout.startswith("$argon2id$")
    r = cli("console", "user", "add", "x2", "--role", "operator", "--config", cfg, stdin="short\n")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "8 characters" in r.stderr
    help_text = cli("console", "user", "add", "--help").stdout
    assert "DEFECTSCOPE_CONSOLE_PASSWORD" in help_text


def test_sessions_survive_a_console_restart_and_logout_ends_them(console_factory, tmp_path):
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    con = console_factory([], store=db)
    olga = Client(con.base)
    assert olga.login("olga") == 200
    port = con.base.rsplit(":", 1)[1]
    con.stop()
    from tests.deploy.console.conftest import ConsoleProc

    again = ConsoleProc(next(p for p in con.proc.args if str(p).endswith(".toml")), int(port))
    try:
        olga.base = again.base
        me = olga.json("/api/me")
        assert me["user"] == "olga" and me["csrf"] == olga.csrf  # the same session, after the restart
        status, _, _ = olga.request(
            "POST",
            "/logout",
            f"csrf={olga.csrf}".encode(),
            {"content-type": "application/x-www-form-urlencoded", "origin": olga.base},
        )
        assert status == 303 and olga.get("/api/me")[0] == 401
    finally:
        again.stop()


def test_admin_api_manages_users_and_others_may_not(console_factory):
    con = console_factory([])
    ada, erik = Client(con.base), Client(con.base)
    assert ada.login("ada") == 200 and erik.login("erik") == 200

    def post(c: Client, path: str, body: dict, csrf: str | None = None):
        return c.request(
            "POST",
            path,
            json.dumps(body).encode(),
            {"content-type": "application/json", "origin": c.base, "x-csrf-token": csrf or c.csrf or ""},
        )

    assert post(erik, "/api/users", {"name": "eve", "role": "admin", "password": "eve-pass-1"})[0] == 403
    assert erik.get("/api/users")[0] == 403
    assert post(ada, "/api/users", {"name": "tom", "role": "operator", "password": "tom-pass-1"}, csrf="bad")[0] == 403
    assert post(ada, "/api/users", {"name": "tom", "role": "operator", "password": "short"})[0] == 400
    assert post(ada, "/api/users", {"name": "../x", "role": "operator", "password": "tom-pass-1"})[0] == 400
    assert post(ada, "/api/users", {"name": "tom", "role": "operator", "password": "tom-pass-1"})[0] == 201
    tom = Client(con.base)
    assert tom.login("tom", "tom-pass-1") == 200
    assert post(ada, "/api/users/tom", {"role": "engineer"})[0] == 200
    wait_for(lambda: tom.get("/api/me")[0] == 401, what="a role change ends the sessions")
    assert tom.login("tom", "tom-pass-1") == 200 and tom.json("/api/me")["role"] == "engineer"
    assert post(ada, "/api/users/ada", {"disabled": True})[0] == 400  # not themselves
    # anyone changes their own password, given the current one; their own session stays
    assert post(tom, "/api/me/password", {"current": "wrong-pass", "new": "tom-pass-2"})[0] == 403
    assert post(tom, "/api/me/password", {"current": "tom-pass-1", "new": "tom-pass-2"})[0] == 200
    assert tom.get("/api/me")[0] == 200
    assert Client(con.base).login("tom", "tom-pass-2") == 200
    users = {u["name"]: u for u in ada.json("/api/users")}
    assert set(users) >= set(USERS) | {"tom"} and "password_hash" not in users["tom"]
