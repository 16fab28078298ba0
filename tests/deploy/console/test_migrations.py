"""Alembic migrations: a database made by the pre-migration console (with rows) upgrades in place, on SQLite
and on a real PostgreSQL server; a new database is built by the migrations alone; reopening is a no-op."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from deploy.console import migrate
from deploy.console.loadgen import verdict_message
from deploy.console.store import Store, normalise_url, row_from_message

# The schema exactly as the console created it before Alembic (meta.create_all at b434d51), frozen here.
OLD = sa.MetaData()
sa.Table(
    "verdicts",
    OLD,
    sa.Column("uid", sa.String(32), primary_key=True),
    sa.Column("station", sa.String(64), nullable=False),
    sa.Column("camera", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("source", sa.Text),
    sa.Column("captured_at", sa.Float, nullable=False),
    sa.Column("published_at", sa.Float, nullable=False),
    sa.Column("model_name", sa.String(128)),
    sa.Column("model_version", sa.String(64)),
    sa.Column("task", sa.String(32), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("top_class", sa.String(128), nullable=False),
    sa.Column("defect_class", sa.String(128)),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("top_score", sa.Float, nullable=False),
    sa.Column("boxes", sa.Text),
    sa.Column("snapshot", sa.String(255)),
    sa.Column("snapshot_path", sa.Text),
    sa.Index("ix_verdicts_time", "captured_at"),
    sa.Index("ix_verdicts_cam_time", "station", "camera", "captured_at"),
)
sa.Table(
    "reviews",
    OLD,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("verdict_uid", sa.String(32), sa.ForeignKey("verdicts.uid", ondelete="CASCADE"), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("label", sa.String(128)),
    sa.Column("boxes", sa.Text),
    sa.Column("user", sa.String(64), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_reviews_verdict", "verdict_uid", "id"),
)
sa.Table(
    "dead_letters",
    OLD,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("station", sa.Text),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("row", sa.Text, nullable=False),
)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path):
    """A URL to an empty database of its own (PostgreSQL: a new database on the shared test server)."""
    if request.param == "sqlite":
        yield str(tmp_path / "results.db")
        return
    base = request.getfixturevalue("postgres")
    name = "mig_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(normalise_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    yield base.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def _old_rows(n: int) -> list[dict]:
    return [
        row_from_message(verdict_message("st1", "cam1", i, "defect" if i % 2 else "ok", captured_at=1000.0 + i), None)
        for i in range(n)
    ]


def test_a_pre_migration_database_with_rows_upgrades_in_place(fresh_url):
    engine = sa.create_engine(normalise_url(fresh_url))
    OLD.create_all(engine)
    rows = _old_rows(5)
    with engine.begin() as conn:
        conn.execute(OLD.tables["verdicts"].insert(), rows)
        conn.execute(
            OLD.tables["reviews"].insert(),
            [
                {
                    "verdict_uid": rows[1]["uid"],
                    "action": "confirm",
                    "label": None,
                    "boxes": None,
                    "user": "olga",
                    "role": "operator",
                    "created_at": 1010.0,
                }
            ],
        )
    assert migrate.current(engine) is None
    engine.dispose()

    store = Store(fresh_url, retention_days=0)
    try:
        assert migrate.current(store.engine) == migrate.head()
        assert store.count() == 5
        got = store.get(rows[1]["uid"])
        assert got is not None and got["review_action"] == "confirm" and got["review_user"] == "olga"
        store.insert(_old_rows(2))  # the upgraded schema takes new rows
        assert store.count() == 7
    finally:
        store.close()
    again = Store(fresh_url, retention_days=0)  # reopening an up-to-date database changes nothing
    try:
        assert again.count() == 7 and migrate.current(again.engine) == migrate.head()
    finally:
        again.close()


def test_an_empty_database_is_built_by_the_migrations_and_matches_the_store_tables(fresh_url):
    store = Store(fresh_url, retention_days=0)
    try:
        assert migrate.current(store.engine) == migrate.head()
        insp = sa.inspect(store.engine)
        from deploy.console.store import meta

        for table in meta.sorted_tables:  # the query-side Table objects describe the migrated schema
            cols = {c["name"] for c in insp.get_columns(table.name)}
            assert cols == {c.name for c in table.columns}, table.name
    finally:
        store.close()
