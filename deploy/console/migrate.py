"""Schema migrations (Alembic) for the results store, applied when the console or its CLI opens it.

The scripts live in deploy/console/migrations/versions/ (0001 = the schema before migrations).
A database made before Alembic (tables present, no ``alembic_version``) is stamped at the
baseline, then upgraded like any other; an empty database is built by running every revision.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

SCRIPTS = Path(__file__).with_name("migrations")
BASELINE = "0001"


def _config(conn: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    script = ScriptDirectory.from_config(_config(None))  # type: ignore[arg-type]
    return str(script.get_current_head())


def current(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: sa.Engine) -> None:
    """Bring ``engine``'s database to the newest schema (idempotent)."""
    with engine.begin() as conn:
        cfg = _config(conn)
        if MigrationContext.configure(conn).get_current_revision() is None and sa.inspect(conn).has_table("verdicts"):
            command.stamp(cfg, BASELINE)  # made by the pre-migration console: its schema is the baseline
        command.upgrade(cfg, "head")
