"""Console test rig: a real `defectscope console` subprocess, an HTTP client with cookies, fake stations."""

from __future__ import annotations

import glob
import http.cookiejar
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("sqlalchemy")
pytest.importorskip("argon2")

from tests.factories import free_port  # noqa: E402
from tests.runtime._helpers import toml_value  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
USERS = {"olga": ("operator", "olga-pass-1"), "erik": ("engineer", "erik-pass-1"), "ada": ("admin", "ada-pass-123")}


def _initdb() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return found[-1] if found else None


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on a free loopback port (initdb refuses root: run it as postgres)."""
    initdb = _initdb()
    if initdb is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL not installed although .ci/run installs it")
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    bindir = os.path.dirname(initdb)
    # Not under pytest's tmp dir: that is 0700 root, and the server runs as postgres when we are root.
    root = Path(tempfile.mkdtemp(prefix="defectscope-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: initdb refuses root")
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chmod(root, 0o777)
    proc = subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "console", "--auth=trust", "-E", "UTF8"],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    sock_dir = root / "sock"
    sock_dir.mkdir()
    os.chmod(sock_dir, 0o777)
    subprocess.run(
        [
            *as_user,
            f"{bindir}/pg_ctl",
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {sock_dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
        cwd=root,
    )
    try:
        subprocess.run(
            [f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "console", "results"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://console@127.0.0.1:{port}/results"
    finally:
        subprocess.run(
            [*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True, cwd=root
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def user_hashes() -> dict[str, str]:
    from deploy.console.auth import hash_password

    return {name: hash_password(pw) for name, (_, pw) in USERS.items()}


def write_console_config(
    path: Path,
    stations: list[dict[str, Any]],
    store: str,
    hashes: dict[str, str],
    port: int,
    extra_toml: str = "",
    **server: Any,
) -> Path:
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}", "coalesce_ms = 100", "down_after_s = 1.5"]
    lines += [f"{k} = {toml_value(v)}" for k, v in server.items()]
    lines += ["", "[store]", f"url = {toml_value(store)}", "flush_ms = 100", ""]
    for st in stations:
        lines.append("[[stations]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in st.items() if k != "curve"]
        if "curve" in st:
            lines.append("[stations.curve]")
            lines += [f"{k} = {toml_value(v)}" for k, v in st["curve"].items()]
        lines.append("")
    for name, (role, _) in USERS.items():
        lines += [
            "[[users]]",
            f'name = "{name}"',
            f'role = "{role}"',
            f"password_hash = {toml_value(hashes[name])}",
            "",
        ]
    path.write_text("\n".join(lines) + "\n" + extra_toml)
    return path


class ConsoleProc:
    def __init__(self, config: Path, port: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        code = "import sys; from defectscope.cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "console", "--config", str(config), "--log-level", "warning"],
            cwd=str(ROOT),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"console exited {self.proc.returncode}: {self.proc.stderr.read().decode()[-3000:]}"
                )
            try:
                urllib.request.urlopen(self.base + "/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("console did not answer /healthz within 30 s") from None
                time.sleep(0.1)

    def health(self) -> dict[str, Any]:
        return json.loads(urllib.request.urlopen(self.base + "/healthz", timeout=5).read())

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode()


class Client:
    """A browser-less HTTP client: cookie jar, no redirects followed, Origin header like a browser's."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), self._NoRedirect)
        self.csrf: str | None = None

    def request(self, method: str, path: str, data: bytes | None = None, headers: dict[str, str] | None = None):
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        try:
            with self.opener.open(req, timeout=10) as resp:
                return resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers

    def get(self, path: str):
        return self.request("GET", path)

    def json(self, path: str) -> Any:
        status, body, _ = self.get(path)
        assert status == 200, (status, body[:300])
        return json.loads(body)

    def login(self, user: str, password: str | None = None) -> int:
        pw = USERS[user][1] if password is None else password
        form = urllib.parse.urlencode({"user": user, "password": pw}).encode()
        status, _, headers = self.request(
            "POST", "/login", form, {"content-type": "application/x-www-form-urlencoded", "origin": self.base}
        )
        if status == 303 and headers.get("location") == "/":
            self.csrf = self.json("/api/me")["csrf"]
            return 200
        return 401

    def review(self, uid: str, action: str, csrf: str | None = "", origin: str | None = None, **body: Any):
        headers = {"content-type": "application/json", "origin": origin or self.base}
        token = self.csrf if csrf == "" else csrf
        if token is not None:
            headers["x-csrf-token"] = token
        return self.request(
            "POST", f"/api/verdicts/{uid}/review", json.dumps({"action": action, **body}).encode(), headers
        )


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def console_factory(tmp_path, user_hashes):
    """Start consoles: factory(stations, store=None, **server) -> (ConsoleProc, config path)."""
    procs: list[ConsoleProc] = []

    def make(stations: list[dict[str, Any]], store: str | None = None, **server: Any) -> ConsoleProc:
        port = free_port()
        cfg = write_console_config(
            tmp_path / f"console-{port}.toml",
            stations,
            store or f"sqlite:///{tmp_path / 'results.db'}",
            user_hashes,
            port,
            **server,
        )
        p = ConsoleProc(cfg, port)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()
