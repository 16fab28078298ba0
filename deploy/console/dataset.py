"""`defectscope dataset export --from-console SRC --out DIR`: reviewed snapshots -> a training dataset.

SRC is a results store (a SQLite file, or a SQLAlchemy URL such as postgresql://...) read on the
console machine, or the console's URL (http://host:8470; an engineer's login, password from
$DEFECTSCOPE_CONSOLE_PASSWORD, stdin or a prompt). Labels come from each verdict's newest review:
confirm keeps the judged class, reject (false alarm) means the good class (a detector: no boxes),
relabel sets the chosen class (a detector: the reviewed boxes).

Classifiers -> ImageFolder (DIR/<class>/<file>.jpg), which `defectscope train --data DIR` and
`defectscope extend --data DIR` read directly. Detectors -> COCO JSON (DIR/images/*.jpg +
DIR/annotations.json). Both write DIR/provenance.json: stations, cameras, time range, model
versions that judged the frames, reviewers, and one record per image. DIR is written in a
staging directory beside it and renamed into place, so it is never half-written.

Every name that comes from the source (station, camera, uid, label: a console URL is a network
peer, anyone on a plain-HTTP path can answer for it) becomes a safe file name (``safe_name``), and
a file that would still resolve outside the staging directory is refused, never written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

from deploy.console.password import HELP as PASSWORD_HELP
from deploy.console.password import read_password
from deploy.console.snapfiles import SnapshotRefused, read_path

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _+-]{0,127}$")  # a class name that is safe as a folder name
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_ROWS_BYTES = 1024 * 1024 * 1024  # the /api/dataset answer read from a console URL
UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class ExportError(RuntimeError):
    pass


def safe_name(value: Any, limit: int = 64) -> str:
    """A file-name part from a network string: letters, digits, '_', '-' only (others -> '_'), never empty."""
    return UNSAFE.sub("_", str(value))[:limit].strip("_") or "_"


def confined(root: Path, rel: str) -> Path:
    """``root / rel``, refused (ExportError) when it would resolve outside ``root``."""
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ExportError(f"refused to write {rel[:80]!r}: outside the output directory")
    return target


def label_of(row: dict[str, Any], good_class: str) -> str | None:
    action = row.get("review_action")
    if action == "confirm":  # an UNCERTAIN frame is confirmed as the class the reviewer chose
        return row.get("review_label") or row.get("defect_class") or row["top_class"]
    if action == "reject":
        return good_class
    if action == "relabel":
        return row.get("review_label")
    return None


def boxes_of(row: dict[str, Any], label: str) -> list[dict[str, Any]]:
    def parse(v: Any) -> list[dict[str, Any]]:
        return json.loads(v) if isinstance(v, str) else list(v or [])

    if row["review_action"] == "reject":
        return []
    if row.get("review_boxes") is not None:
        return parse(row["review_boxes"])
    boxes = parse(row.get("boxes"))
    if row["review_action"] == "relabel":
        boxes = [dict(b, **{"class": label}) for b in boxes]
    return boxes


# -- sources ----------------------------------------------------------------------------------
def store_source(spec: str, t0: float, t1: float) -> tuple[list[dict[str, Any]], Callable[[dict], bytes], str | None]:
    from deploy.console.store import Store

    store = Store(spec, retention_days=0)
    rows = store.reviewed(t0, t1)
    store.close()

    def image(row: dict[str, Any]) -> bytes:
        if not row.get("snapshot_path"):
            raise SnapshotRefused(404, "no snapshot recorded")
        return read_path(row["snapshot_path"], MAX_IMAGE_BYTES)

    return rows, image, None


def http_source(url: str, user: str, password: str, t0: float, t1: float):
    base = url.rstrip("/")
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    form = urllib.parse.urlencode({"user": user, "password": password}).encode()
    with opener.open(urllib.request.Request(f"{base}/login", data=form), timeout=30) as resp:
        if "failed=1" in resp.geturl():
            raise ExportError(f"{base}: login as {user!r} failed")
    q = urllib.parse.urlencode({"from": t0, **({"to": t1} if t1 != float("inf") else {})})
    try:
        with opener.open(f"{base}/api/dataset?{q}", timeout=120) as resp:
            raw = resp.read(MAX_ROWS_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise ExportError(f"{base}/api/dataset: HTTP {exc.code} (an engineer login is needed)") from None
    if len(raw) > MAX_ROWS_BYTES:
        raise ExportError(f"{base}/api/dataset: answer over {MAX_ROWS_BYTES} bytes")
    body = json.loads(raw)
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("rows"), list)
        or not all(isinstance(r, dict) for r in body["rows"])
    ):
        raise ExportError(f"{base}/api/dataset: not a {{rows: [...]}} object")

    def image(row: dict[str, Any]) -> bytes:
        if not row.get("snapshot"):
            raise SnapshotRefused(404, "no snapshot recorded")
        station, name = (urllib.parse.quote(str(row[k]), safe="") for k in ("station", "snapshot"))
        try:
            with opener.open(f"{base}/snapshots/{station}/{name}", timeout=30) as resp:
                return resp.read(MAX_IMAGE_BYTES + 1)[:MAX_IMAGE_BYTES]
        except urllib.error.HTTPError as exc:
            raise SnapshotRefused(exc.code, f"HTTP {exc.code}") from None

    return body["rows"], image, body.get("good_class")


# -- writers ----------------------------------------------------------------------------------
def _provenance(src: str, items: list[dict[str, Any]], skipped: dict[str, int], fmt: str) -> dict[str, Any]:
    times = [i["captured_at"] for i in items]
    return {
        "schema_version": 1,
        "format": fmt,
        "source": src,
        "exported_at": time.time(),
        "stations": sorted({i["station"] for i in items}),
        "cameras": sorted({f"{i['station']}/{i['camera']}" for i in items}),
        "time_range": [min(times), max(times)] if times else None,
        "model_versions": sorted({f"{i['model_name']}@{i['model_version']}" for i in items}),
        "reviewers": sorted({i["review_user"] for i in items}),
        "classes": dict(
            sorted({c: sum(1 for i in items if i["label"] == c) for c in {i["label"] for i in items}}.items())
        ),
        "skipped": skipped,
        "items": items,
    }


def _item(row: dict[str, Any], file: str, label: str) -> dict[str, Any]:
    keys = (
        "uid",
        "station",
        "camera",
        "seq",
        "source",
        "captured_at",
        "model_name",
        "model_version",
        "verdict",
        "top_class",
        "defect_class",
        "confidence",
        "review_action",
        "review_user",
        "reviewed_at",
    )
    return {"file": file, "label": label, **{k: row.get(k) for k in keys}}


def export(
    rows: list[dict[str, Any]],
    image: Callable[[dict], bytes],
    out: Path,
    good_class: str,
    src: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    tasks = {r["task"] for r in rows}
    if len(tasks) > 1:
        raise ExportError(f"reviewed verdicts mix tasks {sorted(tasks)}: pass --task")
    task = tasks.pop() if tasks else "classification"
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        skipped: dict[str, int] = {}
        items: list[dict[str, Any]] = []
        coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
        cats: dict[str, int] = {}
        for row in rows:
            label = label_of(row, good_class)
            if label is None or not LABEL.match(label):
                skipped["bad_label"] = skipped.get("bad_label", 0) + 1
                continue
            try:
                data = image(row)
            except SnapshotRefused as exc:
                skipped[f"snapshot_{exc.status}"] = skipped.get(f"snapshot_{exc.status}", 0) + 1
                continue
            name = "_".join(safe_name(row.get(k)) for k in ("station", "camera", "uid")) + ".jpg"
            rel = f"{label if task == 'classification' else 'images'}/{name}"  # label: LABEL-checked above
            target = confined(stage, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(target, "xb") as fh:  # never through a planted file or link, never twice
                    fh.write(data)
            except FileExistsError:
                skipped["duplicate"] = skipped.get("duplicate", 0) + 1
                continue
            if task != "classification":
                _coco_add(coco, cats, data, rel, boxes_of(row, label))
            items.append(_item(row, rel, label))
        prov = _provenance(src, items, skipped, "imagefolder" if task == "classification" else "coco")
        if task != "classification":
            coco["info"] = {k: v for k, v in prov.items() if k != "items"}
            (stage / "annotations.json").write_text(json.dumps(coco, indent=1) + "\n")
        (stage / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log(
        f"exported {len(items)} images ({prov['format']}) to {out}; classes {prov['classes']}"
        + (f"; skipped {skipped}" if skipped else "")
    )
    return prov


def _coco_add(coco: dict[str, Any], cats: dict[str, int], data: bytes, rel: str, boxes: list[dict]) -> None:
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    h, w = img.shape[:2] if img is not None else (0, 0)
    image_id = len(coco["images"]) + 1
    coco["images"].append({"id": image_id, "file_name": rel, "width": int(w), "height": int(h)})
    for b in boxes:
        cls = str(b.get("class"))
        if cls not in cats:
            cats[cls] = len(cats) + 1
            coco["categories"].append({"id": cats[cls], "name": cls})
        x1, y1, x2, y2 = (float(v) for v in b["box"])
        coco["annotations"].append(
            {
                "id": len(coco["annotations"]) + 1,
                "image_id": image_id,
                "category_id": cats[cls],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
            }
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="defectscope dataset", description="datasets from reviewed console snapshots")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write reviewed snapshots as ImageFolder (classifier) / COCO (detector)")
    e.add_argument(
        "--from-console",
        dest="source",
        required=True,
        metavar="STORE|URL",
        help="results store (SQLite file or SQLAlchemy URL) or the console URL (http://host:8470)",
    )
    e.add_argument("--out", required=True, help="output dataset directory (new or empty)")
    e.add_argument("--since", default=None, help="from this time (ISO 8601 or unix seconds)")
    e.add_argument("--until", default=None, help="up to this time (ISO 8601 or unix seconds)")
    e.add_argument("--good-class", default=None, help="label of rejected defects (default: the console's, 'ok')")
    e.add_argument(
        "--user", default=os.environ.get("USER", ""), help=f"engineer login for a console URL. {PASSWORD_HELP}"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from starlette.exceptions import HTTPException

    from deploy.console.app import parse_time
    from deploy.console.config import ServerConfig

    args = build_parser().parse_args(argv)
    try:
        t0, t1 = parse_time(args.since, 0.0), parse_time(args.until, float("inf"))
    except HTTPException as exc:
        print(f"defectscope dataset: --since/--until: {exc.detail}", file=sys.stderr)
        return 2
    try:
        if args.source.startswith(("http://", "https://")):
            password = read_password(f"password for {args.user}: ")
            rows, image, good = http_source(args.source, args.user, password, t0, t1)
        else:
            rows, image, good = store_source(args.source, t0, t1)
        export(rows, image, Path(args.out), args.good_class or good or ServerConfig.good_class, args.source)
    except (ExportError, OSError, ValueError) as exc:
        print(f"defectscope dataset export: {exc}", file=sys.stderr)
        return 1
    except (KeyError, TypeError) as exc:  # a source row without the fields of docs/contracts.md
        print(
            f"defectscope dataset export: malformed row from the source: {type(exc).__name__}: {exc}"[:300],
            file=sys.stderr,
        )
        return 1
    return 0
