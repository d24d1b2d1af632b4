"""OP and portal adapters over SQL databases (any SQLAlchemy URL), and their loaders.

Tables and columns carry the CSV contract's names. Rows are streamed in chunks and turned
into the CSV text representation before parsing, so the rules for dates, booleans and
authority are exactly those of the CSV adapter, whatever types a backend hands back.

Times are `DateTime(timezone=True)` and always stored in UTC, so `since` is one indexed
comparison that means the same on PostgreSQL (timestamptz) and SQLite (text): SQLite
keeps no offset, so a time stored there with any other offset would compare wrongly.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from datetime import UTC, date, datetime, tzinfo
from types import TracebackType
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Dialect,
    Engine,
    Index,
    MetaData,
    Table,
    Text,
    any_,
    bindparam,
    create_engine,
    func,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.types import TypeDecorator

from worker.model.records import (
    PortalUser,
)
from worker.sources.base import SourceError, SourceUnavailable
from worker.sources.layout import OP_LAYOUT, PORTAL_LAYOUT
from worker.sources.parsing import PARSERS, SINCE_COLUMN, format_value, parse_time, table_of
from worker.sources.tables import ID_COLUMNS, ID_SEP, OPTables, ReadOnlyPortalTables

CHUNK = 5000
LAYOUT: dict[str, tuple[str, ...]] = {**OP_LAYOUT, **PORTAL_LAYOUT}
TIME_COLUMNS = frozenset({"updated_at", "created_at", "at", "last_sync_at"})
# Row order, so row numbers and "first duplicate wins" are the same on every run.
KEYS: dict[str, tuple[str, ...]] = {
    "patients": ("patient_id",),
    "contacts": ("contact_id",),
    "family_contacts": ("patient_id", "contact_id"),
    "portal_users": ("user_id",),
    "portal_links": ("caregiver_user_id", "dependent_user_id"),
    "portal_sources": ("user_id",),
    "portal_audit": ("at", "user_id"),
}


# Columns the targeted reads of an incremental scan look rows up by (besides each
# table's key, whose index already serves a lookup on its first column).
LOOKUPS: dict[str, tuple[str, ...]] = {
    "contacts": ("patient_id", "phone", "dob"),
    "family_contacts": ("contact_id",),
    "portal_users": ("op_patient_id", "op_contact_id"),
    "portal_links": ("dependent_user_id",),
    "portal_audit": ("user_id",),
}
EMAIL_LOOKUPS: dict[str, tuple[str, ...]] = {"contacts": ("email",), "portal_audit": ("email",)}
# A targeted read off PostgreSQL (one array parameter there) puts at most this many ids
# in an IN list (SQLite's historical variable limit is 999); past it the table is streamed
# and filtered here, which gives the same rows.
IN_LIMIT = 900


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        # SQLite stores text without an offset: strip it only after converting to UTC.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _define(metadata: MetaData, layout: Mapping[str, tuple[str, ...]]) -> dict[str, Table]:
    tables: dict[str, Table] = {}
    for name, columns in layout.items():
        cols = [Column(c, UTCDateTime() if c in TIME_COLUMNS else Text) for c in columns]
        table = Table(name, metadata, *cols)
        Index(f"ix_{name}_key", *(table.c[k] for k in KEYS[name]))
        since = SINCE_COLUMN[name]
        if since is not None and since not in KEYS[name]:
            Index(f"ix_{name}_{since}", table.c[since])
        for column in LOOKUPS.get(name, ()):
            Index(f"ix_{name}_{column}", table.c[column])
        for column in EMAIL_LOOKUPS.get(name, ()):
            Index(f"ix_{name}_{column}_folded", _folded(table.c[column]))
        tables[name] = table
    return tables


def _folded(column: Any) -> Any:
    """An email as the checks compare it: trimmed, lower case (indexed as such)."""
    return func.lower(func.trim(column))


OP_METADATA = MetaData()
PORTAL_METADATA = MetaData()
TABLES: dict[str, Table] = {
    **_define(OP_METADATA, OP_LAYOUT),
    **_define(PORTAL_METADATA, PORTAL_LAYOUT),
}


def make_engine(url: str | URL | Engine) -> Engine:
    """An engine for a URL; plain `postgresql://` means psycopg 3, the driver we ship."""
    if isinstance(url, Engine):
        return url
    try:
        parsed = make_url(url)
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed)
    except (ArgumentError, ValueError) as err:
        raise SourceError(f"bad database URL: {err}") from None
    except ModuleNotFoundError as err:  # a driver that is not installed
        raise SourceError(f"no database driver for this URL: {err.name}") from None


def _to_text(value: Any) -> str | None:
    """A column value in the CSV representation, so parsing.py applies unchanged."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, datetime, date)):
        return format_value(value)
    return str(value)


