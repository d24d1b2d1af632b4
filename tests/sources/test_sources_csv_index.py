"""CSV exports: targeted reads through the per-process file index (csv_source.py) give
byte for byte the records, in the order, of a streamed read, on a generated practice whose
files are mangled every way an export can be (BOM, CRLF, lone CR, quoted newlines, blank
lines, bad UTF-8, NUL, wrong field counts, padded ids, bad times); and an export replaced
under the same name is read afresh."""

from __future__ import annotations

import csv
import io
import os
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from worker.devtools.generator import generate_practice
from worker.sources import csv_source
from worker.sources.csv_source import CsvOPSource, CsvPortalSource, clear_indexes
from worker.sources.parsing import SINCE_COLUMN, parse_time

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ID_COLUMNS = {
    "patients": ["patient_id"],
    "contacts": ["contact_id", "patient_id", "email"],
    "family_contacts": ["patient_id", "contact_id"],
    "portal_users": ["user_id", "op_patient_id", "op_contact_id"],
    "portal_links": ["caregiver_user_id", "dependent_user_id"],
    "portal_sources": ["user_id"],
    "portal_audit": [],
}


@pytest.fixture(autouse=True)
def _fresh_indexes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The files here are written just before they are read: keep their indexes anyway
    # (each rewrite below changes the size or sets a new mtime).
    monkeypatch.setattr(csv_source, "_RACY_NS", -10**15)
    clear_indexes()
    yield
    clear_indexes()


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("practice")
    generate_practice(out, 250, seed=11, now=NOW)
    return out


def _mangle(path: Path, rng: random.Random, style: str) -> None:
    """Rewrite a generated export with every kind of trouble, keeping most rows good."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    ends = {"lf": ["\n"], "crlf": ["\r\n"], "mixed": ["\n", "\r\n", "\r"]}[style]
    out = io.BytesIO()
    if style != "lf":
        out.write("\ufeff".encode())
    out.write((",".join(header) + rng.choice(ends)).encode())

    def text(fields: list[str]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow(fields)
        return buffer.getvalue()

    for fields in body:
        fields = list(fields)
        roll = rng.random()
        end = rng.choice(ends)
        if roll < 0.05:  # padded ids
            at = rng.randrange(len(fields))
            fields[at] = f"  {fields[at]} "
        elif roll < 0.08:  # a quoted newline inside the last text-like field
            fields[-1 if len(fields) < 3 else 1] += rng.choice(["\n", "\r\n", "\r"]) + "more"
        elif roll < 0.10:  # upper-case (emails fold)
            fields = [f.upper() for f in fields]
        elif roll < 0.12 and (column := SINCE_COLUMN[path.stem]) is not None:
            fields[header.index(column)] = rng.choice(["", "yesterday", "2026-13-01", " "])
        elif roll < 0.14:  # a field too many or too few
            fields = fields[:-1] if rng.random() < 0.5 else [*fields, "x"]
        line = text(fields).encode()
        if rng.random() < 0.02:
            line = line[:3] + b"\xff\xfe" + line[3:]  # not UTF-8
        elif rng.random() < 0.01:
            line = line[:2] + b"\x00" + line[2:]  # csv.Error: line contains NUL
        out.write(line + end.encode())
        if rng.random() < 0.03:
            out.write(rng.choice(ends).encode())  # a blank line
    path.write_bytes(out.getvalue())


def _values(path: Path, column: str) -> list[str]:
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lstrip("\ufeff").lower() for h in next(reader)]
        at = header.index(column)
        return [r[at] for r in reader if len(r) == len(header)]


def _queries(path: Path, table: str, rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    """(method, kwargs) of the adapter: ids present (as written, trimmed or not),
    absent, blank; and times around the file's own."""
    out: list[tuple[str, dict[str, Any]]] = []
    pools = {c: _values(path, c) for c in ID_COLUMNS[table]}

    def pick(column: str, n: int) -> set[str]:
        got = {v.strip() for v in rng.sample(pools[column], min(n, len(pools[column])))}
        if column == "email":
            got = {v.lower() for v in got}
        return got | {"nope", "", "  " + rng.choice(pools[column])}

    times: list[datetime] = []
    if (column := SINCE_COLUMN[table]) is not None:
        for value in _values(path, column):
            try:
                when = parse_time(value)
            except ValueError:
                continue
            if when is not None:
                times.append(when)
        times.sort()
    for _ in range(4):
        n = rng.choice([1, 5, 40])
        since = times[int(len(times) * rng.choice([0.5, 0.9, 0.99]))] if times else None
        if times:
            out.append(("read_changed", {"table": table, "since": since}))
        match table:
            case "patients":
                out.append(("select_patients", {"ids": pick("patient_id", n)}))
            case "contacts":
                out.append(("select_contacts", {
                    "ids": pick("contact_id", n), "patient_ids": pick("patient_id", n),
                    "emails": pick("email", n)}))
                out.append(("select_contacts", {"emails": pick("email", n)}))
            case "family_contacts":
                out.append(("select_family_contacts", {
                    "patient_ids": pick("patient_id", n), "contact_ids": set()}))
                out.append(("select_family_contacts", {
                    "patient_ids": pick("patient_id", n), "contact_ids": pick("contact_id", n)}))
            case "portal_users":
                out.append(("select_users", {"ids": pick("user_id", n)}))
                out.append(("select_users", {
                    "patient_ids": pick("op_patient_id", n),
                    "contact_ids": pick("op_contact_id", n), "changed_since": since}))
                out.append(("select_users", {
                    "ids": pick("user_id", n), "patient_ids": pick("op_patient_id", n),
                    "contact_ids": pick("op_contact_id", n)}))
            case "portal_links":
                out.append(("select_links", {"user_ids": pick("caregiver_user_id", n)
                                             | pick("dependent_user_id", n)}))
            case "portal_sources":
                out.append(("select_sources", {"user_ids": pick("user_id", n)}))
    return out


