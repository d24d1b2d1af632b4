"""Text row -> record, one function per layout, shared by every adapter.

The CSV and SQL adapters both hand rows over in the CSV representation (strings, `None`
for a missing value), so a date, boolean or authority means the same thing whichever
source it came from. A row that breaks a rule becomes an `InvalidRecord` naming every
problem at once; nothing here raises on bad data, because bad input is a finding, never
a crashed run.

Reasons never carry names, emails, phones or dates of birth: they reach logs and
digests. Only the offending value of a non-PHI field (a time, boolean, authority or
status) is quoted, so staff can see what is wrong.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, tzinfo
from typing import Any

from worker.model.records import (
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
from worker.model.text import (
    MAX_ID,
    REDACTED,
    has_control,
    id_problem,
    scrub_text,
    strip_controls,
)

Row = Mapping[str, str | None]

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_AUTHORITY = {a.value.lower(): a for a in Authority}
_STATUS = {"active": "Active", "inactive": "Inactive"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_SHOWN = 40


class _Problems:
    """Collects every rule a row breaks, so one finding lists all of them."""

    __slots__ = ("reasons",)

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def add(self, reason: str) -> None:
        self.reasons.append(reason)


_WORD = re.compile(r"[^\W\d_]{3,}")


def _shown(value: str, allowed: Iterable[str] = ()) -> str:
    """Quote a non-PHI value for a reason, shortened and safe to print.

    The field is not PHI, but its value may be: a bad value is often another column's
    (an export with columns swapped or shifted puts an email in `status`, a birth date
    in `updated_at`, a last name in `authority`). Emails, phone numbers and dates are
    masked as in the logs; a name has no pattern to mask, so a value holding a word is
    quoted only when it is a near miss of one of the column's own values (`Joint`
    typed `Jiont`), and otherwise described, not quoted."""
    value = strip_controls(scrub_text(_SURROGATE.sub("\ufffd", value)))
    if _WORD.search(value.replace(REDACTED, "")) and not _near(value, allowed):
        return f"[{len(value)} characters not shown: a word here may be a name from another column]"
    if len(value) > _MAX_SHOWN:
        value = value[:_MAX_SHOWN] + "..."
    return f"'{value}'"


def _near(value: str, allowed: Iterable[str]) -> bool:
    """A typo of one of a column's values: two edits at most, on a word of 4 or more."""
    from rapidfuzz.distance import OSA

    lowered = value.lower()
    return any(len(a) >= 4 and OSA.distance(lowered, a.lower(), score_cutoff=2) <= 2
               for a in allowed)


def _text(row: Row, key: str) -> str:
    value = row.get(key)
    return "" if value is None else value


def _interned(row: Row, key: str) -> str:
    """Low-cardinality text (roles, cities, actions): one copy for a million rows."""
    value = row.get(key)
    return "" if not value else sys.intern(value)


def _optional_id(row: Row, key: str, problems: _Problems | None = None) -> str | None:
    """An id, validated here at the source boundary (worker.model.text.id_problem): ids
    become URL path segments, mail subjects and 64-character state columns."""
    value = row.get(key)
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    why = id_problem(value)
    if why is not None:
        if problems is not None:
            problems.add(f"bad {key} ({why})")
        return None
    return value


def _required_id(row: Row, key: str, problems: _Problems) -> str:
    before = len(problems.reasons)
    value = _optional_id(row, key, problems)
    if value is None:
        if len(problems.reasons) == before:
            problems.add(f"missing {key}")
        return ""
    return value


def _controls(row: Row, problems: _Problems) -> None:
    """Control characters (a NUL, an escape) in any field make the row unreadable:
    PostgreSQL cannot store a NUL, and an escape in a name would act on a terminal.
    Tab, CR and LF are allowed (an address may span lines)."""
    if "".join([v for v in row.values() if v]).isprintable():  # the common row: one test
        return
    for key, value in row.items():
        if value and not value.isprintable() and has_control(value):
            problems.add(f"control character in {key}")


def _date(row: Row, key: str, problems: _Problems, phi: bool) -> date | None:
    value = (row.get(key) or "").strip()
    if not value:
        return None
    if _DATE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    problems.add(
        f"bad {key} (not a valid YYYY-MM-DD date)" if phi else f"bad {key} {_shown(value)}"
    )
    return None


class NoOffset(ValueError):
    """A time written without a UTC offset, from a source that declares no zone."""


def parse_time(value: str | None, zone: tzinfo | None = None) -> datetime | None:
    """ISO 8601 -> aware datetime. A time without an offset is read in `zone` (the
    source's declared zone, setting op_timezone); without one it is NoOffset: read as
    UTC, a US export in local time would make a change 10 minutes old look hours old
    and bypass the propagation delay.

    Raises ValueError for text that is not a time; blank is None.
    """
    value = (value or "").strip()
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except (ValueError, OverflowError) as err:
        raise ValueError(value) from err
    if parsed.tzinfo is None:
        if zone is None:
            raise NoOffset(value)
        parsed = parsed.replace(tzinfo=zone)
    return parsed


