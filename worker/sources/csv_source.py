"""OP and portal adapters over CSV export directories, and the writers of that layout.

Files are streamed a row at a time, so a million-row export costs the memory of its
records and no more. Every row problem (bad encoding, wrong field count, a huge field, a
value the parsers reject) becomes an `InvalidRecord` at the row's first physical line and
reading goes on; only a file that cannot be read at all (missing, empty, without the
contract's columns) stops the run with a one-line `SourceError`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping
from contextlib import closing
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any, cast

from worker.records import (
    Contact,
    InvalidRecord,
    PortalUser,
)
from worker.sources.base import SourceError
from worker.sources.layout import OP_LAYOUT, PORTAL_LAYOUT, csv_name
from worker.sources.parsing import (
    PARSERS,
    SINCE_COLUMN,
    Row,
    format_value,
    invalid,
    parse_time,
    table_of,
)
from worker.sources.tables import OPTables, ReadOnlyPortalTables

# Given a file's column -> position, a test of a raw row (its list of fields).
RowTest = Callable[[dict[str, int]], Callable[[list[str]], bool]]

LAYOUT: dict[str, tuple[str, ...]] = {**OP_LAYOUT, **PORTAL_LAYOUT}

# csv's default 128 KiB limit would make one oversized field abort the whole file; we
# lift it once and reject big fields per row instead.
CSV_FIELD_LIMIT = 256 * 1024 * 1024
MAX_FIELD_CHARS = 1024 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")
_limit_raised = False


def _raise_field_limit() -> None:
    global _limit_raised
    if not _limit_raised:
        csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
        _limit_raised = True


def _utc(since: datetime | None) -> datetime | None:
    if since is not None and since.tzinfo is None:
        return since.replace(tzinfo=UTC)
    return since


def _row_problem(fields: list[str]) -> str | None:
    """Undecodable bytes and oversized fields, checked cheaply for the common ASCII row."""
    joined = "".join(fields)
    if joined.isascii():
        if len(joined) > MAX_FIELD_CHARS and any(len(f) > MAX_FIELD_CHARS for f in fields):
            return "field too large (over 1 MiB)"
        return None
    if _SURROGATE.search(joined):
        return "not valid UTF-8"
    if len(joined) > MAX_FIELD_CHARS and any(len(f) > MAX_FIELD_CHARS for f in fields):
        return "field too large (over 1 MiB)"
    return None


class _CsvDir:
    """Reads one table of an export directory as rows of the contract's columns."""

    label = "export"

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def _path(self, table: str) -> Path:
        return self.dir / csv_name(table)

    def _rows(
        self, table: str, test: RowTest | None = None
    ) -> Iterator[tuple[int, Row] | InvalidRecord]:
        """(first physical line, row) per data row, or an InvalidRecord for a broken one.

        csv.reader rather than DictReader: DictReader silently skips blank lines, which
        would make a row's first line unknowable, and pads short rows we must reject.
        With `test`, only rows passing it come out, checked on the raw fields before any
        other work; rows too broken to test (no ids to match) are skipped.
        """
        _raise_field_limit()
        name = csv_name(table)
        path = self._path(table)
        try:
            # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row
            # is reported and skipped instead of aborting the file.
            # Opened apart from the `with` below only to map open errors to SourceError.
            handle = open(  # noqa: SIM115
                path, encoding="utf-8-sig", errors="surrogateescape", newline=""
            )
        except FileNotFoundError:
            if not self.dir.is_dir():
                raise SourceError(
                    f"{self.label} export directory {self.dir} does not exist"
                ) from None
            raise SourceError(f"{self.label} export directory {self.dir} has no {name}") from None
        except OSError as err:
            raise SourceError(f"cannot open {path}: {err.strerror or err}") from None
        with handle:
            reader = csv.reader(handle)
            try:
                header = next((h for h in reader if h), None)
            except csv.Error as err:
                raise SourceError(f"{path}: unreadable header row ({err})") from None
            if header is None:
                raise SourceError(f"{path} is empty (no header row)")
            columns = [c.strip().lower() for c in header]
            wanted = LAYOUT[table]
            missing = [c for c in wanted if c not in columns]
            if missing:
                raise SourceError(
                    f"{path} lacks required column(s) {', '.join(missing)} "
                    f"(header line {reader.line_num})"
                )
            doubled = sorted({c for c in wanted if columns.count(c) > 1})
            if doubled:
                raise SourceError(f"{path} has duplicate column(s) {', '.join(doubled)}")
            pick = itemgetter(*(columns.index(c) for c in wanted))
            width = len(columns)
            keep = test({c: columns.index(c) for c in wanted}) if test is not None else None

            previous = reader.line_num
            while True:
                line = previous + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    previous = reader.line_num
                    if keep is None:
                        yield InvalidRecord(name, line, f"unreadable CSV row ({err})")
                    continue
                previous = reader.line_num
                if not fields:  # a blank line
                    continue
                if len(fields) != width:
                    if keep is None:
                        yield InvalidRecord(
                            name, line, f"expected {width} fields, found {len(fields)}"
                        )
                    continue
                if keep is not None and not keep(fields):
                    continue
                row = dict(zip(wanted, pick(fields), strict=True))
                problem = _row_problem(fields)
                if problem is not None:
                    yield invalid(table, row, name, line, problem)
                    continue
                yield line, row

    def _read(
        self,
        table: str,
        since: datetime | None = None,
    ) -> Iterator[Any]:
        parse: Callable[[Row, str, int], Any] = PARSERS[table]
        name = csv_name(table)
        since = _utc(since)
        column = SINCE_COLUMN[table]
        for item in self._rows(table):
            if isinstance(item, InvalidRecord):
                yield item
                continue
            record = parse(item[1], name, item[0])
            if since is not None and column is not None and not isinstance(record, InvalidRecord):
                changed = getattr(record, column)
                # A record without a time might have changed: reread it (conservative).
                if changed is not None and changed < since:
                    continue
            yield record


    def _parsed(self, table: str, test: RowTest) -> Iterator[Any]:
        parse: Callable[[Row, str, int], Any] = PARSERS[table]
        name = csv_name(table)
        for item in self._rows(table, test):
            yield item if isinstance(item, InvalidRecord) else parse(item[1], name, item[0])

    def read_changed(self, table: str, since: datetime) -> Iterator[Any]:
        """Rows changed at or after `since` (or with no readable time), testing the time
        before parsing the rest: an incremental scan's pass over a large export.

        Unlike `since` on the readers, a bad row with an old time is left out, as the SQL
        adapter leaves it out: it was reported by the scan that first read it.
        """
        column = SINCE_COLUMN[table]
        assert column is not None
        since_utc = _utc(since)
        assert since_utc is not None

        def test(index: dict[str, int]) -> Callable[[list[str]], bool]:
            at = index[column]

            def changed(fields: list[str]) -> bool:
                try:
                    when = parse_time(fields[at])
                except ValueError:
                    return True
                return when is None or when >= since_utc

            return changed

        return self._parsed(table, test)

    def _select(
        self,
        table: str,
        match: Mapping[str, Collection[str]],
        folded: Collection[str] = (),
        changed_since: datetime | None = None,
    ) -> Iterator[Any]:
        """Rows whose value in any of `match`'s columns (trimmed, as the parsers trim ids;
        `folded` ones also lower-cased) is one of its values, or (with `changed_since`)
        that changed at or after it: one streamed pass that parses only those rows. The
        targeted read of an incremental scan."""
        sets = {c: frozenset(v) for c, v in match.items() if v}
        if not sets and changed_since is None:
            return iter(())
        since = _utc(changed_since)
        column = SINCE_COLUMN[table]

        def test(index: dict[str, int]) -> Callable[[list[str]], bool]:
            checks = [(index[c], values, c in folded) for c, values in sets.items()]
            at_time = index[column] if since is not None and column is not None else None

            def wanted(fields: list[str]) -> bool:
                for at, values, fold in checks:
                    value = fields[at].strip()
                    if (value.lower() if fold else value) in values:
                        return True
                if at_time is None:
                    return False
                try:
                    when = parse_time(fields[at_time])
                except ValueError:
                    return True
                return when is None or when >= since  # type: ignore[operator]

            return wanted

        return self._parsed(table, test)


