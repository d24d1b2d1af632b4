"""OP and portal adapters over CSV export directories, and the writers of that layout.

Files are streamed a row at a time, so a million-row export costs the memory of its
records and no more. Every row problem (bad encoding, wrong field count, a huge field, a
value the parsers reject) becomes an `InvalidRecord` at the row's first physical line and
reading goes on; only a file that cannot be read at all (missing, empty, without the
contract's columns) stops the run with a one-line `SourceError`.
"""

from __future__ import annotations

import csv
import os
import re
import stat
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import (
    Callable,
    Collection,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from itertools import accumulate, compress
from operator import itemgetter
from pathlib import Path
from typing import Any, cast

from worker.model.records import (
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
    row_ids,
    table_of,
)
from worker.sources.tables import ID_COLUMNS, ID_SEP, OPTables, ReadOnlyPortalTables

LAYOUT: dict[str, tuple[str, ...]] = {**OP_LAYOUT, **PORTAL_LAYOUT}

MAX_FIELD_CHARS = 1024 * 1024
MAX_LINE_CHARS = 4 * 1024 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")
# Of a line over the limit, this much is kept: enough to find the ids at its start.
_LONG_PREFIX = 4096
# The id columns a broken row is searched for: every layout leads with its ids (only
# contacts.patient_id comes later, and a shifted row would put anything there).
_LEADING = 3


@dataclass(frozen=True, slots=True)
class CsvLimits:
    """Bounds on one read (settings csv_max_field_chars, csv_max_line_chars): a field or
    a physical line over them makes its row unreadable, and memory stays bounded
    whatever the file holds."""

    max_field_chars: int = MAX_FIELD_CHARS
    max_line_chars: int = MAX_LINE_CHARS


def _raise_field_limit(limits: CsvLimits | None = None) -> None:
    """csv's limit is process-wide: set it to this read's bound (plus one, so the row
    check below names the problem of a field exactly at the limit's edge)."""
    wanted = (limits or CsvLimits()).max_field_chars + 1
    if csv.field_size_limit() != wanted:
        csv.field_size_limit(wanted)


def open_regular(path: Path) -> Any:
    """Open an export file for text reading, refusing anything but a regular file: a
    FIFO would block forever and a device (a link to /dev/zero) never ends. Opened
    non-blocking so that even a FIFO's open returns, then checked on the descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode)
                    or stat.S_ISBLK(mode) else "a directory" if stat.S_ISDIR(mode)
                    else "not a regular file")
            raise SourceError(f"{path} is {kind}, not a regular file: refused")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return open(  # noqa: SIM115
            fd, encoding="utf-8-sig", errors="surrogateescape", newline="", closefd=True)
    except BaseException:
        os.close(fd)
        raise


class _BoundedLines:
    """The physical lines of an open text file, none longer than the limit: a longer
    line is read through in bounded pieces and handed on as a blank line (csv skips
    it), its number and first characters kept in `long` for the row that held it."""

    def __init__(self, handle: Any, limit: int) -> None:
        self.handle, self.limit = handle, limit
        self.long: dict[int, str] = {}
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        readline, limit, ends = self.handle.readline, self.limit, ("\n", "\r")
        while True:
            line = readline(limit)
            if not line:
                return
            self.count += 1
            if len(line) >= limit and not line.endswith(ends):
                prefix = line[:_LONG_PREFIX]
                while line and not line.endswith(ends):  # skip the rest, bounded
                    line = readline(limit)
                self.long[self.count] = prefix
                yield "\n"
                continue
            yield line


class _Tap:
    """Re-reads physical lines of a file (forward only) to salvage the ids of rows a
    broken quote swallowed: only the error path pays for it."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit
        self.lines: Iterator[str] | None = None
        self.at = 0  # lines consumed so far

    def get(self, first: int, last: int) -> list[str]:
        if self.lines is None or first <= self.at:
            self.close()
            self.handle = open_regular(self.path)
            self.lines, self.at = iter(_BoundedLines(self.handle, self.limit)), 0
        out: list[str] = []
        for text in self.lines:
            self.at += 1
            if self.at >= first:
                out.append(text)
            if self.at >= last:
                break
        return out

    def close(self) -> None:
        if self.lines is not None:
            self.handle.close()
            self.lines = None


def _salvage(table: str, positions: Mapping[str, int], text: str) -> tuple[
        str | None, str | None, str | None, str | None] | None:
    """The ids at the start of one raw line, read as csv or, failing that, split on
    commas: marking a wrong id unknown only withholds a conclusion, never makes one."""
    try:
        fields = next(csv.reader([text]), [])
    except csv.Error:
        fields = []
    if len(fields) < len(positions):
        fields = text.split(",")
    # Only the leading columns: past a stray comma or quote the others are shifted.
    row = {c: fields[i] for c, i in positions.items() if i < min(len(fields), _LEADING)}
    ids = row_ids(table, row)
    return ids if any(ids) else None


def _utc(since: datetime | None) -> datetime | None:
    if since is not None and since.tzinfo is None:
        return since.replace(tzinfo=UTC)
    return since


def _row_problem(fields: list[str], limit: int = MAX_FIELD_CHARS) -> str | None:
    """Undecodable bytes and oversized fields, checked cheaply for the common ASCII row."""
    joined = "".join(fields)
    if not joined.isascii() and _SURROGATE.search(joined):
        return "not valid UTF-8"
    if len(joined) > limit and any(len(f) > limit for f in fields):
        return f"field too large (over {limit} characters: csv_max_field_chars)"
    return None


# -- per-process index of an export file (repeated targeted reads) -----------------------
#
# An incremental scan reads portal_users three times (changes, then two widening selects)
# and, in a long-lived worker, every table again at each scan, while the export stays the
# same. The first targeted read of a file indexes it as it streams it: for every
# well-formed row its first and last physical line, a hash of each trimmed key field and
# its parsed change time. Later targeted reads of the same file (same size, mtime, ctime,
# inode) take the rows whose hashes or times may match, seek to them, parse only those and
# test each with the very predicate of the streamed read, so they give the same records in
# the same order (a hash collision only adds a row that the test then drops). Rows the
# streamed read skips (csv errors, wrong field count) are not indexed.
#
# Indexing makes the pass that builds it ~30-45% dearer, so a read by ids alone (links,
# sources: once per scan) indexes a file only the second time it reads it; a
# changed-since read (portal users, audit, the OP tables: read again in the same scan)
# indexes it at once.
#
# Kept per row: 16 bytes for its lines, an 8-byte hash per key column, its time (a
# datetime, ~56 bytes) and 8 bytes per physical line for the byte offsets (made by the
# first indexed read). Measured (tracemalloc) per 100k rows: portal_users 10.7 MB,
# portal_audit 8.2 MB, portal_links 4.1 MB, portal_sources 3.4 MB; 37 MB for all four
# at 168k users, ~40 MB more for a moment while portal_users is indexed (its key fields
# are held until hashed). At most _INDEX_FILES files are kept (the least recently used
# goes), and a file with more than _INDEX_MAX_ROWS rows is not indexed.

# The key columns `_select` is called with (tables.py), and whether the table's keys are
# lower-cased (contacts: email is folded); a select on another column streams the file.
INDEX_COLUMNS: dict[str, tuple[tuple[str, ...], bool]] = {
    "patients": (("patient_id",), False),
    "contacts": (("contact_id", "patient_id", "email", "phone", "dob"), True),
    "family_contacts": (("patient_id", "contact_id"), False),
    "portal_users": (("user_id", "op_patient_id", "op_contact_id"), False),
    "portal_links": (("caregiver_user_id", "dependent_user_id"), False),
    "portal_sources": (("user_id",), False),
    "portal_audit": ((), False),
}
_INDEXING = True  # tests turn it off to get the streamed reads to compare with
_INDEX_FILES = 8
_INDEX_MAX_ROWS = 4_000_000
# Above one match in this many rows a streamed pass is cheaper than seeking to each row.
_INDEX_DENSE = 4
# The time of a row whose time is blank, unreadable or was not parsed: always re-read.
_ALWAYS = datetime.max.replace(tzinfo=UTC)

# A file written less than this long before it was indexed could change again within the
# same timestamp tick, size unchanged, unseen: its index is not kept.
_RACY_NS = 2_000_000_000

Identity = tuple[int, int, int, int, int]
# Given a file's column -> position and (when the file is being indexed) where to put each
# tested row's change time, a test of a raw row (its list of fields).
TimeSink = Callable[[datetime], None]
RowTest = Callable[[dict[str, int], TimeSink | None], Callable[[list[str]], bool]]


def _identity(st: os.stat_result) -> Identity:
    """Size, mtime, ctime (which no one can set back), inode, device."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class _FileIndex:
    """What a streamed pass learnt about one export file, to read single rows later."""

    def __init__(self, identity: Identity, width: int, positions: dict[str, int],
                 starts: array[int], ends: array[int], table: str,
                 hashes: array[int], times: list[datetime] | None) -> None:
        self.identity = identity
        self.width = width
        self.positions = positions
        self.starts = starts
        self.ends = ends
        self.count = len(starts)
        self.columns, self.fold = INDEX_COLUMNS[table]
        self.hashes = hashes  # row after row, one per column
        self.times = times
        self.offsets: array[int] | None = None  # byte offset of each physical line
        self.lock = threading.Lock()

    def matches(self, sets: Mapping[str, frozenset[str]], folded: Collection[str],
                since: datetime | None) -> list[int] | None:
        """Row numbers that may match (a superset: each is tested again once read), or
        None when the index cannot tell."""
        found: set[int] = set()
        every = range(self.count)
        step = len(self.columns)
        for column, values in sets.items():
            if column in folded:
                if not self.fold:
                    return None
                wanted = {hash(v) for v in values}
            else:
                wanted = {hash(v.lower() if self.fold else v) for v in values}
            at = self.columns.index(column)
            found.update(compress(every, map(wanted.__contains__, self.hashes[at::step])))
        if since is not None:
            if self.times is None:
                return None
            found.update(compress(every, map(since.__le__, self.times)))
        return sorted(found)

    def line_offsets(self, handle: Any) -> array[int]:
        """Byte offset of each physical line, split as the text reader splits them
        (\\n, \\r\\n or a lone \\r), built on first use."""
        with self.lock:
            if self.offsets is None:
                self.offsets = _line_offsets(handle)
            return self.offsets


_CHUNK = 1 << 20


def _line_offsets(handle: Any) -> array[int]:
    offsets = array("q", [0])
    handle.seek(0)
    position, tail = 0, b""
    while True:
        chunk = handle.read(_CHUNK)
        if not chunk:
            break
        lines = (tail + chunk).splitlines(True)
        tail = lines.pop()
        if tail.endswith(b"\n"):  # complete; a lone \r may still get its \n next chunk
            lines.append(tail)
            tail = b""
        ends = list(accumulate(map(len, lines), initial=position))
        offsets.extend(ends[1:])
        position = ends[-1]
    if tail:
        offsets.append(position + len(tail))
    return offsets


_indexes: OrderedDict[tuple[str, str], _FileIndex] = OrderedDict()
_indexes_lock = threading.Lock()
# Files read once by ids alone (the next such read indexes them).
_seen: OrderedDict[tuple[str, str], Identity] = OrderedDict()


def _read_before(path: Path, table: str, identity: Identity) -> bool:
    """Whether this very file was read by ids before (and note that it now is)."""
    key = (str(path), table)
    with _indexes_lock:
        before = _seen.get(key) == identity
        _seen[key] = identity
        _seen.move_to_end(key)
        while len(_seen) > 4 * _INDEX_FILES:
            _seen.popitem(last=False)
        return before


def _cached_index(path: Path, table: str, identity: Identity) -> _FileIndex | None:
    with _indexes_lock:
        key = (str(path), table)
        index = _indexes.get(key)
        if index is None:
            return None
        if index.identity != identity:  # the export was replaced
            del _indexes[key]
            return None
        _indexes.move_to_end(key)
        return index


def _store_index(path: Path, table: str, index: _FileIndex) -> None:
    with _indexes_lock:
        key = (str(path), table)
        _indexes[key] = index
        _indexes.move_to_end(key)
        while len(_indexes) > _INDEX_FILES:
            _indexes.popitem(last=False)


def clear_indexes() -> None:
    """Forget every file index (tests)."""
    with _indexes_lock:
        _indexes.clear()
        _seen.clear()


class _Builder:
    """Collects, while `_rows` streams a file, what its index needs: each well-formed
    row's first and last line, its key fields (hashed once the pass is over) and the
    change time its test parsed anyway. Per row that is three C-level appends."""

    def __init__(self, path: Path, table: str) -> None:
        self.path, self.table = path, table
        self.starts: array[int] = array("q")
        self.ends: array[int] = array("q")
        self.keys: list[str] = []
        self.times: list[datetime] = []
        self.identity: Identity = (0, 0, 0, 0, 0)
        self.began = time.time_ns()
        self.width = 0
        self.positions: dict[str, int] = {}

    def start(self, identity: Identity, width: int, positions: dict[str, int]) -> tuple[
        Callable[[int], None], Callable[[int], None], Callable[[Any], None],
        Callable[[list[str]], Any], TimeSink | None,
    ]:
        """What `_rows` calls per row: line, last line, key fields (`add(pick(fields))`),
        and the test's time sink."""
        self.identity, self.width, self.positions = identity, width, positions
        columns = INDEX_COLUMNS[self.table][0]
        picks = [positions[c] for c in columns]
        add: Callable[[Any], None] = self.keys.extend
        pick: Callable[[list[str]], Any] = cast(Any, itemgetter(slice(0)))  # no keys: []
        if len(picks) == 1:  # itemgetter of one index gives the field itself
            add, pick = self.keys.append, itemgetter(picks[0])
        elif picks:
            pick = itemgetter(*picks)
        has_time = SINCE_COLUMN[self.table] is not None
        return (self.starts.append, self.ends.append, add, pick,
                self.times.append if has_time else None)

    def finish(self) -> None:
        count = len(self.starts)
        changed = max(self.identity[1], self.identity[2])
        if count > _INDEX_MAX_ROWS or changed >= self.began - _RACY_NS:
            return
        fold = INDEX_COLUMNS[self.table][1]
        hashes = array("q", map(hash, map(_fold_key if fold else str.strip, self.keys)))
        self.keys = []
        # The test records a time only when it had one to test (a changed-since read).
        times = self.times if len(self.times) == count and SINCE_COLUMN[self.table] else None
        _store_index(self.path, self.table, _FileIndex(
            self.identity, self.width, self.positions, self.starts, self.ends, self.table,
            hashes, times))


def _fold_key(value: str) -> str:
    return value.strip().lower()


class _CsvDir:
    """Reads one table of an export directory as rows of the contract's columns."""

    label = "export"

    def __init__(self, directory: str | Path, limits: CsvLimits | None = None,
                 zone: tzinfo | None = None) -> None:
        self.dir = Path(directory)
        self.limits = limits or CsvLimits()
        # The zone of times written without an offset (op_timezone); None: such a time
        # is an invalid_record.
        self.zone = zone

    def _path(self, table: str) -> Path:
        return self.dir / csv_name(table)

    def _broken(self, table: str, name: str, tap: _Tap, positions: Mapping[str, int],
                first: int, last: int, reason: str,
                fields: list[str] | None = None) -> InvalidRecord:
        """An unreadable row or range of lines, with the ids each of its lines names."""
        if last > first:
            lines = tap.get(first, last)
            found = [ids for text in lines if (ids := _salvage(table, positions, text))]
            return InvalidRecord(
                name, first,
                f"{reason}; {last - first + 1} lines cannot be read "
                "(a quote left open swallows the rows after it)",
                extra={"last_line": str(last)}, table=table, rows=last - first + 1,
                recovered=tuple(found))
        ids = _salvage(table, positions, ",".join(fields)) if fields else None
        if ids is None and fields is None:
            texts = tap.get(first, first)
            ids = _salvage(table, positions, texts[0]) if texts else None
        patient, contact, user, dependent = ids or (None, None, None, None)
        return InvalidRecord(name, first, reason, patient, contact, user,
                             extra={"dependent_user_id": dependent} if dependent else {},
                             table=table)

    def _swallowed(self, table: str, tap: _Tap, width: int, first: int, last: int) -> bool:
        """Whether a well-formed row over several lines holds whole rows in a field (a
        stray quote matched by one further down), not just an address on two lines."""
        for text in tap.get(first, last)[1:]:
            try:
                fields = next(csv.reader([text]), [])
            except csv.Error:
                continue
            if len(fields) == width:
                return True
        return False

    def _rows(
        self, table: str, test: RowTest | None = None, build: _Builder | None = None
    ) -> Iterator[tuple[int, Row] | InvalidRecord]:
        """(first physical line, row) per data row, or an InvalidRecord for a broken one.

        csv.reader rather than DictReader: DictReader silently skips blank lines, which
        would make a row's first line unknowable, and pads short rows we must reject.
        With `test`, only rows passing it come out, checked on the raw fields before any
        other work; rows too broken to test (no ids to match) are skipped. With `build`
        (and `test`), the file is indexed on the way.
        """
        limits = self.limits
        _raise_field_limit(limits)
        name = csv_name(table)
        path = self._path(table)
        try:
            # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row
            # is reported and skipped instead of aborting the file.
            # Opened apart from the `with` below only to map open errors to SourceError.
            handle = open_regular(path)
        except FileNotFoundError:
            if not self.dir.is_dir():
                raise SourceError(
                    f"{self.label} export directory {self.dir} does not exist"
                ) from None
            raise SourceError(f"{self.label} export directory {self.dir} has no {name}") from None
        except OSError as err:
            raise SourceError(f"cannot open {path}: {err.strerror or err}") from None
        lines = _BoundedLines(handle, limits.max_line_chars)
        tap = _Tap(path, limits.max_line_chars)
        with handle, closing(tap):
            reader = csv.reader(lines)
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
            positions = {c: columns.index(c) for c in wanted}
            if build is not None and test is not None:
                starts, ends, keys, key_fields, times = build.start(
                    _identity(os.fstat(handle.fileno())), width, positions)
            else:
                build, times = None, None
            keep = test(positions, times) if test is not None else None

            if lines.long:
                raise SourceError(f"{path}: header line longer than "
                                  f"{limits.max_line_chars} characters")
            previous = reader.line_num
            long = lines.long
            while True:
                line = previous + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    if build is not None:
                        build.finish()
                    return
                except csv.Error as err:
                    previous = reader.line_num
                    if keep is None:
                        reason = (f"field too large (over {limits.max_field_chars} characters:"
                                  " csv_max_field_chars)" if "field limit" in str(err)
                                  else f"unreadable CSV row ({err})")
                        yield self._broken(table, name, tap, positions, line, previous,
                                           reason)
                    continue
                previous = reader.line_num
                if long and any(n in long for n in range(line, previous + 1)):
                    if keep is None:
                        n = min(n for n in long if line <= n <= previous)
                        ids = _salvage(table, positions, long[n]) or (None,) * 4
                        yield InvalidRecord(
                            name, n, f"line longer than {limits.max_line_chars} characters "
                            "(csv_max_line_chars)", ids[0], ids[1], ids[2],
                            extra={"dependent_user_id": ids[3]} if ids[3] else {},
                            table=table)
                    for n in [n for n in long if n <= previous]:
                        del long[n]
                    continue
                if not fields:  # a blank line
                    continue
                if len(fields) != width:
                    if keep is None:
                        yield self._broken(
                            table, name, tap, positions, line, previous,
                            f"expected {width} fields, found {len(fields)}", fields)
                    continue
                if previous > line and keep is None and self._swallowed(
                        table, tap, width, line, previous):
                    yield self._broken(table, name, tap, positions, line, previous,
                                       "a quoted field holds whole rows")
                    continue
                if build is not None:
                    starts(line)
                    ends(previous)
                    keys(key_fields(fields))
                if keep is not None and not keep(fields):
                    continue
                row = dict(zip(wanted, pick(fields), strict=True))
                problem = _row_problem(fields, self.limits.max_field_chars)
                if problem is not None:
                    yield invalid(table, row, name, line, problem)
                    continue
                yield line, row

    def _read(
        self,
        table: str,
        since: datetime | None = None,
    ) -> Iterator[Any]:
        parse: Callable[..., Any] = PARSERS[table]
        name = csv_name(table)
        since = _utc(since)
        column = SINCE_COLUMN[table]
        for item in self._rows(table):
            if isinstance(item, InvalidRecord):
                yield item
                continue
            record = parse(item[1], name, item[0], zone=self.zone)
            if since is not None and column is not None and not isinstance(record, InvalidRecord):
                changed = getattr(record, column)
                # A record without a time might have changed: reread it (conservative).
                if changed is not None and changed < since:
                    continue
            yield record


    def _parsed(
        self, table: str, test: RowTest, build: _Builder | None = None
    ) -> Iterator[Any]:
        parse: Callable[..., Any] = PARSERS[table]
        name = csv_name(table)
        for item in self._rows(table, test, build):
            yield (item if isinstance(item, InvalidRecord)
                   else parse(item[1], name, item[0], zone=self.zone))

    def _targeted(
        self, table: str, test: RowTest, sets: Mapping[str, frozenset[str]],
        folded: Collection[str], since: datetime | None,
    ) -> Iterator[Any]:
        """The rows passing `test`: from this file's index when it has one, else streamed
        (indexing the file on the way)."""
        if not _INDEXING or any(c not in INDEX_COLUMNS[table][0] for c in sets):
            return self._parsed(table, test)
        path = self._path(table)
        try:
            st = os.stat(path)
        except OSError:
            return self._parsed(table, test)  # reports the problem as ever
        identity = _identity(st)
        index = _cached_index(path, table, identity)
        if index is None:
            if since is None and not _read_before(path, table, identity):
                return self._parsed(table, test)
            return self._parsed(table, test, _Builder(path, table))
        return self._indexed(table, test, index, path, sets, folded, since)

    def _indexed(
        self, table: str, test: RowTest, index: _FileIndex, path: Path,
        sets: Mapping[str, frozenset[str]], folded: Collection[str], since: datetime | None,
    ) -> Iterator[Any]:
        """Seek to each row the index names and parse it as the streamed read would."""
        try:
            handle = open(path, "rb")  # noqa: SIM115
        except OSError:
            yield from self._parsed(table, test)
            return
        with handle:
            if _identity(os.fstat(handle.fileno())) != index.identity:
                yield from self._parsed(table, test)  # replaced since the stat
                return
            found = index.matches(sets, folded, since)
            if found is None or len(found) * _INDEX_DENSE > index.count:
                yield from self._parsed(table, test)
                return
            _raise_field_limit(self.limits)
            offsets = index.line_offsets(handle)
            parse: Callable[..., Any] = PARSERS[table]
            name = csv_name(table)
            wanted = LAYOUT[table]
            pick = itemgetter(*(index.positions[c] for c in wanted))
            keep = test(index.positions, None)
            starts, ends = index.starts, index.ends
            for k in found:
                line, end = starts[k], ends[k]
                handle.seek(offsets[line - 1])
                data = handle.read(offsets[end] - offsets[line - 1])
                reader = csv.reader(
                    [t.decode("utf-8", "surrogateescape") for t in data.splitlines(True)])
                try:
                    fields = next(reader)
                except (StopIteration, csv.Error):
                    fields = []
                if len(fields) != index.width or reader.line_num != end - line + 1:
                    clear_indexes()
                    raise SourceError(f"{path} changed while being read")
                if not keep(fields):
                    continue
                row = dict(zip(wanted, pick(fields), strict=True))
                problem = _row_problem(fields, self.limits.max_field_chars)
                yield (invalid(table, row, name, line, problem) if problem is not None
                       else parse(row, name, line, zone=self.zone))

    def _count_rows(self, table: str) -> int:
        """From the file's index when it has one (an incremental scan's changed-since
        read just built it), else one pass that parses nothing. Counts what an index
        counts: every row with the header's number of fields."""
        path = self._path(table)
        try:
            index = _cached_index(path, table, _identity(os.stat(path)))
        except OSError:
            index = None
        if index is not None:
            return index.count
        return sum(1 for _ in self._rows(table, lambda positions, times: lambda fields: True))

    def _ids(self, table: str) -> Iterator[str]:
        """The id columns of every row, unparsed: one csv pass, no record built."""
        columns = ID_COLUMNS[table]
        for item in self._rows(table):
            if isinstance(item, InvalidRecord):
                continue  # no row, no ids: a broken line is reported by full reads
            values = [(item[1].get(c) or "").strip() for c in columns]
            if all(values):
                yield ID_SEP.join(values)

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

        def test(index: dict[str, int], times: TimeSink | None) -> Callable[[list[str]], bool]:
            at = index[column]

            def changed(fields: list[str]) -> bool:
                try:
                    when = parse_time(fields[at])
                except ValueError:
                    return True
                return when is None or when >= since_utc

            if times is None:
                return changed

            def changed_noted(fields: list[str]) -> bool:
                try:
                    when = parse_time(fields[at])
                except ValueError:
                    when = None
                times(when or _ALWAYS)
                return when is None or when >= since_utc

            return changed_noted

        return self._targeted(table, test, {}, (), since_utc)

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

        def test(index: dict[str, int], times: TimeSink | None) -> Callable[[list[str]], bool]:
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

            if times is None or at_time is None:
                return wanted

            def wanted_noted(fields: list[str]) -> bool:
                for at, values, fold in checks:
                    value = fields[at].strip()
                    if (value.lower() if fold else value) in values:
                        times(_ALWAYS)  # not parsed: any later lookup by time re-reads it
                        return True
                try:
                    when = parse_time(fields[at_time])
                except ValueError:
                    when = None
                times(when or _ALWAYS)
                return when is None or when >= since  # type: ignore[operator]

            return wanted_noted

        return self._targeted(table, test, sets, folded, since if column is not None else None)


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