def _time(row: Row, key: str, problems: _Problems, zone: tzinfo | None = None
          ) -> datetime | None:
    try:
        return parse_time(row.get(key), zone)
    except NoOffset:
        problems.add(f"bad {key} {_shown((row.get(key) or '').strip())} (no UTC offset, "
                     "and the source declares no time zone: setting op_timezone)")
        return None
    except ValueError:
        problems.add(f"bad {key} {_shown((row.get(key) or '').strip())}")
        return None


def _bool(row: Row, key: str, problems: _Problems) -> bool:
    value = (row.get(key) or "").strip()
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    problems.add(f"missing {key}" if not value
                 else f"bad {key} {_shown(value, (*_TRUE, *_FALSE))}")
    return False


def _authority(row: Row, problems: _Problems) -> Authority:
    value = (row.get("authority") or "").strip()
    if not value:
        return Authority.NONE
    found = _AUTHORITY.get(value.lower())
    if found is None:
        problems.add(f"unknown authority {_shown(value, _AUTHORITY)}")
        return Authority.NONE
    return found


def _status(row: Row, problems: _Problems) -> str:
    value = (row.get("status") or "").strip()
    found = _STATUS.get(value.lower())
    if found is None:
        problems.add(
            "missing status" if not value
            else f"bad status {_shown(value, _STATUS)} (Active or Inactive)"
        )
        return ""
    return found


def _clean_id(value: str | None) -> str | None:
    """An id fit to appear in a finding: present, short and decodable."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > MAX_ID or id_problem(value) is not None:
        return None
    return value


# Which row columns name the InvalidRecord's patient, contact and portal user.
_ID_COLUMNS: dict[str, tuple[str | None, str | None, str | None]] = {
    "patients": ("patient_id", None, None),
    "contacts": ("patient_id", "contact_id", None),
    "family_contacts": ("patient_id", "contact_id", None),
    "portal_users": ("op_patient_id", "op_contact_id", "user_id"),
    "portal_links": (None, None, "caregiver_user_id"),
    "portal_sources": (None, None, "user_id"),
    "portal_audit": (None, None, "user_id"),
}


def invalid(table: str, row: Row, source: str, line: int | None, reason: str) -> InvalidRecord:
    """An InvalidRecord carrying whatever ids of the row are readable."""
    patient_col, contact_col, user_col = _ID_COLUMNS[table]
    extra: dict[str, str] = {}
    if table == "portal_links":
        dependent = _clean_id(row.get("dependent_user_id"))
        if dependent:
            extra["dependent_user_id"] = dependent
    return InvalidRecord(
        source=source,
        line=line,
        reason=reason,
        patient_id=_clean_id(row.get(patient_col)) if patient_col else None,
        contact_id=_clean_id(row.get(contact_col)) if contact_col else None,
        portal_user_id=_clean_id(row.get(user_col)) if user_col else None,
        extra=extra,
        table=table,
    )


def row_ids(table: str, row: Row) -> tuple[str | None, str | None, str | None, str | None]:
    """The ids a (possibly broken) row names: patient, contact, portal user, dependent."""
    rec = invalid(table, row, "", None, "")
    return (rec.patient_id, rec.contact_id, rec.portal_user_id,
            rec.extra.get("dependent_user_id"))


def _bad(table: str, row: Row, source: str, line: int, problems: _Problems) -> InvalidRecord:
    return invalid(table, row, source, line, "; ".join(problems.reasons))


def parse_patient(
    row: Row, source: str, line: int, zone: tzinfo | None = None
) -> Patient | InvalidRecord:
    p = _Problems()
    _controls(row, p)
    patient_id = _required_id(row, "patient_id", p)
    dob = _date(row, "dob", p, phi=True)
    status = _status(row, p)
    updated_at = _time(row, "updated_at", p, zone)
    if p.reasons:
        return _bad("patients", row, source, line, p)
    return Patient(
        patient_id=patient_id,
        first_name=_text(row, "first_name"),
        last_name=_text(row, "last_name"),
        dob=dob,
        email=_text(row, "email"),
        status=status,
        updated_at=updated_at,
    )


def parse_contact(
    row: Row, source: str, line: int, zone: tzinfo | None = None
) -> Contact | InvalidRecord:
    """A contact whose only problem is an unreadable DOB is kept without it (and still
    raises its `invalid_record`): the person exists, and duplicate matching can use the
    DOB's digits (a month of 13 is most often a day/month swap)."""
    p = _Problems()
    _controls(row, p)
    contact_id = _required_id(row, "contact_id", p)
    own_patient = _optional_id(row, "patient_id", p)
    before = len(p.reasons)
    dob = _date(row, "dob", p, phi=True)
    dob_problem = before == 0 and len(p.reasons) == 1
    active = _bool(row, "active", p)
    updated_at = _time(row, "updated_at", p, zone)
    dob_text, bad = "", None
    if p.reasons:
        if not (dob_problem and len(p.reasons) == 1):
            return _bad("contacts", row, source, line, p)
        dob_text = (row.get("dob") or "").strip()
        bad = _bad("contacts", row, source, line, p)
    return Contact(
        contact_id=contact_id,
        first_name=_text(row, "first_name"),
        last_name=_text(row, "last_name"),
        email=_text(row, "email"),
        dob=dob,
        phone=_text(row, "phone"),
        address=_text(row, "address"),
        city=_interned(row, "city"),
        postcode=_text(row, "postcode"),
        active=active,
        patient_id=own_patient,
        updated_at=updated_at,
        dob_text=dob_text,
        invalid=bad,
    )