class CsvOPSource(OPTables, _CsvDir):
    """OPReader over a directory holding patients.csv, contacts.csv, family_contacts.csv."""


class CsvPortalSource(ReadOnlyPortalTables, _CsvDir):
    """PortalReader over a portal export directory; exports cannot be changed."""

    what = "the portal CSV export"

    def get_user(self, user_id: str) -> PortalUser | None:
        """A fresh read of one user: a scan of the export (verification is rare)."""
        with closing(cast(Generator[Any, None, None], self._read("portal_users"))) as users:
            for record in users:
                if isinstance(record, PortalUser) and record.user_id == user_id:
                    return record
        return None


# -- writers ------------------------------------------------------------------------------


def write_table_csv(path: str | Path, table: str, rows: Iterable[object]) -> int:
    """Stream records (or raw text rows, to plant bad values) to one file; returns the count.

    A raw row is a mapping of column -> text written verbatim; missing columns are blank.
    """
    columns = LAYOUT[table]
    count = 0
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for item in rows:
            writer.writerow(_as_text_row(table, columns, item))
            count += 1
    return count


def _as_text_row(table: str, columns: tuple[str, ...], item: object) -> list[str]:
    if isinstance(item, Mapping):
        return [format_value(item.get(c)) for c in columns]
    if table_of(item) != table:
        raise TypeError(f"a {type(item).__name__} does not belong in {csv_name(table)}")
    return [format_value(getattr(item, c)) for c in columns]


def write_op_csv(
    directory: str | Path,
    patients: Iterable[object],
    contacts: Iterable[object],
    family_contacts: Iterable[object],
) -> dict[str, int]:
    """Write an OP export directory in the DESIGN.md layout; returns rows per file."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "patients": write_table_csv(out / "patients.csv", "patients", patients),
        "contacts": write_table_csv(out / "contacts.csv", "contacts", contacts),
        "family_contacts": write_table_csv(
            out / "family_contacts.csv", "family_contacts", family_contacts
        ),
    }


def write_portal_csv(
    directory: str | Path,
    users: Iterable[object],
    links: Iterable[object],
    sources: Iterable[object],
    audit: Iterable[object],
) -> dict[str, int]:
    """Write a portal export directory in the DESIGN.md layout; returns rows per file."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"portal_users": users, "portal_links": links, "portal_sources": sources,
             "portal_audit": audit}
    return {t: write_table_csv(out / csv_name(t), t, rows) for t, rows in parts.items()}


class _SingleFile(_CsvDir):
    """One export file under any name, read with the layout of `table`."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(Path(path).parent)
        self.file = Path(path)

    def _path(self, table: str) -> Path:
        return self.file


def read_contacts_file(path: str | Path) -> Iterator[Contact | InvalidRecord]:
    """Contacts from one file in the contacts.csv layout (`oprecon duplicates`)."""
    if not Path(path).is_file():
        raise SourceError(f"contacts file {path} does not exist")
    return _SingleFile(path)._read("contacts")
