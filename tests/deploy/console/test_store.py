"""The results store on SQLite (WAL, retention) and on a real PostgreSQL server: one code path, same tests."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from deploy.console.loadgen import verdict_message
from deploy.console.store import Store, StoreError, row_from_message


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(str(tmp_path / "results.db"), retention_days=1.0)
    else:
        s = Store(request.getfixturevalue("postgres"), retention_days=1.0)
        with s.engine.begin() as conn:  # the module-scoped server is shared: start each test empty
            conn.execute(sa.text("TRUNCATE reviews, verdicts, dead_letters"))
    yield s
    s.close()


def _rows(n: int, t0: float, camera: str = "cam1", verdict: str = "ok", task: str = "classification"):
    kw = {"detections": [{"box": [1, 2, 10, 20], "score": 0.9, "class": "crack"}]} if task == "detection" else {}
    return [
        row_from_message(
            verdict_message("st1", camera, i, verdict, captured_at=t0 + i, task=task, snapshot=f"/spool/{i}.jpg", **kw),
            f"/c/{i}.jpg",
        )
        for i in range(n)
    ]


def test_insert_review_and_latest_review_wins(store):
    t = time.time()
    rows = _rows(3, t - 10, verdict="defect")
    store.insert(rows)
    assert store.count() == 3
    uid = rows[1]["uid"]
    store.review(uid, "confirm", "olga", "operator", now=t)
    store.review(uid, "relabel", "erik", "engineer", label="crack", now=t + 1)
    got = store.get(uid)
    assert (got["review_action"], got["review_label"], got["review_user"]) == ("relabel", "crack", "erik")
    assert [r["action"] for r in got["reviews"]] == ["confirm", "relabel"] and got["snapshot"] == "1.jpg"
    assert [r["uid"] for r in store.reviewed()] == [uid]
    events = store.recent_events()
    assert [e["seq"] for e in events] == [2, 1, 0] and events[1]["review_action"] == "relabel"
    with pytest.raises(StoreError):
        store.review(uid, "relabel", "olga", "operator")
    with pytest.raises(StoreError):
        store.review(uid, "delete", "olga", "operator")
    with pytest.raises(KeyError):
        store.review("f" * 32, "confirm", "olga", "operator")


def test_detector_boxes_round_trip_and_range(store):
    t = time.time()
    rows = _rows(4, t - 100, task="detection", verdict="defect")
    store.insert(rows)
    got = store.range(t - 98.5, t - 96.5)
    assert [r["seq"] for r in got] == [2, 3] and '"crack"' in got[0]["boxes"]


def test_rates_per_camera(store):
    t = time.time()
    store.insert(
        _rows(6, t - 60, "cam1", "ok")
        + _rows(2, t - 60, "cam1", "defect")
        + _rows(3, t - 60, "cam2", "uncertain")
        + _rows(5, t - 90000, "cam3", "defect")
    )
    rates = {r["camera"]: r for r in store.rates(t - 8 * 3600)}
    assert set(rates) == {"cam1", "cam2"}
    assert rates["cam1"]["total"] == 8 and rates["cam1"]["defect"] == 2 and rates["cam1"]["defect_rate"] == 0.25
    assert rates["cam2"]["uncertain"] == 3 and rates["cam2"]["defect_rate"] == 0.0


def test_retention_keeps_reviewed_verdicts(store):
    t = time.time()
    old = _rows(5, t - 3 * 86400, verdict="defect")
    store.insert(old + _rows(2, t - 60))
    store.review(old[0]["uid"], "reject", "olga", "operator")
    assert store.prune(now=t) == 4
    assert store.count() == 3 and store.get(old[0]["uid"]) is not None


def test_sqlite_runs_in_wal_mode(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'r.db'}")
    with s.engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
    s.close()


def test_bad_store_urls_are_clear(tmp_path):
    with pytest.raises(StoreError, match="nosuchdb"):
        Store("nosuchdb://x")
    with pytest.raises(StoreError, match="cannot open"):
        Store("postgresql://nobody@127.0.0.1:1/none")


def test_a_row_the_database_refuses_is_dead_lettered_and_its_batch_is_kept(store):
    """Rows past the schema (a console before the limits, a tampered writer) must not take their batch down."""
    t = time.time()
    rows = _rows(6, t - 10)
    rows[2]["seq"] = 10**20  # SQLite: OverflowError; PostgreSQL: bigint out of range
    rows[4]["top_class"] = "c" * 200  # PostgreSQL: value too long for varchar(128); SQLite stores it
    refused = store.insert(rows)
    refused_seqs = {10**20} | ({4} if store.engine.dialect.name == "postgresql" else set())
    assert {r["seq"] for r in refused} == refused_seqs
    kept = {r["seq"] for r in store.range(0, t + 10)}
    assert kept == {0, 1, 3, 4, 5} - refused_seqs
    letters = store.dead_letter_rows()
    assert len(letters) == len(refused_seqs) and all(d["station"] == "st1" and d["error"] for d in letters)
    assert str(10**20) in letters[0]["row"]
