"""Issue 25, install path: tar header bombs before the signature (item 11), the owner check raced (item 12).

Real archives written block by block, the real CLI as a subprocess (its peak memory read
from the kernel), a real lock held by this process while the daemon user swaps the file.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import MODELS, REPO, current_version

PEAK_LIMIT_MIB = 200  # the CLI itself takes ~75 MiB; an unbounded header took 3.8 GiB
OUTPUT_LIMIT = 4000  # characters of stdout + stderr for one refusal
DAEMON_UID = 65534


def _header(name: bytes, size: int, typeflag: bytes, fields: dict[int, bytes] | None = None) -> bytes:
    """One raw 512-byte GNU tar header (what an attacker writes by hand, no tarfile limits)."""
    h = bytearray(512)
    for offset, value in (fields or {}).items():
        h[offset : offset + len(value)] = value
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:265] = b"ustar  \0"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pad(n: int) -> bytes:
    return b"\0" * ((512 - n % 512) % 512)


def _bomb(path: Path, kind: str, mib: int = 64) -> Path:
    """A gzip'd tar whose first header is ``mib`` MiB of extended header (compresses ~1000:1)."""
    size = mib << 20
    with gzip.open(path, "wb", compresslevel=9) as gz:
        if kind == "longname":
            gz.write(_header(b"././@LongLink", size, b"L"))
            for _ in range(mib):
                gz.write(b"a" * (1 << 20))
            gz.write(_pad(size))
        elif kind == "pax":
            body = b" path=" + b"a" * size + b"\n"
            n = len(body) + 1
            while len(b"%d" % n) + len(body) != n:
                n = len(b"%d" % n) + len(body)
            gz.write(_header(b"././@PaxHeader", n, b"x") + b"%d" % n + body + _pad(n))
        elif kind == "chain":  # thousands of small long-name headers: tarfile recurses once per header
            for _ in range(20000):
                gz.write(_header(b"././@LongLink", 8, b"L") + b"aaaaaaa\0" + _pad(8))
        elif kind == "sparse":  # an old GNU sparse member whose map goes on block after block
            entry = b"00000000001\0" * 2  # (offset, length) of one data region: 21 per extension block
            gz.write(_header(b"manifest.json", 0, b"S", {386: entry, 482: b"\1"}))
            for _ in range(mib * 2048):
                gz.write(entry * 21 + b"\1" + b"\0" * 7)
        gz.write(_header(b"manifest.json", 0, b"0") + b"\0" * 1024)
    return path


