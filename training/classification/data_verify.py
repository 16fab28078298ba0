"""Image verification for the dataset listing: every file read and digested (blake2b), decoded
once per content (decoded-OK digests are remembered in the cache directory), bad ones named.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

from training.data import cache_dir


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def _check(path: str, known_good: set[str], verify: bool) -> tuple[str | None, str | None]:
    """(digest, None) for a good image, (None, reason) for a bad one."""
    from runtime.inference.preprocess import ImageReadError, read_image

    try:
        digest = _digest(path)
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    if verify and digest not in known_good:
        try:
            img = read_image(path)
        except ImageReadError as exc:
            return None, str(exc).split(": ", 1)[-1]
        if min(img.shape[:2]) < 1:
            return None, "empty image"
    return digest, None


def verify_images(paths: list[str], verify: bool, threads: int) -> tuple[dict[str, str], dict[str, str]]:
    """``({path: digest}, {path: reason})``; decoded-OK digests are remembered in the cache dir."""
    good_file = cache_dir() / "verified-images.txt"
    try:
        known = set(good_file.read_text().split()) if verify and good_file.is_file() else set()
    except OSError:
        known = set()
    digests, bad = {}, {}
    # OpenCV decoding releases the GIL: threads give real parallelism here.
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for p, (d, reason) in zip(paths, pool.map(lambda q: _check(q, known, verify), paths)):
            if d is None:
                bad[p] = reason or "unreadable"
            else:
                digests[p] = d
    new = set(digests.values()) - known
    if verify and new:
        try:
            good_file.parent.mkdir(parents=True, exist_ok=True)
            with open(good_file, "a") as f:
                f.write("\n".join(sorted(new)) + "\n")
        except OSError:
            pass  # a read-only cache only costs re-decoding next time
    return digests, bad