def _run(source: Any, method: str, kwargs: dict[str, Any]) -> list[str]:
    # repr: every field of every record, InvalidRecord lines and reasons included.
    return [repr(r) for r in getattr(source, method)(**kwargs)]


def _streamed(monkeypatch: pytest.MonkeyPatch, call: Callable[[], list[str]]) -> list[str]:
    with monkeypatch.context() as m:
        m.setattr(csv_source, "_INDEXING", False)
        return call()


@pytest.mark.parametrize("style", ["lf", "crlf", "mixed"])
@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_indexed_reads_equal_streamed_ones(
    generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, style: str, chunk: int
) -> None:
    monkeypatch.setattr(csv_source, "_CHUNK", chunk)
    rng = random.Random(f"{style}{chunk}")
    sources = {"op": CsvOPSource(tmp_path / "op"), "portal": CsvPortalSource(tmp_path / "portal")}
    indexed_reads = 0
    real = csv_source._CsvDir._indexed

    def counting(*args: Any, **kwargs: Any) -> Iterator[Any]:
        nonlocal indexed_reads
        indexed_reads += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(csv_source._CsvDir, "_indexed", counting)
    for side in ("op", "portal"):
        (tmp_path / side).mkdir()
        for path in (generated / side).glob("*.csv"):
            target = tmp_path / side / path.name
            target.write_bytes(path.read_bytes())
            _mangle(target, rng, style)
    for table in ID_COLUMNS:
        side = "op" if table in ("patients", "contacts", "family_contacts") else "portal"
        path = tmp_path / side / f"{table}.csv"
        source = sources[side]
        for method, kwargs in _queries(path, table, rng):
            want = _streamed(monkeypatch, lambda: _run(source, method, kwargs))  # noqa: B023
            for _ in range(3):  # indexes (now or at the second read), then from the index
                assert _run(source, method, kwargs) == want, (table, method, kwargs)
        assert (str(path), table) in csv_source._indexes, table
    assert indexed_reads > 40