def _deploy_measured(*args: str | Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``defectscope deploy ...`` as a subprocess of a fresh wrapper: (result, the CLI's peak RSS in MiB)."""
    peak_file = tmp_path / "peak-kib"
    wrapper = (
        "import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
        "sys.exit(rc)"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            wrapper,
            str(peak_file),
            sys.executable,
            "-m",
            "defectscope.cli",
            "deploy",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    return proc, int(peak_file.read_text()) / 1024  # ru_maxrss is in KiB on Linux


# ---- item 11: header bombs -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["longname", "pax", "chain", "sparse"])
def test_tar_header_bomb_is_refused_in_bounded_memory_with_a_short_message(tmp_path, kind):
    archive = _bomb(tmp_path / f"{kind}.tar.gz", kind)
    assert archive.stat().st_size < 256 << 10  # small on the wire, tens of MiB once inflated
    root = tmp_path / "root"
    proc, peak_mib = _deploy_measured("install", archive, "--root", root, "--json", tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(proc.stdout) + len(proc.stderr) < OUTPUT_LIMIT, f"{len(proc.stdout)} + {len(proc.stderr)} characters"
    assert "not a readable bundle archive" in proc.stderr
    assert peak_mib < PEAK_LIMIT_MIB, f"deploy install peaked at {peak_mib:.0f} MiB"
    assert not (root / MODELS / "tiny").exists()


def test_a_long_member_name_under_the_header_limit_is_quoted_short(tmp_path):
    # 60 KiB of name passes the header limit and is refused as unsafe: the error quotes 100 characters.
    name = b"../" + b"a" * (60 << 10)
    archive = tmp_path / "long.tar.gz"
    with gzip.open(archive, "wb") as gz:
        gz.write(_header(b"././@LongLink", len(name) + 1, b"L") + name + b"\0" + _pad(len(name) + 1))
        gz.write(_header(b"x", 0, b"0") + b"\0" * 1024)
    proc, _ = _deploy_measured("install", archive, "--root", tmp_path / "root", "--json", tmp_path=tmp_path)
    assert proc.returncode == 1 and "unsafe archive member" in proc.stderr
    assert len(proc.stdout) + len(proc.stderr) < OUTPUT_LIMIT and f"({len(name)} characters)" in proc.stderr


def test_a_normal_archive_still_installs_with_the_bounded_reader(tmp_path, bundles):
    proc, peak_mib = _deploy_measured(
        "install", bundles.archive("1.0.0"), "--root", tmp_path / "root", tmp_path=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert current_version(tmp_path / "root") == "1.0.0" and peak_mib < PEAK_LIMIT_MIB


# ---- item 12: the owner check and the read are one descriptor ------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the ownership check only applies when deploy runs as root")


def _chown_tree(path: Path, uid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid, follow_symlinks=False)


def _wait_for_open(pid: int, target: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Until process ``pid`` holds ``target`` open (it waits on the lock there)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == str(target):
                    return
            except OSError:
                continue
        time.sleep(0.02)
    raise AssertionError(f"deploy never opened {target}")


@needs_root
@pytest.mark.parametrize("swap", ["file", "directory", "symlink", "fifo"])
def test_a_bundle_swapped_while_deploy_waits_for_the_lock_is_never_installed(tmp_path, bundles, swap):
    incoming = tmp_path / "incoming"  # the daemon user's directory: it can rename anything there
    incoming.mkdir()
    os.chown(incoming, DAEMON_UID, DAEMON_UID)
    archive = incoming / "tiny.tar.gz"
    shutil.copy(bundles.archive("1.0.0"), archive)  # root copied it there, root owns it
    evil = incoming / ".evil"
    if swap == "file":
        shutil.copy(bundles.archive("6.6.6"), evil)
        os.chown(evil, DAEMON_UID, DAEMON_UID)
    elif swap == "directory":
        shutil.copytree(bundles.dir("6.6.6"), evil)
        _chown_tree(evil, DAEMON_UID)
    elif swap == "symlink":  # to a root-owned archive root never meant to install
        os.symlink(bundles.archive("6.6.6"), evil)
    else:
        os.mkfifo(evil)
        os.chown(evil, DAEMON_UID, DAEMON_UID)
    root = tmp_path / "root"
    models = root / MODELS
    models.mkdir(parents=True)
    lock = models / ".deploy.lock"
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another deploy command (an Ansible run) holds the store
        proc = subprocess.Popen(
            [sys.executable, "-m", "defectscope.cli", "deploy", "install", str(archive), "--root", str(root), "--json"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for_open(proc.pid, lock, proc)
            if swap == "directory":
                archive.unlink()  # a directory cannot be renamed over a file: two steps, both the daemon user's
            os.rename(evil, archive)  # the daemon user swaps the archive between the check and the read
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
    out, err = proc.communicate(timeout=180)
    assert not (models / "tiny/6.6.6").exists() and current_version(root) != "6.6.6", err
    # What deploy checked (root's 1.0.0) is what it read and installed.
    assert proc.returncode == 0 and current_version(root) == "1.0.0", err


@needs_root
def test_a_fifo_named_like_the_archive_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "tiny.tar.gz"
    os.mkfifo(fifo)
    proc, _ = _deploy_measured("install", fifo, "--root", tmp_path / "root", "--json", tmp_path=tmp_path)
    assert proc.returncode == 1 and "special files are refused" in proc.stderr


def test_peak_memory_helper_measures_the_child_not_this_process(tmp_path):
    # Guards the measurement above: a child that allocates 256 MiB reads as >= 256 MiB.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, subprocess, sys; subprocess.call([sys.executable,"
            " '-c', 'b = bytearray(256 << 20); b[::4096] = b\"x\" * len(b[::4096])']); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert int(proc.stdout) / 1024 >= 256
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_a_fifo_or_an_oversized_file_as_the_signature_is_refused_without_blocking(tmp_path, bundles):
    from tests.deploy.test_attacks import _keys

    root = tmp_path / "root"
    _keys(tmp_path, root)
    archive = Path(shutil.copy(bundles.archive("1.0.0"), tmp_path / "tiny.tar.gz"))
    sig = Path(f"{archive}.sig")
    os.mkfifo(sig)  # nobody ever writes: a blocking read would hold the store lock forever
    proc, _ = _deploy_measured("install", archive, "--root", root, "--json", tmp_path=tmp_path)
    assert proc.returncode == 1 and "signature is not a regular file" in proc.stderr
    sig.unlink()
    sig.write_bytes(b"{" + b" " * (8 << 20))
    proc, _ = _deploy_measured("install", archive, "--root", root, "--json", tmp_path=tmp_path)
    assert proc.returncode == 1 and "larger than 65536 bytes" in proc.stderr
    assert current_version(root) is None
