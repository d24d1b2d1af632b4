"""CSV adapters: the contract's layout round-trips, and every kind of bad input becomes
an InvalidRecord at the right line (or a one-line SourceError) while other rows load."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.model.records import (
    WELCOME_ACTION,
    AuditEvent,
    Authority,
    CaregiverLink,
    Contact,
    FamilyContact,
    InvalidRecord,
    Patient,
    PortalSource,
    PortalUser,
)
from worker.model.snapshot import Snapshot
from worker.sources.base import OPReader, PortalReader, PortalWriter, ReadOnlyPortal, SourceError
from worker.sources.csv_source import (
    CsvOPSource,
    CsvPortalSource,
    read_contacts_file,
    write_op_csv,
    write_portal_csv,
)
from worker.sources.layout import OP_LAYOUT, PORTAL_LAYOUT
from worker.sources.parsing import (
    PARSERS,
    NoOffset,
    parse_contact,
    parse_family_contact,
    parse_patient,
    parse_portal_audit,
    parse_portal_user,
    parse_time,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
EST = timezone(timedelta(hours=-5))
CEST = timezone(timedelta(hours=2))

# -- a small practice, shared with test_sources_sql.py -------------------------------------


def hidden(n: int) -> str:
    """How a bad value that holds a word is described instead of quoted (a name
    shifted into the column must not be repeated)."""
    return f"[{n} characters not shown: a word here may be a name from another column]"


def sample_practice() -> dict[str, list[Any]]:
    """A few of everything, with None fields, several offsets and awkward text."""
    patients = [
        Patient("P1", "Ada", "Lovelace", date(2015, 3, 4), "", "Active", T0),
        Patient("P2", "Bob", "O'Neil, Jr.", None, "N/A", "Inactive",
                datetime(2024, 5, 2, 8, 30, tzinfo=EST)),
        Patient("P3", "Carla", 'Diaz "CD"', date(1985, 1, 1), "carla@example.com", "Active", None),
    ]
    contacts = [
        Contact("C1", "Carla", "Diaz", "carla@example.com", date(1985, 1, 1), "555-0100",
                "1 Main St\nApt 2", "Springfield", "12345", True, "P3",
                T0 + timedelta(microseconds=123456)),
        Contact("C2", "Élodie", "Ünïcode-Ω", "", None, "", "", "", "", False, None, None),
        Contact("C3", "Dan", "Lovelace", "dan@example.org", None, "+1 555 0101", "2 Elm, Rd",
                "Springfield", "", True, None, datetime(2024, 4, 1, 9, 0, tzinfo=CEST)),
    ]
    family = [
        FamilyContact("P1", "C1", "Mother", Authority.JOINT, T0),
        FamilyContact("P1", "C3", "Father", Authority.NONE, None),
        FamilyContact("P3", "C1", "Self", Authority.EXCLUSIVE, T0 - timedelta(days=30)),
        FamilyContact("P2", "C2", "Other Relative", Authority.EXCLUSIVE, T0),
    ]
    users = [
        PortalUser("U1", None, "C1", "Carla", "Diaz", "carla@example.com", "Caregiver", True, T0),
        PortalUser("U2", "P1", None, "Ada", "Lovelace", "ada@dummy.com", "Patient", True, None),
        PortalUser("U3", "P3", "C1", "Carla", "Diaz", "x@dummy.com", "Patient", False,
                   datetime(2024, 1, 1, tzinfo=EST)),
    ]
    links = [CaregiverLink("U1", "U2", T0), CaregiverLink("U1", "U3", None)]
    sources = [PortalSource("U1", "Connected", T0), PortalSource("U2", "Disconnected", None)]
    audit = [
        AuditEvent(T0, WELCOME_ACTION, "U1", "Carla@Example.com"),
        AuditEvent(T0 + timedelta(days=1, hours=3), WELCOME_ACTION, None, "carla@example.com"),
        AuditEvent(datetime(2024, 5, 3, tzinfo=CEST), "Profile: Password Reset", "U2", ""),
    ]
    return {"patients": patients, "contacts": contacts, "family_contacts": family,
            "users": users, "links": links, "sources": sources, "audit": audit}


def contents(snap: Snapshot) -> dict[str, Any]:
    """What two snapshots must agree on (row order and source positions aside)."""
    return {
        "patients": snap.patients,
        "contacts": snap.contacts,
        "family": sorted(snap.family, key=lambda f: (f.patient_id, f.contact_id, f.role_reason)),
        "users": snap.users,
        "links": snap.links,
        "sources": snap.sources,
        "welcome_sent": snap.welcome_sent,
        "invalid": sorted(
            (r.reason, r.patient_id, r.contact_id, r.portal_user_id) for r in snap.invalid
        ),
    }


def read_all(op: OPReader, portal: PortalReader) -> Snapshot:
    return Snapshot.build(
        op.patients(), op.contacts(), op.family_contacts(),
        portal.users(), portal.links(), portal.sources(), portal.audit(),
    )


def expected_snapshot(practice: dict[str, list[Any]]) -> Snapshot:
    return Snapshot.build(*practice.values())


def write_practice(root: Path, practice: dict[str, list[Any]]) -> tuple[Path, Path]:
    write_op_csv(root / "op", practice["patients"], practice["contacts"],
                 practice["family_contacts"])
    write_portal_csv(root / "portal", practice["users"], practice["links"],
                     practice["sources"], practice["audit"])
    return root / "op", root / "portal"


# -- helpers for hand-made files ------------------------------------------------------------

PATIENT_HEADER = "patient_id,first_name,last_name,dob,email,status,updated_at"
CONTACT_HEADER = ("contact_id,first_name,last_name,email,dob,phone,address,city,postcode,"
                  "active,patient_id,updated_at")
FC_HEADER = "patient_id,contact_id,role_reason,authority,updated_at"


def make_op_dir(tmp_path: Path, **files: bytes | str) -> CsvOPSource:
    """An OP directory: the given file contents, header-only files for the others."""
    headers = {"patients": PATIENT_HEADER, "contacts": CONTACT_HEADER, "family_contacts": FC_HEADER}
    d = tmp_path / "op"
    d.mkdir(exist_ok=True)
    for table, header in headers.items():
        content = files.get(table, header + "\n")
        data = content.encode("utf-8") if isinstance(content, str) else content
        (d / f"{table}.csv").write_bytes(data)
    return CsvOPSource(d)


def split(records: Iterable[object]) -> tuple[list[Any], list[InvalidRecord]]:
    good: list[Any] = []
    bad: list[InvalidRecord] = []
    for r in records:
        (bad if isinstance(r, InvalidRecord) else good).append(r)
    return good, bad


# -- round trip -----------------------------------------------------------------------------


def test_round_trip_gives_the_same_snapshot(tmp_path: Path) -> None:
    practice = sample_practice()
    op_dir, portal_dir = write_practice(tmp_path, practice)
    snap = read_all(CsvOPSource(op_dir), CsvPortalSource(portal_dir))
    assert contents(snap) == contents(expected_snapshot(practice))
    assert snap.invalid == []
    # Offsets survive the file, not just the instant.
    assert snap.patients["P2"].updated_at.utcoffset() == timedelta(hours=-5)
    assert snap.contacts["C1"].address == "1 Main St\nApt 2"
    assert snap.welcome_sent == {"carla@example.com": T0 + timedelta(days=1, hours=3)}


def test_writer_follows_the_contract_text_form(tmp_path: Path) -> None:
    practice = sample_practice()
    op_dir, portal_dir = write_practice(tmp_path, practice)
    lines = (op_dir / "patients.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == PATIENT_HEADER
    assert lines[1] == "P1,Ada,Lovelace,2015-03-04,,Active,2024-05-01T12:00:00+00:00"
    assert lines[2] == 'P2,Bob,"O\'Neil, Jr.",,N/A,Inactive,2024-05-02T08:30:00-05:00'
    contacts = (op_dir / "contacts.csv").read_text(encoding="utf-8").splitlines()
    assert contacts[3] == "C2,Élodie,Ünïcode-Ω,,,,,,,false,,"
    fcs = (op_dir / "family_contacts.csv").read_text(encoding="utf-8").splitlines()
    assert fcs[2] == "P1,C3,Father,None,"
    users = (portal_dir / "portal_users.csv").read_text(encoding="utf-8").splitlines()
    assert users[0] == ",".join(PORTAL_LAYOUT["portal_users"])
    assert users[1] == (
        "U1,,C1,Carla,Diaz,carla@example.com,Caregiver,true,2024-05-01T12:00:00+00:00"
    )


def test_writer_accepts_raw_rows_and_rejects_foreign_records(tmp_path: Path) -> None:
    write_op_csv(tmp_path, [{"patient_id": "P9", "dob": "2019-02-30", "status": "Active"}], [], [])
    (bad,) = CsvOPSource(tmp_path).patients()
    assert isinstance(bad, InvalidRecord) and bad.patient_id == "P9" and bad.line == 2
    with pytest.raises(TypeError, match="does not belong"):
        write_op_csv(tmp_path, sample_practice()["contacts"], [], [])


def test_adapters_implement_the_interfaces(tmp_path: Path) -> None:
    op_dir, portal_dir = write_practice(tmp_path, sample_practice())
    portal = CsvPortalSource(portal_dir)
    assert isinstance(CsvOPSource(op_dir), OPReader)
    assert isinstance(portal, PortalReader) and isinstance(portal, PortalWriter)
    assert portal.writable is False
    assert portal.get_user("U2") == sample_practice()["users"][1]
    assert portal.get_user("nope") is None
    with pytest.raises(ReadOnlyPortal):
        portal.set_user_email("U2", "u2@dummy.com", "k1")
    with pytest.raises(ReadOnlyPortal):
        portal.refresh_source("U1", "k2")
    with pytest.raises(ReadOnlyPortal):
        portal.resend_welcome("C1", "carla@example.com", "k3")


# -- whole-file problems: SourceError, one line ---------------------------------------------


def test_missing_file_names_the_directory_and_file(tmp_path: Path) -> None:
    source = make_op_dir(tmp_path)
    (tmp_path / "op" / "patients.csv").unlink()
    with pytest.raises(SourceError) as err:
        list(source.patients())
    assert str(err.value) == f"OP export directory {tmp_path / 'op'} has no patients.csv"
    with pytest.raises(SourceError, match=r"^portal export directory .*nowhere does not exist$"):
        list(CsvPortalSource(tmp_path / "nowhere").audit())


def test_missing_required_columns(tmp_path: Path) -> None:
    source = make_op_dir(
        tmp_path, patients="patient_id,first_name,last_name,dob,email\nP1,a,b,,,\n"
    )
    with pytest.raises(SourceError) as err:
        list(source.patients())
    message = str(err.value)
    assert "patients.csv" in message and "status, updated_at" in message
    assert "\n" not in message


def test_extra_columns_are_ignored_wherever_they_are(tmp_path: Path) -> None:
    source = make_op_dir(
        tmp_path,
        patients="notes,patient_id,first_name,last_name,dob,email,status,updated_at,x\n"
        "hello,P1,Ada,L,2015-03-04,,active,,1\n",
    )
    (p,) = source.patients()
    assert p == Patient("P1", "Ada", "L", date(2015, 3, 4), "", "Active", None)


def test_empty_file_is_a_source_error(tmp_path: Path) -> None:
    source = make_op_dir(tmp_path, contacts=b"")
    with pytest.raises(SourceError, match=r"contacts.csv is empty \(no header row\)$"):
        list(source.contacts())


def test_header_only_file_has_no_rows(tmp_path: Path) -> None:
    assert list(make_op_dir(tmp_path).family_contacts()) == []


# -- row problems: InvalidRecord at the right line, the rest still loads --------------------


def test_bom_and_crlf(tmp_path: Path) -> None:
    data = ("\ufeff" + PATIENT_HEADER + "\r\nP1,Ada,L,2015-03-04,,Active,\r\n"
            "P2,Bo,M,2019-02-30,,Active,\r\nP3,Cy,N,,,Inactive,2024-01-01T00:00:00Z\r\n")
    records = list(make_op_dir(tmp_path, patients=data.encode("utf-8")).patients())
    good, bad = split(records)
    assert [p.patient_id for p in good] == ["P1", "P3"]
    assert good[1].updated_at == datetime(2024, 1, 1, tzinfo=UTC)
    assert [(b.line, b.patient_id, b.reason) for b in bad] == [
        (3, "P2", "bad dob (not a valid YYYY-MM-DD date)")
    ]


def test_quoted_newline_keeps_line_numbers_physical(tmp_path: Path) -> None:
    data = (
        CONTACT_HEADER + "\r\n"
        'C1,Ann,Lee,ann@example.com,,555,"12 High St\r\nFlat 3",Town,1,true,,\r\n'
        "C2,Bob,Lee,,,,,,,maybe,,\r\n"
        "\r\n"
        "C3,Cy,Lee,,,,,,,no,,\r\n"
        ",Dee,Lee,,,,,,,yes,,\r\n"
    )
    records = list(make_op_dir(tmp_path, contacts=data).contacts())
    good, bad = split(records)
    assert [c.contact_id for c in good] == ["C1", "C3"]
    assert good[0].address == "12 High St\r\nFlat 3"
    assert [(b.line, b.contact_id, b.reason) for b in bad] == [
        (4, "C2", f"bad active {hidden(5)}"),
        (7, None, "missing contact_id"),
    ]
    assert all(b.source == "contacts.csv" for b in bad)


def test_invalid_utf8_row_is_reported_and_reading_goes_on(tmp_path: Path) -> None:
    data = (PATIENT_HEADER + "\n").encode() + b"P1,Ada,L\xff\xfe,,,Active,\n" + (
        "P2,Zoë,M,,,Active,\n".encode()
    )
    good, bad = split(make_op_dir(tmp_path, patients=data).patients())
    assert [p.patient_id for p in good] == ["P2"]
    assert good[0].first_name == "Zoë"
    assert [(b.line, b.patient_id, b.reason) for b in bad] == [(2, "P1", "not valid UTF-8")]


def test_wrong_number_of_fields(tmp_path: Path) -> None:
    data = PATIENT_HEADER + "\nP1,Ada,L\nP2,Bo,M,,,Active,,extra\nP3,Cy,N,,,Active,\n"
    good, bad = split(make_op_dir(tmp_path, patients=data).patients())
    assert [p.patient_id for p in good] == ["P3"]
    assert [(b.line, b.reason) for b in bad] == [
        (2, "expected 7 fields, found 3"),
        (3, "expected 7 fields, found 8"),
    ]


def test_huge_field_is_invalid_and_big_field_is_fine(tmp_path: Path) -> None:
    big = "x" * 200_000  # over csv's default 128 KiB limit, under ours
    huge = "y" * (2 * 1024 * 1024)
    data = (
        CONTACT_HEADER + "\n"
        f'C1,Ann,Lee,,,,"{big}",,,true,,\n'
        f'C2,Bob,Lee,,,,"{huge}",,,true,,\n'
        "C3,Cy,Lee,,,,,,,false,,\n"
    )
    good, bad = split(make_op_dir(tmp_path, contacts=data).contacts())
    assert [c.contact_id for c in good] == ["C1", "C3"]
    assert len(good[0].address) == 200_000
    assert [(b.line, b.contact_id, b.reason) for b in bad] == [
        (3, "C2", "field too large (over 1048576 characters: csv_max_field_chars)")
    ]


def test_bad_values_name_the_field_and_ids(tmp_path: Path) -> None:
    data = (
        FC_HEADER + "\n"
        "P1,C1,Mother,Shared,\n"
        "P1,C2,Father,joint,yesterday\n"
        ",C3,Guardian,EXCLUSIVE,\n"
        "P2,C4,Mother,,2024-05-01T10:00:00+02:00\n"
    )
    good, bad = split(make_op_dir(tmp_path, family_contacts=data).family_contacts())
    assert good == [FamilyContact("P2", "C4", "Mother", Authority.NONE,
                                  datetime(2024, 5, 1, 8, 0, tzinfo=UTC))]
    assert [(b.line, b.patient_id, b.contact_id, b.reason) for b in bad] == [
        (2, "P1", "C1", f"unknown authority {hidden(6)}"),
        (3, "P1", "C2", f"bad updated_at {hidden(9)}"),
        (4, None, "C3", "missing patient_id"),
    ]


def test_bad_patient_lists_every_problem_without_phi(tmp_path: Path) -> None:
    data = PATIENT_HEADER + "\n  ,Ada,Secretname,2019-02-30,ada@example.com,Pending,\n"
    (bad,) = make_op_dir(tmp_path, patients=data).patients()
    assert isinstance(bad, InvalidRecord)
    assert bad.line == 2
    assert bad.reason == (
        "missing patient_id; bad dob (not a valid YYYY-MM-DD date); "
        f"bad status {hidden(7)} (Active or Inactive)"
    )
    for phi in ("Ada", "Secretname", "2019-02-30", "ada@example.com"):
        assert phi not in bad.reason


def test_duplicate_ids_first_wins(tmp_path: Path) -> None:
    data = PATIENT_HEADER + "\nP1,Ada,L,,,Active,\nP2,Bo,M,,,Active,\nP1,Other,X,,,Inactive,\n"
    snap = Snapshot.build(make_op_dir(tmp_path, patients=data).patients())
    assert snap.patients["P1"].first_name == "Ada"
    assert [(r.source, r.patient_id, r.reason) for r in snap.invalid] == [
        ("patients", "P1", "duplicate id P1: the first row was kept")
    ]
    assert set(snap.patients) == {"P1", "P2"}


# -- since ----------------------------------------------------------------------------------


def test_since_filters_csv(tmp_path: Path) -> None:
    op_dir, portal_dir = write_practice(tmp_path, sample_practice())
    op, portal = CsvOPSource(op_dir), CsvPortalSource(portal_dir)
    since = T0
    # P1 at T0 (inclusive), P2 later, P3 has no time (kept: it may have changed).
    assert sorted(p.patient_id for p in op.patients(since)) == ["P1", "P2", "P3"]
    assert sorted(p.patient_id for p in op.patients(T0 + timedelta(hours=1))) == ["P2", "P3"]
    assert [c.contact_id for c in op.contacts(since)] == ["C1", "C2"]  # C3 is in April
    assert sorted((f.patient_id, f.contact_id) for f in op.family_contacts(since)) == [
        ("P1", "C1"), ("P1", "C3"), ("P2", "C2")
    ]
    assert [u.user_id for u in portal.users(since)] == ["U1", "U2"]
    assert [a.at for a in portal.audit(T0 + timedelta(hours=1))] == [
        T0 + timedelta(days=1, hours=3), datetime(2024, 5, 3, tzinfo=CEST)
    ]
    # A naive `since` is UTC, like naive times in files.
    assert [u.user_id for u in portal.users(datetime(2024, 5, 1, 12, 0))] == ["U1", "U2"]


# -- parsing rules ---------------------------------------------------------------------------


def test_parse_rules() -> None:
    with pytest.raises(NoOffset):  # no offset and no declared zone: not a time
        parse_time("2024-05-01T12:00:00")
    assert parse_time("2024-05-01T08:00:00", ZoneInfo("America/New_York")) == T0
    assert parse_time("2024-05-01 14:00:00+02:00") == T0
    assert parse_time("  ") is None
    with pytest.raises(ValueError):
        parse_time("2024-13-01T00:00:00")
    row = {"contact_id": " C1 ", "active": "YES", "patient_id": "  ", "dob": ""}
    c = parse_contact(row, "contacts.csv", 2)
    assert isinstance(c, Contact)
    assert (c.contact_id, c.active, c.patient_id, c.dob, c.email) == ("C1", True, None, None, "")
    assert isinstance(parse_contact({"contact_id": "C1", "active": "0"}, "x", 2), Contact)
    bad = parse_contact({"contact_id": "C1"}, "x", 2)
    assert isinstance(bad, InvalidRecord) and bad.reason == "missing active"
    assert parse_patient({"patient_id": "P", "status": " inactive "}, "x", 1).status == "Inactive"
    fc = parse_family_contact({"patient_id": "P", "contact_id": "C", "authority": "eXcLuSiVe"},
                              "x", 1)
    assert fc.authority is Authority.EXCLUSIVE
    none = parse_family_contact({"patient_id": "P", "contact_id": "C", "authority": "none"}, "x", 1)
    assert none.authority is Authority.NONE
    user = parse_portal_user({"user_id": "U", "active": "False", "op_contact_id": ""}, "x", 1)
    assert isinstance(user, PortalUser) and user.active is False and user.op_contact_id is None
    audit = parse_portal_audit({"at": "", "user_id": "U9", "action": "x"}, "portal_audit.csv", 5)
    assert isinstance(audit, InvalidRecord)
    assert (audit.reason, audit.portal_user_id, audit.line) == ("missing at", "U9", 5)
    bad_dob = parse_patient({"patient_id": "P", "status": "Active", "dob": "20190101"}, "x", 1)
    assert isinstance(bad_dob, InvalidRecord)  # only YYYY-MM-DD, not every ISO form


_COLUMNS = sorted({c for cols in (*OP_LAYOUT.values(), *PORTAL_LAYOUT.values()) for c in cols})
_VALUES = st.one_of(
    st.none(),
    st.text(),
    st.sampled_from(["", " ", "2019-02-30", "2020-01-01", "true", "No", "Joint", "Shared",
                     "Active", "2024-01-01T00:00:00+05:00", "0001-01-01T00:00:00+14:00",
                     "9999-12-31T23:59:59-14:00", "\udcff", "N/A"]),
)


@settings(max_examples=300, deadline=None)
@given(
    table=st.sampled_from(sorted(PARSERS)),
    row=st.dictionaries(st.sampled_from(_COLUMNS), _VALUES),
    line=st.integers(min_value=1, max_value=10**9),
)
def test_parsers_never_raise(table: str, row: dict[str, str | None], line: int) -> None:
    record = PARSERS[table](row, "f.csv", line)
    if isinstance(record, InvalidRecord):
        assert record.reason and record.line == line and record.source == "f.csv"
    else:
        assert type(record).__name__ in {"Patient", "Contact", "FamilyContact", "PortalUser",
                                         "CaregiverLink", "PortalSource", "AuditEvent"}


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=400) | st.text(alphabet=',"\r\n\ufeffPC1x\x00é', max_size=200)
       .map(lambda t: t.encode("utf-8")))
def test_any_file_body_reads_without_crashing(body: bytes) -> None:
    """Whatever follows a good header, reading ends normally: records or InvalidRecords."""
    with tempfile.TemporaryDirectory() as tmp:
        source = make_op_dir(Path(tmp), contacts=(CONTACT_HEADER + "\n").encode() + body)
        for record in source.contacts():
            assert isinstance(record, Contact | InvalidRecord)
            if isinstance(record, InvalidRecord):
                assert record.line is not None and record.line >= 2


def test_a_contact_with_an_unreadable_dob_is_kept_without_it(tmp_path: Path) -> None:
    """Issue 15: the bad field is missing, not the record; the row still raises its
    invalid_record (same file and line) through the snapshot."""
    path = tmp_path / "contacts.csv"
    path.write_text(
        "contact_id,first_name,last_name,email,dob,phone,address,city,postcode,active,"
        "patient_id,updated_at\n"
        "C1,Ines,Mora,im@example.org,1990-13-05,5553331212,,,,true,,\n"
        "C2,Ana,Ruiz,ar@example.org,1990-13-05,5553331213,,,,maybe,,\n",
        encoding="utf-8",
    )
    records = list(read_contacts_file(path))
    kept, rejected = records
    assert isinstance(kept, Contact) and kept.dob is None and kept.dob_text == "1990-13-05"
    assert isinstance(rejected, InvalidRecord)  # a second problem: the row is unreadable
    snap = Snapshot.build(records)
    assert set(snap.contacts) == {"C1"}
    assert [(r.line, r.contact_id) for r in snap.invalid] == [(2, "C1"), (3, "C2")]
    assert "bad dob" in snap.invalid[0].reason


def test_a_name_shifted_into_a_coded_column_is_described_not_quoted(tmp_path: Path) -> None:
    """An export with a column missing puts last names where the authority and status
    belong: the unreadable rows say which column is bad and how long the value is, never
    the name (it would reach digests and logs, which hide names); a mistyped code
    ("Jiont") is still quoted, since staff fix it by reading it."""
    fcs = FC_HEADER + "\nP1,C1,Mother,Okonkwo,\nP1,C2,Father,Jiont,\n"
    patients = PATIENT_HEADER + "\nP2,Ada,Lee,2019-02-03,,Okonkwo,\n"
    op = make_op_dir(tmp_path, family_contacts=fcs, patients=patients)
    _, bad = split(op.family_contacts())
    (patient,) = op.patients()
    reasons = [b.reason for b in bad] + [patient.reason]  # type: ignore[union-attr]
    assert reasons == [f"unknown authority {hidden(7)}", "unknown authority 'Jiont'",
                       f"bad status {hidden(7)} (Active or Inactive)"]
    assert not any("Okonkwo" in r for r in reasons)