def _changed_text(value: str | None, since: datetime | None) -> bool:
    """A text time at or after `since`, or none (a row with no time may have changed)."""
    if since is None:
        return False
    try:
        when = parse_time(value)
    except ValueError:
        return True
    return when is None or when >= since


def _source_error(err: SQLAlchemyError) -> type[SourceError]:
    """A lost or refused connection may heal; a missing table or column will not."""
    transient = isinstance(err, OperationalError | InterfaceError | DisconnectionError)
    return SourceUnavailable if transient else SourceError


def _one_line(err: SQLAlchemyError) -> str:
    cause: object = err.orig if isinstance(err, DBAPIError) and err.orig is not None else err
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


class _SqlDb:
    label = "database"

    def __init__(self, url: str | URL | Engine, zone: tzinfo | None = None) -> None:
        self._owned = not isinstance(url, Engine)
        self.engine = make_engine(url)
        # The zone of times stored as text without an offset (op_timezone); typed
        # timestamp columns are UTC by the schema.
        self.zone = zone

    def close(self) -> None:
        """Release pooled connections (only for an engine this adapter created)."""
        if self._owned:
            self.engine.dispose()

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _where(self) -> str:
        return f"{self.label} database {self.engine.url.render_as_string(hide_password=True)}"

    def _read(
        self,
        table: str,
        since: datetime | None = None,
        where: Any = None,
        keep: Callable[[dict[str, str | None]], bool] | None = None,
    ) -> Iterator[Any]:
        """Stream one table; `since` keeps rows changed at/after it, and rows with no time.

        `where` (a SQL condition) and `keep` (a test of the text row) narrow the read to
        the rows a targeted read asks for.
        """
        t = TABLES[table]
        columns = LAYOUT[table]
        parse = PARSERS[table]
        stmt = select(*(t.c[c] for c in columns)).order_by(*(t.c[k] for k in KEYS[table]))
        since_col = SINCE_COLUMN[table]
        if since is not None and since_col is not None:
            if since.tzinfo is None:
                since = since.replace(tzinfo=UTC)
            col = t.c[since_col]
            stmt = stmt.where(or_(col >= since, col.is_(None)))
        if where is not None:
            stmt = stmt.where(where)
        try:
            with self.engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=CHUNK).execute(
                    stmt
                )
                for number, row in enumerate(result, 1):
                    text = {c: _to_text(v) for c, v in zip(columns, row, strict=True)}
                    if keep is None or keep(text):
                        yield parse(text, table, number, zone=self.zone)
        except SQLAlchemyError as err:
            raise _source_error(err)(
                f"cannot read {table} from {self._where()}: {_one_line(err)}"
            ) from None

    def _count_rows(self, table: str) -> int:
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(TABLES[table]))
                           .scalar_one())
        except SQLAlchemyError as err:
            raise _source_error(err)(
                f"cannot count {table} in {self._where()}: {_one_line(err)}"
            ) from None

    def _ids(self, table: str) -> Iterator[str]:
        """Only the id columns of every row: one narrow query."""
        t = TABLES[table]
        columns = ID_COLUMNS[table]
        stmt = select(*(t.c[c] for c in columns))
        try:
            with self.engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=CHUNK).execute(
                    stmt
                )
                for row in result:
                    values = [(_to_text(v) or "").strip() for v in row]
                    if all(values):
                        yield ID_SEP.join(values)
        except SQLAlchemyError as err:
            raise _source_error(err)(
                f"cannot read {table} ids from {self._where()}: {_one_line(err)}"
            ) from None

    def read_changed(self, table: str, since: datetime) -> Iterator[Any]:
        """Rows changed at or after `since`, or with no time: one indexed query."""
        return self._read(table, since)

    def _select(
        self,
        table: str,
        match: Mapping[str, Collection[str]],
        folded: Collection[str] = (),
        changed_since: datetime | None = None,
    ) -> Iterator[Any]:
        """Rows whose value in any of `match`'s columns is one of its values, or (with
        `changed_since`) that changed at or after it: the targeted read of an incremental
        scan (`folded` columns compare trimmed and lower case). Rows come in key order, as
        in a full read, so the first duplicate wins."""
        wanted = {c: sorted(set(v)) for c, v in match.items() if v}
        if not wanted and changed_since is None:
            return iter(())
        t = TABLES[table]

        def column(name: str) -> Any:
            return _folded(t.c[name]) if name in folded else t.c[name]

        changed: list[Any] = []
        since_col = SINCE_COLUMN[table]
        if changed_since is not None and since_col is not None:
            if changed_since.tzinfo is None:
                changed_since = changed_since.replace(tzinfo=UTC)
            changed = [t.c[since_col] >= changed_since, t.c[since_col].is_(None)]
        if self.engine.dialect.name == "postgresql":
            return self._read(table, where=or_(*changed, *(
                column(c) == any_(bindparam(f"ids_{c}", v, type_=ARRAY(Text)))
                for c, v in wanted.items()
            )))
        if sum(len(v) for v in wanted.values()) <= IN_LIMIT:
            return self._read(
                table, where=or_(*changed, *(column(c).in_(v) for c, v in wanted.items()))
            )
        sets = {c: frozenset(v) for c, v in wanted.items()}

        def keep(text: dict[str, str | None]) -> bool:
            for c, values in sets.items():
                value = text[c] or ""
                if (value.strip().lower() if c in folded else value) in values:
                    return True
            return False

        if changed and since_col is not None:  # changed, or (tested here) matching
            time_column = since_col
            return self._read(table, keep=lambda text: keep(text) or _changed_text(
                text.get(time_column), changed_since))
        return self._read(table, keep=keep)



