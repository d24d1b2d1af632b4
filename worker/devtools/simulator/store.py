"""The simulator's portal state, in SQLite, with the portal's propagation delay.

The real portal applies an admin change (an email, a source refresh, a resent Welcome
email) some time after accepting it: 15 minutes or more, 10-20 minutes for a source
refresh. oprecon's hold-and-verify logic exists because of that lag, so the simulator
reproduces it: every accepted write becomes a `pending` row with `visible_us`, and reads
first apply the rows whose time has come, in order. Nothing a read returns ever reflects a
write that is not yet due.

Rows are kept as the text of the CSV contract (bad values included), so a bad row in an
export reaches the HTTP client unchanged and becomes an `InvalidRecord` there, as it would
from the CSV adapter. One connection serves every thread, guarded by a lock: the
simulator's load is small and this keeps each write plus its idempotency record atomic.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import random
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from worker.devtools.simulator.clock import SimClock
from worker.model.records import WELCOME_ACTION, CaregiverLink, InvalidRecord, PortalUser
from worker.sources.layout import PORTAL_LAYOUT, csv_name
from worker.sources.parsing import format_value, parse_portal_user, parse_time, table_of

DEFAULT_DELAY = timedelta(minutes=15)
DEFAULT_REFRESH_DELAY = (timedelta(minutes=10), timedelta(minutes=20))
CONNECTED = "Connected"
DISCONNECTED = "Disconnected"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

# Write operations, the endpoint each is counted under, and whether it uses the 10-20
# minute source-refresh delay instead of the general one.
OPERATIONS: dict[str, tuple[str, bool]] = {
    "set_email": ("PATCH /users/{user_id}", False),
    "welcome": ("POST /welcome", False),
    "source_refresh": ("POST /users/{user_id}/source/refresh", True),
    "source_connect": ("POST /users/{user_id}/source/connect", True),
    "source_disconnect": ("POST /users/{user_id}/source/disconnect", True),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT, op_patient_id TEXT, op_contact_id TEXT, first_name TEXT, last_name TEXT,
    email TEXT, role TEXT, active TEXT, updated_at TEXT, updated_us INTEGER
);
CREATE INDEX IF NOT EXISTS users_by_id ON users (user_id);
CREATE INDEX IF NOT EXISTS users_by_contact ON users (op_contact_id);
CREATE TABLE IF NOT EXISTS links (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    caregiver_user_id TEXT, dependent_user_id TEXT, created_at TEXT
);
CREATE INDEX IF NOT EXISTS links_by_caregiver ON links (caregiver_user_id);
CREATE INDEX IF NOT EXISTS links_by_dependent ON links (dependent_user_id);
CREATE TABLE IF NOT EXISTS sources (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT, status TEXT, last_sync_at TEXT
);
CREATE INDEX IF NOT EXISTS sources_by_user ON sources (user_id);
-- Targeted reads compare ids as the parsers read them (trimmed): one index per column.
CREATE INDEX IF NOT EXISTS users_by_trimmed_id ON users (trim(user_id));
CREATE INDEX IF NOT EXISTS users_by_trimmed_patient ON users (trim(op_patient_id));
CREATE INDEX IF NOT EXISTS users_by_trimmed_contact ON users (trim(op_contact_id));
CREATE INDEX IF NOT EXISTS users_by_updated ON users (updated_us);
CREATE INDEX IF NOT EXISTS links_by_trimmed_caregiver ON links (trim(caregiver_user_id));
CREATE INDEX IF NOT EXISTS links_by_trimmed_dependent ON links (trim(dependent_user_id));
CREATE INDEX IF NOT EXISTS sources_by_trimmed_user ON sources (trim(user_id));
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT, action TEXT, user_id TEXT, email TEXT, at_us INTEGER
);
CREATE TABLE IF NOT EXISTS expected_links (
    caregiver_user_id TEXT NOT NULL, dependent_user_id TEXT NOT NULL,
    PRIMARY KEY (caregiver_user_id, dependent_user_id)
);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL, user_id TEXT, payload TEXT NOT NULL,
    accepted_us INTEGER NOT NULL, visible_us INTEGER NOT NULL, applied INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS pending_due ON pending (applied, visible_us);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, status INTEGER NOT NULL, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS writes (
    endpoint TEXT NOT NULL, key TEXT NOT NULL, applied INTEGER NOT NULL,
    PRIMARY KEY (endpoint, key)
);
"""

