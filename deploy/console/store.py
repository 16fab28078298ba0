"""The results store: every verdict and every review, one SQLAlchemy Core code path for SQLite and PostgreSQL.

Schema (portable types only; times are unix seconds as floats, boxes JSON text):
  verdicts(uid PK, station, camera, seq, source, captured_at, published_at, model_name, model_version,
           task, verdict, top_class, defect_class, confidence, top_score, boxes, snapshot, snapshot_path)
  reviews(id PK, verdict_uid FK, action confirm|reject|relabel, label, boxes, user, role, created_at)
  dead_letters(id PK, station, received_at, error, row)   rows the database refused (row: JSON text)
  users(name PK, role, password_hash, disabled, created_at, updated_at)   deploy/console/users.py
  sessions(token_hash PK, user, role, csrf, created_at, expires)          deploy/console/auth.py
  alarms(id PK, rule, kind, station, camera, message, raised_at, cleared_at, acked_by, acked_at,
         message_key, message_args)  alarms.py
The newest review of a verdict is its current label. A batch the database refuses is retried row by
row: the rows it still refuses go to ``dead_letters`` and the rest are stored (one bad row never
loses its batch); a lost connection keeps the whole batch for the next flush instead. SQLite runs in WAL mode (readers never block the
writer); retention deletes unreviewed verdicts older than ``retention_days`` (reviewed ones are
training data and stay). The schema is built and upgraded by Alembic (deploy/console/migrate.py);
the tables below describe it for queries and must match the newest revision.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from deploy.console.migrate import upgrade

REVIEW_ACTIONS = ("confirm", "reject", "relabel")
meta = sa.MetaData()
verdicts = sa.Table(
    "verdicts",
    meta,
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
    sa.Column("boxes", sa.Text),  # JSON list of {"box": [x1, y1, x2, y2] px, "score", "class"}
    sa.Column("snapshot", sa.String(255)),  # the snapshot's file name in the station's spool
    sa.Column("snapshot_path", sa.Text),  # where this console reads it (export)
    sa.Index("ix_verdicts_time", "captured_at"),
    sa.Index("ix_verdicts_cam_time", "station", "camera", "captured_at"),
)
reviews = sa.Table(
    "reviews",
    meta,
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
dead_letters = sa.Table(
    "dead_letters",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("station", sa.Text),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("row", sa.Text, nullable=False),  # the refused row as JSON text (truncated)
)
users = sa.Table(
    "users",
    meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("password_hash", sa.Text, nullable=False),  # argon2id
    sa.Column("disabled", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
sessions = sa.Table(
    "sessions",
    meta,
    sa.Column("token_hash", sa.String(64), primary_key=True),  # sha256 hex: a database leak is no login
    sa.Column("user", sa.String(64), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires", sa.Float, nullable=False),
)
alarms = sa.Table(
    "alarms",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("station", sa.String(64), nullable=False),
    sa.Column("camera", sa.String(64)),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("raised_at", sa.Float, nullable=False),  # unix seconds
    sa.Column("cleared_at", sa.Float),
    sa.Column("acked_by", sa.String(64)),
    sa.Column("acked_at", sa.Float),
    sa.Column("message_key", sa.String(64)),  # the message for the page to translate (texts.py); 0004
    sa.Column("message_args", sa.Text),  # JSON object of its arguments
)
VERDICT_COLUMNS = [c.name for c in verdicts.columns]
# The database is unreachable or busy: keep the rows and retry (every other error is the row's fault).
UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError)
DEAD_LETTER_TEXT = 8192  # characters of the refused row and of the error kept


class StoreUnavailable(RuntimeError):
    """The database could not be reached; ``remaining`` are the rows not yet stored."""

    def __init__(self, cause: BaseException, remaining: list[dict[str, Any]]) -> None:
        super().__init__(str(cause)[:500])
        self.remaining = remaining


class StoreError(ValueError):
    """A store URL that cannot be opened or a review that is refused; the message says why."""


def normalise_url(url: str) -> str:
    """A path (results.db) means SQLite; postgresql:// uses psycopg 3."""
    if "://" not in url:
        return f"sqlite:///{Path(url).resolve()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes, fast commits
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def row_from_message(msg: Mapping[str, Any], snapshot_path: str | None = None) -> dict[str, Any]:
    """A validated verdict message -> a ``verdicts`` row (boxes only for detectors)."""
    model = msg.get("model") or {}
    snap = msg.get("snapshot")
    dets = msg.get("detections")
    return {
        "uid": uuid.uuid4().hex,
        "station": msg["station"],
        "camera": msg["camera"],
        "seq": int(msg["seq"]),
        "source": msg.get("source"),
        "captured_at": float(msg["captured_at"]),
        "published_at": float(msg["published_at"]),
        "model_name": model.get("name"),
        "model_version": model.get("version"),
        "task": msg["task"],
        "verdict": msg["verdict"],
        "top_class": msg["top_class"],
        "defect_class": msg.get("defect_class"),
        "confidence": float(msg["confidence"]),
        "top_score": float(msg["top_score"]),
        "boxes": json.dumps(dets) if isinstance(dets, list) else None,
        "snapshot": Path(snap).name if isinstance(snap, str) and snap else None,
        "snapshot_path": snapshot_path,
    }