class SqlOPSource(OPTables, _SqlDb):
    """OPReader over tables patients, contacts, family_contacts."""


class SqlPortalSource(ReadOnlyPortalTables, _SqlDb):
    """PortalReader over portal_* tables: a copy of the portal, so it is read-only."""

    what = "the portal database copy"

    def get_user(self, user_id: str) -> PortalUser | None:
        t = TABLES["portal_users"]
        columns = LAYOUT["portal_users"]
        stmt = select(*(t.c[c] for c in columns)).where(t.c.user_id == user_id).limit(1)
        try:
            with self.engine.connect() as conn:
                row = conn.execute(stmt).first()
        except SQLAlchemyError as err:
            raise _source_error(err)(
                f"cannot read portal_users from {self._where()}: {_one_line(err)}"
            ) from None
        if row is None:
            return None
        text = {c: _to_text(v) for c, v in zip(columns, row, strict=True)}
        record = PARSERS["portal_users"](text, "portal_users", 1)
        return record if isinstance(record, PortalUser) else None


# -- creating and loading (tests, demo, benchmark) ---------------------------------------


def create_op_tables(engine: Engine) -> None:
    """The contract's OP tables, with the indexes ordered and `since` reads use."""
    OP_METADATA.create_all(engine, checkfirst=True)


def create_portal_tables(engine: Engine) -> None:
    """The contract's portal tables, for a database copy of the portal (tests, demo)."""
    PORTAL_METADATA.create_all(engine, checkfirst=True)


def _sql_row(table: str, columns: tuple[str, ...], item: object) -> dict[str, Any]:
    """A record (or a raw text row) as the values stored: text, NULL, or a UTC time."""
    if not isinstance(item, Mapping) and table_of(item) != table:
        raise TypeError(f"a {type(item).__name__} does not belong in table {table}")
    row: dict[str, Any] = {}
    for c in columns:
        value = item.get(c) if isinstance(item, Mapping) else getattr(item, c)
        if c in TIME_COLUMNS:
            row[c] = parse_time(value) if isinstance(value, str) else value
        else:
            row[c] = None if value is None else format_value(value)
    return row


def load_table_sql(engine: Engine, table: str, rows: Iterable[object]) -> int:
    """Insert records (or raw text rows) in batches of CHUNK, in one transaction.

    On PostgreSQL through psycopg 3 the rows go in with COPY: the same values, about ten
    times faster than batched INSERTs (the benchmark loads a million rows).
    """
    t = TABLES[table]
    columns = LAYOUT[table]
    count = 0
    batch: list[dict[str, Any]] = []
    with engine.begin() as conn:
        raw: Any = conn.connection.driver_connection
        if engine.dialect.name == "postgresql" and hasattr(raw, "cursor"):
            with raw.cursor() as cursor:
                if hasattr(cursor, "copy"):
                    names = ", ".join(columns)
                    with cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                        for item in rows:
                            row = _sql_row(table, columns, item)
                            copy.write_row([row[c] for c in columns])
                            count += 1
                    return count
        for item in rows:
            batch.append(_sql_row(table, columns, item))
            if len(batch) >= CHUNK:
                conn.execute(t.insert(), batch)
                count += len(batch)
                batch = []
        if batch:
            conn.execute(t.insert(), batch)
            count += len(batch)
    return count


def load_op_sql(
    engine: Engine,
    patients: Iterable[object],
    contacts: Iterable[object],
    family_contacts: Iterable[object],
) -> dict[str, int]:
    """Create the OP tables if needed and append the records; returns rows per table."""
    create_op_tables(engine)
    return {
        "patients": load_table_sql(engine, "patients", patients),
        "contacts": load_table_sql(engine, "contacts", contacts),
        "family_contacts": load_table_sql(engine, "family_contacts", family_contacts),
    }


def load_portal_sql(
    engine: Engine,
    users: Iterable[object],
    links: Iterable[object],
    sources: Iterable[object],
    audit: Iterable[object],
) -> dict[str, int]:
    """Create the portal tables if needed and append the records; returns rows per table."""
    create_portal_tables(engine)
    parts = {"portal_users": users, "portal_links": links, "portal_sources": sources,
             "portal_audit": audit}
    return {t: load_table_sql(engine, t, rows) for t, rows in parts.items()}