def parse_family_contact(
    row: Row, source: str, line: int, zone: tzinfo | None = None
) -> FamilyContact | InvalidRecord:
    p = _Problems()
    _controls(row, p)
    patient_id = _required_id(row, "patient_id", p)
    contact_id = _required_id(row, "contact_id", p)
    authority = _authority(row, p)
    updated_at = _time(row, "updated_at", p, zone)
    if p.reasons:
        return _bad("family_contacts", row, source, line, p)
    return FamilyContact(
        patient_id=patient_id,
        contact_id=contact_id,
        role_reason=_interned(row, "role_reason"),
        authority=authority,
        updated_at=updated_at,
    )


def parse_portal_user(
    row: Row, source: str, line: int, zone: tzinfo | None = None
) -> PortalUser | InvalidRecord:
    p = _Problems()
    _controls(row, p)
    user_id = _required_id(row, "user_id", p)
    op_patient = _optional_id(row, "op_patient_id", p)
    op_contact = _optional_id(row, "op_contact_id", p)
    active = _bool(row, "active", p)
    updated_at = _time(row, "updated_at", p, zone)
    if p.reasons:
        return _bad("portal_users", row, source, line, p)
    return PortalUser(
        user_id=user_id,
        op_patient_id=op_patient,
        op_contact_id=op_contact,
        first_name=_text(row, "first_name"),
        last_name=_text(row, "last_name"),
        email=_text(row, "email"),
        role=_interned(row, "role"),
        active=active,
        updated_at=updated_at,
    )


def parse_portal_link(
    row: Row, source: str, line: int, zone: tzinfo | None = None
) -> CaregiverLink | InvalidRecord:
    p = _Problems()
    _controls(row, p)
    caregiver = _required_id(row, "caregiver_user_id", p)
    dependent = _required_id(row, "dependent_user_id", p)
    created_at = _time(row, "created_at", p, zone)
    if p.reasons:
        return _bad("portal_links", row, source, line, p)
    return CaregiverLink(
        caregiver_user_id=caregiver, dependent_user_id=dependent, created_at=created_at
    )


def parse_portal_source(
    row: Row, source: str, line: int, zone: tzinfo | None = None
) -> PortalSource | InvalidRecord:
    p = _Problems()
    _controls(row, p)
    user_id = _required_id(row, "user_id", p)
    last_sync_at = _time(row, "last_sync_at", p, zone)
    if p.reasons:
        return _bad("portal_sources", row, source, line, p)
    return PortalSource(
        user_id=user_id, status=_interned(row, "status"), last_sync_at=last_sync_at
    )


def parse_portal_audit(
    row: Row, source: str, line: int, zone: tzinfo | None = None
) -> AuditEvent | InvalidRecord:
    p = _Problems()
    _controls(row, p)
    at = _time(row, "at", p, zone)
    audit_user = _optional_id(row, "user_id", p)
    if at is None and not p.reasons:
        p.add("missing at")
    if p.reasons or at is None:
        return _bad("portal_audit", row, source, line, p)
    return AuditEvent(
        at=at,
        action=_interned(row, "action"),
        user_id=audit_user,
        email=_text(row, "email"),
    )


PARSERS = {
    "patients": parse_patient,
    "contacts": parse_contact,
    "family_contacts": parse_family_contact,
    "portal_users": parse_portal_user,
    "portal_links": parse_portal_link,
    "portal_sources": parse_portal_source,
    "portal_audit": parse_portal_audit,
}

# The time column `since` compares with, per table (None: the table takes no `since`).
SINCE_COLUMN: dict[str, str | None] = {
    "patients": "updated_at",
    "contacts": "updated_at",
    "family_contacts": "updated_at",
    "portal_users": "updated_at",
    "portal_links": None,
    "portal_sources": None,
    "portal_audit": "at",
}


# -- the other direction: record -> CSV representation ----------------------------------


def format_value(value: Any) -> str:
    """One value in the contract's text form: the inverse of the parsers above."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Authority):
        return value.value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


_RECORD_TABLE: dict[type, str] = {
    Patient: "patients",
    Contact: "contacts",
    FamilyContact: "family_contacts",
    PortalUser: "portal_users",
    CaregiverLink: "portal_links",
    PortalSource: "portal_sources",
    AuditEvent: "portal_audit",
}


def table_of(record: object) -> str:
    """The layout a record belongs to; TypeError for anything that is not a record."""
    try:
        return _RECORD_TABLE[type(record)]
    except KeyError:
        raise TypeError(f"not a source record: {type(record).__name__}") from None