class Store:
    def __init__(self, url: str, retention_days: float = 30.0) -> None:
        self.url = normalise_url(url)
        self.retention_days = retention_days
        try:
            if self.url.startswith("sqlite:///"):
                path = Path(self.url[len("sqlite:///") :])
                if str(path) not in ("", ":memory:"):
                    path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(self.url, future=True, pool_pre_ping=True)
        except (sa.exc.ArgumentError, ModuleNotFoundError, OSError) as exc:
            raise StoreError(f"store url {url!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            upgrade(self.engine)
        except sa.exc.OperationalError as exc:
            raise StoreError(f"store url {url!r}: cannot open: {exc.orig}") from None

    # -- writes --------------------------------------------------------------------------------
    def insert(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store ``rows``; returns the rows the database refused (now in ``dead_letters``).

        Raises StoreUnavailable (with the rows not stored) when the database cannot be reached.
        """
        if not rows:
            return []
        try:
            with self.engine.begin() as conn:
                conn.execute(verdicts.insert(), rows)
            return []
        except UNAVAILABLE as exc:
            raise StoreUnavailable(exc, rows) from None
        except Exception:  # noqa: BLE001 - some row is refused (DataError, IntegrityError, OverflowError...)
            pass
        refused: list[tuple[dict[str, Any], BaseException]] = []
        for i, row in enumerate(rows):
            try:
                with self.engine.begin() as conn:
                    conn.execute(verdicts.insert(), [row])
            except UNAVAILABLE as exc:
                self._dead_letter(refused)
                raise StoreUnavailable(exc, rows[i:]) from None
            except Exception as exc:  # noqa: BLE001
                refused.append((row, exc))
        self._dead_letter(refused)
        return [r for r, _ in refused]

    def _dead_letter(self, refused: list[tuple[dict[str, Any], BaseException]]) -> None:
        if not refused:
            return
        now = time.time()
        letters = [
            {
                "station": str(r.get("station"))[:DEAD_LETTER_TEXT],
                "received_at": now,
                "error": f"{type(e).__name__}: {getattr(e, 'orig', None) or e}"[:DEAD_LETTER_TEXT],
                "row": json.dumps(r, default=str)[:DEAD_LETTER_TEXT],
            }
            for r, e in refused
        ]
        with self.engine.begin() as conn:
            conn.execute(dead_letters.insert(), letters)

    def dead_letter_rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(m) for m in conn.execute(sa.select(dead_letters).order_by(dead_letters.c.id)).mappings()]

    def review(
        self,
        uid: str,
        action: str,
        user: str,
        role: str,
        label: str | None = None,
        boxes: list[dict[str, Any]] | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        if action not in REVIEW_ACTIONS:
            raise StoreError(f"review action {action!r}: expected one of {REVIEW_ACTIONS}")
        if action == "relabel" and not label:
            raise StoreError("review action 'relabel' needs a label")
        with self.engine.begin() as conn:
            found = conn.execute(sa.select(verdicts.c.verdict).where(verdicts.c.uid == uid)).first()
            if found is None:
                raise KeyError(uid)
            if action == "confirm" and found.verdict == "uncertain" and not label:
                raise StoreError("confirming an UNCERTAIN frame needs the class it is (label)")
            row = {
                "verdict_uid": uid,
                "action": action,
                "label": label if action != "reject" else None,
                "boxes": json.dumps(boxes) if boxes is not None else None,
                "user": user,
                "role": role,
                "created_at": time.time() if now is None else now,
            }
            conn.execute(reviews.insert(), row)
        return row

    def prune(self, now: float | None = None) -> int:
        """Delete unreviewed verdicts older than the retention window; returns how many."""
        if self.retention_days <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400.0
        reviewed = sa.select(reviews.c.verdict_uid)
        with self.engine.begin() as conn:
            res = conn.execute(
                verdicts.delete().where(verdicts.c.captured_at < cutoff, verdicts.c.uid.not_in(reviewed))
            )
        return int(res.rowcount or 0)

    # -- reads ---------------------------------------------------------------------------------
    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(verdicts)).scalar_one())

    def _latest_review(self) -> Any:
        newest = (
            sa.select(reviews.c.verdict_uid, sa.func.max(reviews.c.id).label("rid"))
            .group_by(reviews.c.verdict_uid)
            .subquery()
        )
        return (sa.select(reviews).join(newest, reviews.c.id == newest.c.rid)).subquery()

    def _with_review(
        self, where: Iterable[Any], limit: int | None = None, order_desc: bool = True, reviewed_only: bool = False
    ) -> list[dict[str, Any]]:
        r = self._latest_review()
        cols = [
            verdicts,
            r.c.action.label("review_action"),
            r.c.label.label("review_label"),
            r.c.boxes.label("review_boxes"),
            r.c.user.label("review_user"),
            r.c.created_at.label("reviewed_at"),
        ]
        join = verdicts.join(r, r.c.verdict_uid == verdicts.c.uid, isouter=not reviewed_only)
        q = sa.select(*cols).select_from(join).where(*where)
        q = q.order_by(verdicts.c.captured_at.desc() if order_desc else verdicts.c.captured_at.asc())
        if limit:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [dict(m) for m in conn.execute(q).mappings()]

    def get(self, uid: str) -> dict[str, Any] | None:
        rows = self._with_review([verdicts.c.uid == uid])
        if not rows:
            return None
        with self.engine.connect() as conn:
            hist = conn.execute(sa.select(reviews).where(reviews.c.verdict_uid == uid).order_by(reviews.c.id))
            rows[0]["reviews"] = [dict(m) for m in hist.mappings()]
        return rows[0]

    def search(
        self,
        station: str | None = None,
        camera: str | None = None,
        cls: str | None = None,
        verdict: str | None = None,
        reviewed: bool | None = None,
        t0: float | None = None,
        t1: float | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[list[dict[str, Any]], int]:
        """History page: newest first, filtered; returns (one page of rows, the number of matching rows)."""
        r = self._latest_review()
        where: list[Any] = []
        if station:
            where.append(verdicts.c.station == station)
        if camera:
            where.append(verdicts.c.camera == camera)
        if cls:
            where.append(sa.func.coalesce(verdicts.c.defect_class, verdicts.c.top_class) == cls)
        if verdict:
            where.append(verdicts.c.verdict == verdict)
        if t0 is not None:
            where.append(verdicts.c.captured_at >= t0)
        if t1 is not None:
            where.append(verdicts.c.captured_at < t1)
        if reviewed is not None:
            where.append(r.c.id.is_not(None) if reviewed else r.c.id.is_(None))
        join = verdicts.join(r, r.c.verdict_uid == verdicts.c.uid, isouter=True)
        cols = [
            verdicts,
            r.c.action.label("review_action"),
            r.c.label.label("review_label"),
            r.c.user.label("review_user"),
            r.c.created_at.label("reviewed_at"),
        ]
        q = (
            sa.select(*cols)
            .select_from(join)
            .where(*where)
            .order_by(verdicts.c.captured_at.desc(), verdicts.c.uid)
            .offset(offset)
            .limit(limit)
        )
        n = sa.select(sa.func.count()).select_from(join).where(*where)
        with self.engine.connect() as conn:
            return [dict(m) for m in conn.execute(q).mappings()], int(conn.execute(n).scalar_one())

    def recent_events(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._with_review([verdicts.c.verdict.in_(("defect", "uncertain"))], limit)

    def range(self, t0: float, t1: float, limit: int | None = None) -> list[dict[str, Any]]:
        return self._with_review([verdicts.c.captured_at >= t0, verdicts.c.captured_at < t1], limit, order_desc=False)

    def reviewed(self, t0: float = 0.0, t1: float = float("inf")) -> list[dict[str, Any]]:
        where = [verdicts.c.captured_at >= t0]
        if t1 != float("inf"):
            where.append(verdicts.c.captured_at < t1)
        return self._with_review(where, order_desc=False, reviewed_only=True)

    def rates(self, since: float, until: float | None = None) -> list[dict[str, Any]]:
        """Per station/camera in [since, until): verdict counts and the defect rate."""
        defect = sa.func.sum(sa.case((verdicts.c.verdict == "defect", 1), else_=0))
        unc = sa.func.sum(sa.case((verdicts.c.verdict == "uncertain", 1), else_=0))
        q = (
            sa.select(
                verdicts.c.station,
                verdicts.c.camera,
                sa.func.count().label("total"),
                defect.label("defect"),
                unc.label("uncertain"),
            )
            .where(verdicts.c.captured_at >= since, *(() if until is None else (verdicts.c.captured_at < until,)))
            .group_by(verdicts.c.station, verdicts.c.camera)
            .order_by(verdicts.c.station, verdicts.c.camera)
        )
        with self.engine.connect() as conn:
            out = []
            for m in conn.execute(q).mappings():
                d = {k: (int(v) if k in ("total", "defect", "uncertain") else v) for k, v in m.items()}
                d["defect_rate"] = d["defect"] / d["total"] if d["total"] else 0.0
                out.append(d)
        return out

    def close(self) -> None:
        self.engine.dispose()