def test_line_offsets_split_as_the_text_reader_does(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    rng = random.Random(5)
    for size in (1, 2, 3, 7, 64, 1 << 20):
        monkeypatch.setattr(csv_source, "_CHUNK", size)
        for _ in range(30):
            # Some longer than the text reader's 8 KiB chunks, so a \r\n straddles one.
            length = rng.choice([rng.randrange(0, 60), rng.randrange(8180, 8200), 20_000])
            data = bytes(rng.choice(b"ab\r\n\xff") for _ in range(length))
            path = tmp_path / "f.csv"
            path.write_bytes(data)
            with path.open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
                lengths = [len(t.encode("utf-8", "surrogateescape")) for t in handle]
            want = [0]
            for n in lengths:
                want.append(want[-1] + n)
            with path.open("rb") as handle:
                assert list(csv_source._line_offsets(handle)) == want, data


USER_HEADER = ("user_id,op_patient_id,op_contact_id,first_name,last_name,email,role,active,"
               "updated_at\n")


def _users(*rows: str) -> str:
    return USER_HEADER + "".join(r + "\n" for r in rows)


def test_a_replaced_export_is_read_afresh(tmp_path: Path) -> None:
    portal = tmp_path / "portal"
    portal.mkdir()
    path = portal / "portal_users.csv"
    since = datetime(2026, 1, 1, tzinfo=UTC)
    old = "2025-01-01T00:00:00+00:00"
    path.write_text(_users(f"U1,P1,,Ann,Lee,a@example.com,Patient,true,{old}",
                           f"U2,,C2,Bob,Lee,b@example.com,Caregiver,true,{old}"))
    source = CsvPortalSource(portal)

    def ids(**kwargs: Any) -> list[str]:
        return [u.user_id for u in source.select_users(**kwargs)]

    assert ids(patient_ids={"P1"}, changed_since=since) == ["U1"]
    assert ids(contact_ids={"C2"}) == ["U2"]
    assert (str(path), "portal_users") in csv_source._indexes
    # Same size, in place (same inode): U2 now points at C3; a new mtime says so.
    path.write_text(_users(f"U1,P1,,Ann,Lee,a@example.com,Patient,true,{old}",
                           f"U2,,C3,Bob,Lee,b@example.com,Caregiver,true,{old}"))
    stamp = path.stat().st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(stamp, stamp))
    assert ids(contact_ids={"C2"}) == []
    assert ids(contact_ids={"C3"}) == ["U2"]
    # Longer, and changed since: found by time through the new index.
    path.write_text(_users(f"U1,P1,,Ann,Lee,a@example.com,Patient,true,{old}",
                           f"U2,,C3,Bob,Lee,b@example.com,Caregiver,true,{old}",
                           "U3,,C4,Cy,Lee,c@example.com,Caregiver,true,2026-02-01T00:00:00Z"))
    assert ids(patient_ids={"P9"}, changed_since=since) == ["U3"]
    assert ids(patient_ids={"P9"}, changed_since=since) == ["U3"]
    # Replaced by a rename (another inode), even with the old size and times.
    other = portal / "next.csv"
    other.write_text(_users(f"U1,P1,,Ann,Lee,a@example.com,Patient,true,{old}",
                            f"U2,,C3,Bob,Lee,b@example.com,Caregiver,true,{old}",
                            "U4,,C4,Cy,Lee,c@example.com,Caregiver,true,2026-02-01T00:00:00Z"))
    st = path.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    other.replace(path)
    assert ids(patient_ids={"P9"}, changed_since=since) == ["U4"]
    assert ids(ids={"U3"}) == []


def test_a_fresh_export_is_not_indexed_and_few_files_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    portal = tmp_path / "p0"
    portal.mkdir()
    (portal / "portal_users.csv").write_text(_users(
        "U1,P1,,Ann,Lee,a@example.com,Patient,true,2025-01-01T00:00:00Z"))
    with monkeypatch.context() as m:
        m.setattr(csv_source, "_RACY_NS", 2_000_000_000)
        list(CsvPortalSource(portal).select_users(ids={"U1"}, changed_since=since))
        assert not csv_source._indexes  # just written: could change unseen
    for n in range(csv_source._INDEX_FILES + 3):
        portal = tmp_path / f"p{n}"
        portal.mkdir(exist_ok=True)
        (portal / "portal_users.csv").write_text(_users(
            f"U1,P{n},,Ann,Lee,a@example.com,Patient,true,2025-01-01T00:00:00Z"))
        got = [u.op_patient_id for u in CsvPortalSource(portal).select_users(
            ids={"U1"}, changed_since=since)]
        assert got == [f"P{n}"]
    assert len(csv_source._indexes) == csv_source._INDEX_FILES
    assert (str(tmp_path / "p0" / "portal_users.csv"), "portal_users") not in csv_source._indexes


def test_reads_by_ids_alone_index_a_file_the_second_time(tmp_path: Path) -> None:
    portal = tmp_path / "portal"
    portal.mkdir()
    (portal / "portal_sources.csv").write_text(
        "user_id,status,last_sync_at\nU1,Connected,\n U2 ,Connected,\n")
    source = CsvPortalSource(portal)
    key = (str(portal / "portal_sources.csv"), "portal_sources")
    assert [s.user_id for s in source.select_sources({"U2"})] == ["U2"]
    assert key not in csv_source._indexes
    assert [s.user_id for s in source.select_sources({"U2"})] == ["U2"]
    assert key in csv_source._indexes
    assert [s.user_id for s in source.select_sources({"U2", "U1"})] == ["U1", "U2"]


def test_a_dense_select_streams_and_agrees(tmp_path: Path) -> None:
    portal = tmp_path / "portal"
    portal.mkdir()
    rows = [f"U{n},,C{n},A,B,x{n}@example.com,Caregiver,true,2025-01-01T00:00:00Z"
            for n in range(40)]
    (portal / "portal_users.csv").write_text(_users(*rows))
    source = CsvPortalSource(portal)
    everyone = {f"U{n}" for n in range(40)}
    first = [u.user_id for u in source.select_users(ids=everyone, changed_since=NOW)]
    assert first == [u.user_id for u in source.select_users(ids=everyone)]
    assert len(first) == 40
    assert [u.user_id for u in source.select_users(
        changed_since=NOW - timedelta(days=10**4))] == first
