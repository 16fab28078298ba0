"""`defectscope dataset export --from-console`: ImageFolder / COCO with provenance, from a store or a URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from deploy.console.loadgen import verdict_message
from deploy.console.store import Store, row_from_message
from tests.deploy.console.conftest import ROOT, USERS


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from defectscope.cli import main; sys.exit(main(sys.argv[1:]))"
    full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full, cwd=ROOT)


def _seed(tmp: Path, task: str = "classification") -> tuple[Store, Path, list[dict]]:
    spool = tmp / "spool"
    spool.mkdir(exist_ok=True)
    store = Store(str(tmp / "results.db"))
    rows, t = [], time.time()
    for i in range(6):
        name = f"2024_st1_cam1_{i:09d}_defect.jpg"
        cv2.imwrite(str(spool / name), np.full((30, 40, 3), 200, np.uint8))
        kw = {"detections": [{"box": [2, 3, 12, 13], "score": 0.8, "class": "crack"}]} if task == "detection" else {}
        msg = verdict_message(
            "st1",
            "cam1",
            i,
            "defect",
            snapshot=f"/var/spool/defectscope/{name}",
            task=task,
            captured_at=t - 100 + i,
            **kw,
        )
        rows.append(row_from_message(msg, str(spool / name)))
    store.insert(rows)
    return store, spool, rows


def test_imagefolder_export_from_the_store(tmp_path):
    store, spool, rows = _seed(tmp_path)
    store.review(rows[0]["uid"], "reject", "olga", "operator")
    store.review(rows[1]["uid"], "confirm", "olga", "operator")
    store.review(rows[2]["uid"], "confirm", "olga", "operator")
    store.review(rows[2]["uid"], "relabel", "erik", "engineer", label="crack")  # newest review wins
    store.review(rows[3]["uid"], "confirm", "olga", "operator")
    os.remove(rows[3]["snapshot_path"])  # quota-evicted snapshot: skipped, counted
    store.review(rows[4]["uid"], "relabel", "olga", "operator", label="../escape")  # stored by a bad client
    os.symlink("/etc/passwd", spool / "evil.jpg")
    with store.engine.begin() as conn:  # a tampered store row pointing at a symlink is refused too
        from deploy.console.store import verdicts

        conn.execute(
            verdicts.update().where(verdicts.c.uid == rows[1]["uid"]).values(snapshot_path=str(spool / "evil.jpg"))
        )
    store.close()
    out = tmp_path / "ds"
    r = _cli("dataset", "export", "--from-console", str(tmp_path / "results.db"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(out).parts[0] for p in out.glob("*/*.jpg")) == ["crack", "ok"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["format"] == "imagefolder" and prov["stations"] == ["st1"] and prov["cameras"] == ["st1/cam1"]
    assert prov["model_versions"] == ["elpv-lite0@1.2.0"] and prov["classes"] == {"crack": 1, "ok": 1}
    assert prov["skipped"] == {"snapshot_404": 1, "bad_label": 1, "snapshot_403": 1}
    assert set(prov["reviewers"]) == {"olga", "erik"} and prov["time_range"][0] < prov["time_range"][1]
    assert {i["review_action"] for i in prov["items"]} == {"reject", "relabel"}
    assert not (tmp_path / "escape").exists()
    # an existing non-empty output is never overwritten
    r = _cli("dataset", "export", "--from-console", str(tmp_path / "results.db"), "--out", str(out))
    assert r.returncode == 1 and "not empty" in r.stderr


def test_coco_export_for_detectors(tmp_path):
    store, _, rows = _seed(tmp_path, task="detection")
    store.review(rows[0]["uid"], "confirm", "olga", "operator")
    store.review(rows[1]["uid"], "reject", "olga", "operator")
    store.review(
        rows[2]["uid"],
        "relabel",
        "olga",
        "operator",
        label="scratch",
        boxes=[{"box": [5, 5, 25, 20], "class": "scratch"}],
    )
    store.close()
    out = tmp_path / "coco"
    r = _cli("dataset", "export", "--from-console", f"sqlite:///{tmp_path / 'results.db'}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    coco = json.loads((out / "annotations.json").read_text())
    assert len(coco["images"]) == 3 and coco["images"][0]["width"] == 40 and coco["images"][0]["height"] == 30
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    anns = [(cats[a["category_id"]], a["bbox"]) for a in coco["annotations"]]
    assert anns == [("crack", [2.0, 3.0, 10.0, 10.0]), ("scratch", [5.0, 5.0, 20.0, 15.0])]  # the reject has none
    assert all((out / im["file_name"]).is_file() for im in coco["images"])
    assert coco["info"]["format"] == "coco" and json.loads((out / "provenance.json").read_text())["items"]


def test_export_through_the_console_url_needs_an_engineer(tmp_path, console_factory):
    store, spool, rows = _seed(tmp_path)
    store.review(rows[0]["uid"], "reject", "olga", "operator")
    store.review(rows[1]["uid"], "confirm", "olga", "operator")
    store.close()
    con = console_factory(
        [{"name": "st1", "endpoint": "tcp://127.0.0.1:1", "snapshot_dir": str(spool)}],
        store=f"sqlite:///{tmp_path / 'results.db'}",
    )
    r = _cli(
        "dataset",
        "export",
        "--from-console",
        con.base,
        "--user",
        "olga",
        "--out",
        str(tmp_path / "x"),
        env={"DEFECTSCOPE_CONSOLE_PASSWORD": USERS["olga"][1]},
    )
    assert r.returncode == 1 and "engineer" in r.stderr
    r = _cli(
        "dataset",
        "export",
        "--from-console",
        con.base,
        "--user",
        "erik",
        "--out",
        str(tmp_path / "x"),
        env={"DEFECTSCOPE_CONSOLE_PASSWORD": "wrong"},
    )
    assert r.returncode == 1 and "login" in r.stderr
    r = _cli(
        "dataset",
        "export",
        "--from-console",
        con.base,
        "--user",
        "erik",
        "--out",
        str(tmp_path / "ds"),
        env={"DEFECTSCOPE_CONSOLE_PASSWORD": USERS["erik"][1]},
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.parent.name for p in (tmp_path / "ds").glob("*/*.jpg")) == ["defect", "ok"]