_DATA_TABLES = ("users", "links", "sources", "audit", "expected_links", "pending",
                "idempotency", "writes")

# Each page kind: table, JSON columns, and the column that carries a time filter.
_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "users": ("users", PORTAL_LAYOUT["portal_users"]),
    "links": ("links", PORTAL_LAYOUT["portal_links"]),
    "sources": ("sources", PORTAL_LAYOUT["portal_sources"]),
    "audit": ("audit", PORTAL_LAYOUT["portal_audit"]),
}
# The id columns a targeted read may select rows by, per page kind.
SELECTABLE: dict[str, frozenset[str]] = {
    "users": frozenset({"user_id", "op_patient_id", "op_contact_id"}),
    "links": frozenset({"caregiver_user_id", "dependent_user_id"}),
    "sources": frozenset({"user_id"}),
}
# Id values one list request may carry in all (the API's limit): URLs stay short.
MAX_SELECT_IDS = 100
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_OPTIONAL = frozenset({"op_patient_id", "op_contact_id", "user_id", "updated_at",
                       "created_at", "last_sync_at", "at"})


class BadRequest(ValueError):
    """A request the simulator refuses with 400 (bad cursor, limit, time)."""


def to_us(when: datetime) -> int:
    """Integer microseconds since the epoch: exact comparisons at the 15:00 boundary."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // _US


def from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat()


def _time_us(text: str | None) -> int | None:
    try:
        parsed = parse_time(text)
    except ValueError:
        return None
    return None if parsed is None else to_us(parsed)


def _json_value(column: str, value: str | None) -> Any:
    """Text of the CSV contract -> the JSON the API serves; bad text passes through."""
    if value is None:
        return None
    if column == "active":
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        return value or None
    if column in _OPTIONAL and not value.strip():
        return None
    return value


def encode_cursor(kind: str, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{seq}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        found, _, seq = raw.partition(":")
        if found != kind:
            raise ValueError(kind)
        return int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("invalid cursor") from None


@dataclass(frozen=True, slots=True)
class WriteResult:
    status: int
    body: dict[str, Any]
    replayed: bool = False


class PortalStore:
    """Visible portal state plus the queue of accepted writes not yet visible."""

    def __init__(
        self,
        db_path: str | Path = ":memory:",
        *,
        clock: SimClock,
        delay: timedelta = DEFAULT_DELAY,
        refresh_delay: tuple[timedelta, timedelta] = DEFAULT_REFRESH_DELAY,
        seed: int = 0,
    ) -> None:
        if refresh_delay[0] > refresh_delay[1]:
            raise ValueError("refresh_delay must be (min, max)")
        self.clock = clock
        self.delay = delay
        self.refresh_delay = refresh_delay
        self.seed = seed
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(db_path), check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def has_data(self) -> bool:
        """True once a load or a write has put anything in the store (a reused --db file)."""
        with self._lock:
            return any(
                self._db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
                for table in _DATA_TABLES
            )

    # -- loading ----------------------------------------------------------------------

    def replace_all(
        self,
        users: Iterable[Mapping[str, str | None]],
        links: Iterable[Mapping[str, str | None]],
        sources: Iterable[Mapping[str, str | None]],
        audit: Iterable[Mapping[str, str | None]],
        expected_links: Iterable[tuple[str, str]] | None = None,
    ) -> dict[str, int]:
        """Replace the whole state; expected links default to the loaded links."""
        with self._lock, self._db:
            for table in _DATA_TABLES:
                self._db.execute(f"DELETE FROM {table}")
            counts = {
                "portal_users": self._insert_rows("users", users),
                "portal_links": self._insert_rows("links", links),
                "portal_sources": self._insert_rows("sources", sources),
                "portal_audit": self._insert_rows("audit", audit),
            }
            if expected_links is None:
                self._db.execute(
                    "INSERT OR IGNORE INTO expected_links SELECT caregiver_user_id,"
                    " dependent_user_id FROM links WHERE caregiver_user_id IS NOT NULL"
                    " AND dependent_user_id IS NOT NULL"
                )
            else:
                self._db.executemany(
                    "INSERT OR IGNORE INTO expected_links VALUES (?, ?)", expected_links
                )
            counts["expected_links"] = self._db.execute(
                "SELECT COUNT(*) FROM expected_links"
            ).fetchone()[0]
            return counts

    def _insert_rows(self, kind: str, rows: Iterable[Mapping[str, str | None]]) -> int:
        table, columns = _KINDS[kind]
        extra = {"users": ("updated_us", "updated_at"), "audit": ("at_us", "at")}.get(kind)
        names = list(columns) + ([extra[0]] if extra else [])
        sql = (
            f"INSERT INTO {table} ({', '.join(names)}) "
            f"VALUES ({', '.join('?' for _ in names)})"
        )
        count = 0
        for row in rows:
            values: list[Any] = [row.get(c) for c in columns]
            if extra:
                values.append(_time_us(row.get(extra[1])))
            self._db.execute(sql, values)
            count += 1
        return count

    # -- reads ------------------------------------------------------------------------

    def page(
        self,
        kind: str,
        cursor: str | None = None,
        limit: int = DEFAULT_LIMIT,
        *,
        since: datetime | None = None,
        action: str | None = None,
        caregiver: str | None = None,
        dependent: str | None = None,
        match: Mapping[str, Collection[str]] | None = None,
        changed_since: datetime | None = None,
        truncate_to: int | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page in insertion order, keyset-paged so writes never shift a scan.

        `match` (column -> ids) and `changed_since` select the rows matching any of them:
        the targeted reads of incremental scans. `since`, `action`, `caregiver` and
        `dependent` narrow whatever is selected.

        `truncate_to` serves a short page whose cursor still continues correctly (the
        "partial" fault): clients must follow `next_cursor`, not guess from the size.
        """
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
        table, columns = _KINDS[kind]
        where = ["seq > ?"]
        args: list[Any] = [decode_cursor(kind, cursor) if cursor else 0]
        selected = self._selection(kind, table, match or {}, changed_since)
        if selected is not None:
            where.append(f"seq IN ({selected[0]})")
            args.extend(selected[1])
        if since is not None:
            # A row whose time is missing or unreadable might have changed: serve it.
            column = "updated_us" if kind == "users" else "at_us"
            where.append(f"({column} >= ? OR {column} IS NULL)")
            args.append(to_us(since))
        if action is not None:
            where.append("action = ?")
            args.append(action)
        if caregiver is not None:
            where.append("caregiver_user_id = ?")
            args.append(caregiver)
        if dependent is not None:
            where.append("dependent_user_id = ?")
            args.append(dependent)
        sql = (
            f"SELECT seq, {', '.join(columns)} FROM {table} "
            f"WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        )
        with self._lock, self._db:
            self._apply_due()
            rows = self._db.execute(sql, [*args, limit + 1]).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        if truncate_to is not None and 0 < truncate_to < len(rows):
            rows, more = rows[:truncate_to], True
        items = [{c: _json_value(c, r[c]) for c in columns} for r in rows]
        next_cursor = encode_cursor(kind, rows[-1]["seq"]) if more and rows else None
        return items, next_cursor

    @staticmethod
    def _selection(
        kind: str, table: str, match: Mapping[str, Collection[str]],
        changed_since: datetime | None,
    ) -> tuple[str, list[Any]] | None:
        """The seqs of the rows a targeted read selects, as one subquery; None when
        nothing selects (empty id lists are no selector): every row. Each branch is its
        own indexed lookup, since SQLite scans the whole table for an OR of them."""
        allowed = SELECTABLE.get(kind, frozenset())
        branches: list[str] = []
        args: list[Any] = []
        for column, values in match.items():
            if column not in allowed:
                raise BadRequest(f"{kind} cannot be selected by {column}")
            ids = sorted({v.strip() for v in values})
            if not ids:
                continue
            if "" in ids:
                raise BadRequest(f"{column} must not be blank")
            branches.append(
                f"SELECT seq FROM {table} WHERE trim({column}) IN ({', '.join('?' * len(ids))})"
            )
            args.extend(ids)
        if changed_since is not None:
            if kind != "users":
                raise BadRequest(f"{kind} cannot be selected by change time")
            # A row whose time is missing or unreadable might have changed: select it.
            branches.append(f"SELECT seq FROM {table} WHERE updated_us >= ?")
            branches.append(f"SELECT seq FROM {table} WHERE updated_us IS NULL")
            args.append(to_us(changed_since))
        if not branches:
            return None
        return " UNION ALL ".join(branches), args

    def get_user(self, user_id: str) -> dict[str, Any] | None:
        columns = _KINDS["users"][1]
        with self._lock, self._db:
            self._apply_due()
            row = self._db.execute(
                f"SELECT {', '.join(columns)} FROM users WHERE user_id = ? "
                "ORDER BY seq LIMIT 1",
                (user_id,),
            ).fetchone()
        return None if row is None else {c: _json_value(c, row[c]) for c in columns}

    def user_exists(self, user_id: str) -> bool:
        with self._lock, self._db:
            self._apply_due()
            return self._user_exists(user_id)

    def _user_exists(self, user_id: str | None) -> bool:
        if not user_id:
            return False
        found = self._db.execute("SELECT 1 FROM users WHERE user_id = ? LIMIT 1", (user_id,))
        return found.fetchone() is not None

    # -- writes -----------------------------------------------------------------------

    def write(
        self,
        op: str,
        *,
        user_id: str | None,
        payload: Mapping[str, str],
        key: str | None,
        fingerprint: str,
    ) -> WriteResult:
        """Accept one write, at most once per idempotency key; it shows after its delay.

        The key lookup, the queued change and the stored response share one transaction
        under the lock, so two concurrent retries of a request cannot both apply.
        """
        endpoint, is_source_op = OPERATIONS[op]
        with self._lock, self._db:
            now = self.clock.now()
            self._apply_due(now)
            if key:
                seen = self._db.execute(
                    "SELECT fingerprint, status, body FROM idempotency WHERE key = ?", (key,)
                ).fetchone()
                if seen is not None:
                    if seen["fingerprint"] != fingerprint:
                        return WriteResult(409, {
                            "error": "idempotency_key_reused",
                            "message": "this Idempotency-Key was used for another request",
                        })
                    return WriteResult(seen["status"], json.loads(seen["body"]), replayed=True)
            if op != "welcome" and not self._user_exists(user_id):
                return WriteResult(404, {"error": "not_found", "message": "no such user"})
            visible = self._visible_at(op, user_id, key, now, is_source_op)
            cur = self._db.execute(
                "INSERT INTO pending (op, user_id, payload, accepted_us, visible_us)"
                " VALUES (?, ?, ?, ?, ?)",
                (op, user_id, json.dumps(dict(payload)), to_us(now), visible),
            )
            body = {
                "status": "accepted",
                "request_id": str(cur.lastrowid),
                "operation": op,
                "visible_at": iso(from_us(visible)),
            }
            if key:
                self._db.execute(
                    "INSERT INTO idempotency VALUES (?, ?, ?, ?)",
                    (key, fingerprint, 202, json.dumps(body)),
                )
            self._db.execute(
                "INSERT INTO writes VALUES (?, ?, 1) ON CONFLICT (endpoint, key)"
                " DO UPDATE SET applied = applied + 1",
                (endpoint, key or ""),
            )
            return WriteResult(202, body)

    def _visible_at(
        self, op: str, user_id: str | None, key: str | None, now: datetime, is_source_op: bool
    ) -> int:
        if not is_source_op:
            return to_us(now + self.delay)
        # Deterministic per seed and request, whatever order other requests arrive in.
        earlier = self._db.execute(
            "SELECT COUNT(*), MAX(visible_us) FROM pending WHERE user_id = ? AND op LIKE"
            " 'source_%'",
            (user_id,),
        ).fetchone()
        token = key or f"#{earlier[0]}"
        low, high = (d.total_seconds() for d in self.refresh_delay)
        seconds = random.Random(f"{self.seed}|{op}|{user_id}|{token}").uniform(low, high)
        visible = to_us(now + timedelta(seconds=seconds))
        # One user's source operations take effect in the order they were made.
        latest = earlier[1]
        return max(visible, latest) if latest is not None else visible

    def _apply_due(self, now: datetime | None = None) -> None:
        """Apply every accepted write whose time has come, oldest due first."""
        limit = to_us(now or self.clock.now())
        due = self._db.execute(
            "SELECT id, op, user_id, payload, visible_us FROM pending"
            " WHERE applied = 0 AND visible_us <= ? ORDER BY visible_us, id",
            (limit,),
        ).fetchall()
        for row in due:
            at = from_us(row["visible_us"])
            payload = json.loads(row["payload"])
            op = row["op"]
            if op == "set_email":
                self._db.execute(
                    "UPDATE users SET email = ?, updated_at = ?, updated_us = ? WHERE user_id = ?",
                    (payload["email"], iso(at), to_us(at), row["user_id"]),
                )
            elif op == "welcome":
                self._record_welcome(payload["op_contact_id"], payload["email"], at)
            elif op == "source_disconnect":
                self._set_source(row["user_id"], DISCONNECTED, at)
            else:  # source_refresh, source_connect: resync from OP
                self._resync_links(row["user_id"], at)
                self._set_source(row["user_id"], CONNECTED, at)
            self._db.execute("UPDATE pending SET applied = 1 WHERE id = ?", (row["id"],))

    def _record_welcome(self, contact_id: str, email: str, at: datetime) -> None:
        # Stamped when the portal processes it, so `since` reads never miss a late event.
        user = self._db.execute(
            "SELECT user_id FROM users WHERE op_contact_id = ? ORDER BY seq LIMIT 1",
            (contact_id,),
        ).fetchone()
        self._db.execute(
            "INSERT INTO audit (at, action, user_id, email, at_us) VALUES (?, ?, ?, ?, ?)",
            (iso(at), WELCOME_ACTION, user["user_id"] if user else None, email, to_us(at)),
        )

    def _set_source(self, user_id: str, status: str, at: datetime) -> None:
        updated = self._db.execute(
            "UPDATE sources SET status = ?, last_sync_at = ? WHERE user_id = ?",
            (status, iso(at), user_id),
        )
        if updated.rowcount == 0:
            self._db.execute(
                "INSERT INTO sources (user_id, status, last_sync_at) VALUES (?, ?, ?)",
                (user_id, status, iso(at)),
            )

    def _resync_links(self, user_id: str, at: datetime) -> None:
        """Make every link involving the user match OP's authorizations (`expected_links`)."""
        expected = {
            (r[0], r[1])
            for r in self._db.execute(
                "SELECT caregiver_user_id, dependent_user_id FROM expected_links"
                " WHERE caregiver_user_id = ? OR dependent_user_id = ?",
                (user_id, user_id),
            )
            if self._user_exists(r[0]) and self._user_exists(r[1])
        }
        kept: set[tuple[str, str]] = set()
        for row in self._db.execute(
            "SELECT seq, caregiver_user_id, dependent_user_id FROM links"
            " WHERE caregiver_user_id = ? OR dependent_user_id = ?",
            (user_id, user_id),
        ).fetchall():
            pair = (row[1], row[2])
            if pair in expected and pair not in kept:
                kept.add(pair)
            else:
                self._db.execute("DELETE FROM links WHERE seq = ?", (row[0],))
        self._db.executemany(
            "INSERT INTO links (caregiver_user_id, dependent_user_id, created_at)"
            " VALUES (?, ?, ?)",
            [(c, d, iso(at)) for c, d in sorted(expected - kept)],
        )

    # -- introspection for tests and the admin API ------------------------------------

    def pending(self) -> list[dict[str, Any]]:
        """Accepted writes with their times (no payloads: they may hold emails)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, op, user_id, accepted_us, visible_us, applied FROM pending"
                " ORDER BY id"
            ).fetchall()
        return [
            {
                "request_id": str(r["id"]),
                "operation": r["op"],
                "user_id": r["user_id"],
                "accepted_at": iso(from_us(r["accepted_us"])),
                "visible_at": iso(from_us(r["visible_us"])),
                "applied": bool(r["applied"]),
            }
            for r in rows
        ]

    def write_counts(self) -> list[dict[str, Any]]:
        """How many times each (endpoint, key) write was applied: 1 means exactly once."""
        with self._lock:
            rows = self._db.execute(
                "SELECT endpoint, key, applied FROM writes ORDER BY endpoint, key"
            ).fetchall()
        return [{"endpoint": r[0], "key": r[1] or None, "applied": r[2]} for r in rows]


# -- the facade the server, the CLI and tests use --------------------------------------


def _text_row(table: str, item: object) -> dict[str, str | None] | None:
    """A record or raw mapping -> contract text; InvalidRecords have no row to serve."""
    columns = PORTAL_LAYOUT[table]
    if isinstance(item, InvalidRecord):
        return None
    if isinstance(item, Mapping):
        return {c: (None if item.get(c) is None else str(item.get(c))) for c in columns}
    if table_of(item) != table:
        raise TypeError(f"a {type(item).__name__} does not belong in {table}")
    return {c: format_value(getattr(item, c)) or None for c in columns}


def _pairs(items: Iterable[object]) -> Iterator[tuple[str, str]]:
    for item in items:
        if isinstance(item, CaregiverLink):
            yield item.caregiver_user_id, item.dependent_user_id
        elif isinstance(item, Mapping):
            caregiver, dependent = item.get("caregiver_user_id"), item.get("dependent_user_id")
            if caregiver and dependent:
                yield str(caregiver), str(dependent)
        elif isinstance(item, tuple) and len(item) == 2:
            yield str(item[0]), str(item[1])
        elif not isinstance(item, InvalidRecord):
            raise TypeError(f"not a link: {type(item).__name__}")


def read_csv_rows(path: Path, table: str) -> Iterator[dict[str, str | None]]:
    """Raw rows of one export file, text untouched, so bad values stay bad."""
    columns = PORTAL_LAYOUT.get(table, ("caregiver_user_id", "dependent_user_id"))
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return
        names = {n.strip().lower(): n for n in reader.fieldnames if n}
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{path.name} lacks column(s) {', '.join(missing)}")
        for row in reader:
            yield {c: row.get(names[c]) for c in columns}


def expected_links_from_op(op_dir: str | Path, users: Iterable[PortalUser]) -> set[tuple[str, str]]:
    """OP's truth as portal links: each authorized family contact on an active patient
    links every active caregiver user of the contact to every active patient user of the
    patient (docs/checks.md words)."""
    from worker.sources.csv_source import CsvOPSource  # the OP export reader

    op = CsvOPSource(op_dir)
    active_patients = {
        p.patient_id for p in op.patients() if not isinstance(p, InvalidRecord) and p.active
    }
    active_contacts = {
        c.contact_id for c in op.contacts() if not isinstance(c, InvalidRecord) and c.active
    }
    by_contact: dict[str, list[str]] = {}
    by_patient: dict[str, list[str]] = {}
    for user in users:
        if not user.active:
            continue
        if user.op_contact_id:
            by_contact.setdefault(user.op_contact_id, []).append(user.user_id)
        if user.op_patient_id:
            by_patient.setdefault(user.op_patient_id, []).append(user.user_id)
    expected: set[tuple[str, str]] = set()
    for fc in op.family_contacts():
        if isinstance(fc, InvalidRecord) or not fc.authority.grants_access or fc.is_self:
            continue
        if fc.contact_id not in active_contacts or fc.patient_id not in active_patients:
            continue
        for caregiver in by_contact.get(fc.contact_id, ()):
            for dependent in by_patient.get(fc.patient_id, ()):
                expected.add((caregiver, dependent))
    return expected


class Simulator:
    """The portal's state and clock; the HTTP server in `server.py` serves it."""

    def __init__(
        self,
        db_path: str | Path = ":memory:",
        *,
        clock: SimClock | None = None,
        delay: timedelta = DEFAULT_DELAY,
        refresh_delay: tuple[timedelta, timedelta] = DEFAULT_REFRESH_DELAY,
        seed: int = 0,
    ) -> None:
        self.clock = clock or SimClock()
        self.store = PortalStore(
            db_path, clock=self.clock, delay=delay, refresh_delay=refresh_delay, seed=seed
        )

    def close(self) -> None:
        self.store.close()

    def load(
        self,
        users: Iterable[object] = (),
        links: Iterable[object] = (),
        sources: Iterable[object] = (),
        audit: Iterable[object] = (),
        expected_links: Iterable[object] | None = None,
    ) -> dict[str, int]:
        """Replace the state with records (or raw text rows); InvalidRecords are skipped.

        `expected_links` are OP's authorizations that a source refresh restores
        (CaregiverLink, (caregiver, dependent) tuples or mappings); by default the links.
        """

        def rows(table: str, items: Iterable[object]) -> Iterator[dict[str, str | None]]:
            for item in items:
                row = _text_row(table, item)
                if row is not None:
                    yield row

        return self.store.replace_all(
            rows("portal_users", users),
            rows("portal_links", links),
            rows("portal_sources", sources),
            rows("portal_audit", audit),
            None if expected_links is None else list(_pairs(expected_links)),
        )

    def load_portal_dir(
        self, directory: str | Path, *, op_dir: str | Path | None = None
    ) -> dict[str, int]:
        """Load a portal export directory, text as-is (bad rows reach the client).

        Expected links come from `expected_links.csv` in the directory if present, else
        are derived from an OP export directory `op_dir`, else equal the current links.
        """
        base = Path(directory)
        tables = {t: list(read_csv_rows(base / csv_name(t), t)) for t in PORTAL_LAYOUT}
        expected: Iterable[tuple[str, str]] | None = None
        explicit = base / "expected_links.csv"
        if explicit.exists():
            expected = list(_pairs(read_csv_rows(explicit, "expected_links")))
        elif op_dir is not None:
            users = (
                parse_portal_user(row, "portal_users", n)
                for n, row in enumerate(tables["portal_users"], start=2)
            )
            expected = expected_links_from_op(
                op_dir, (u for u in users if isinstance(u, PortalUser))
            )
        return self.store.replace_all(
            tables["portal_users"],
            tables["portal_links"],
            tables["portal_sources"],
            tables["portal_audit"],
            expected,
        )
