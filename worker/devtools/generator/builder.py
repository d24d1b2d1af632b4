"""The builder's core: ids, clocks, values, and one constructor per kind of row.

Why apart: every planter (households, duplicates, OP and portal defects) makes rows only
through these methods, so ids stay unique, the random stream stays in one order, and
each row's physical line is known when an `invalid_record` is planted.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from worker.checks.catalog import BY_ID
from worker.devtools.generator.people import (
    AREA_CODES,
    EMAIL_DOMAINS,
    _ascii,
    _Home,
    _Ident,
    _norm,
    _pools,
)
from worker.model.findings import Action, Finding, Severity
from worker.model.records import (
    WELCOME_ACTION,
    AuditEvent,
    Authority,
    CaregiverLink,
    Contact,
    FamilyContact,
    Patient,
    PortalSource,
    PortalUser,
)
from worker.sources.layout import OP_LAYOUT, PORTAL_LAYOUT

OP_TABLES = tuple(OP_LAYOUT)
PORTAL_TABLES = tuple(PORTAL_LAYOUT)
TABLES = OP_TABLES + PORTAL_TABLES

CONNECTED = "Connected"
PROPAGATION_DELAY = timedelta(minutes=15)
WELCOME_WINDOW = timedelta(days=7)

_AUTHORITY = {a.value: a for a in Authority}


@dataclass(frozen=True)
class DefectRates:
    """Share of households (about patients / 2) given each defect; at least one of each
    when patients >= 100. `recent_change` plants cross-system defects on records changed
    within the propagation delay: no finding is expected for them."""

    authority_invalid: float = 0.01
    self_role: float = 0.01
    self_dependent_missing: float = 0.01
    contact_email_invalid: float = 0.01
    contact_inactive: float = 0.01
    contact_duplicate: float = 0.01
    patient_inactive: float = 0.01
    patient_email_present: float = 0.01
    portal_patient_email_not_dummy: float = 0.01
    portal_patient_role_invalid: float = 0.01
    caregiver_link_missing: float = 0.01
    caregiver_link_stale: float = 0.01
    welcome_not_sent: float = 0.01
    portal_orphan_user: float = 0.01
    invalid_record: float = 0.01
    recent_change: float = 0.01


class RawRow(dict[str, str]):
    """A row written verbatim (blank authority, malformed values). `record` is what a
    correct reader makes of it, or None when the row must become `invalid_record`."""

    __slots__ = ("record",)

    def __init__(self, values: dict[str, str], record: object | None = None) -> None:
        super().__init__(values)
        self.record = record


class _Core:
    """Emits rows into per-table buffers, and their expected findings.

    Rows go out in the order they are made, so the builder knows each raw row's
    physical line (header = line 1) when it plants an `invalid_record`.
    """

    def __init__(self, seed: int, now: datetime, rates: DefectRates) -> None:
        self.rng = random.Random(seed)
        self.now = now
        self.rates = rates
        self.pools = _pools()
        self.out: dict[str, list[Any]] = {t: [] for t in TABLES}
        self.lines: dict[str, int] = dict.fromkeys(TABLES, 1)
        self.findings: list[Finding] = []
        # Pairs of contacts planted to look like one person and not be (no finding).
        self.traps: list[tuple[str, str, str]] = []
        self.stats: Counter[str] = Counter()
        self.suppressed: Counter[str] = Counter()
        self.op_only_recent: Counter[str] = Counter()
        self.n_patient = self.n_contact = self.n_user = self.n_email = self.n_phone = 0
        self.patients_made = 0
        # (normalised name token) -> bitmap of contact dates of birth already using it.
        self._dob_bits: dict[str, bytearray] = {}
        self._dob_base = date(1900, 1, 1).toordinal()
        self._dob_bytes = (date(2100, 1, 1).toordinal() - self._dob_base) // 8 + 1
        rng = self.rng
        old_lo = int((now - timedelta(days=3 * 365)).timestamp())
        old_hi = int((now - timedelta(days=2)).timestamp())
        self._old = [
            datetime.fromtimestamp(rng.randint(old_lo, old_hi), UTC) for _ in range(8192)
        ]
        self._today = now.date()

    # ids and values -----------------------------------------------------------------

    def pid(self) -> str:
        self.n_patient += 1
        return f"P{self.n_patient:06d}"

    def cid(self) -> str:
        self.n_contact += 1
        return f"C{self.n_contact:06d}"

    def uid(self) -> str:
        self.n_user += 1
        return f"U{self.n_user:06d}"

    def old(self) -> datetime:
        return self._old[self.rng.getrandbits(13)]

    def recent(self) -> datetime:
        """Within the propagation delay: 1 to 10 minutes before `now`."""
        return self.now - timedelta(seconds=self.rng.randint(60, 600))

    def days_ago(self, lo: float, hi: float) -> datetime:
        return (self.now - timedelta(seconds=self.rng.randint(int(lo * 86400), int(hi * 86400))))

    def email(self, first: str, last: str) -> str:
        """Unique by construction: the trailing number is a global counter."""
        self.n_email += 1
        return f"{_ascii(first)}.{_ascii(last)}{self.n_email}@{self.rng.choice(EMAIL_DOMAINS)}"

    def phone(self) -> str:
        """Unique 7-digit subscriber number for up to ten million contacts."""
        self.n_phone += 1
        v = (self.n_phone * 7_654_321 + 3_141_592) % 10_000_000
        return f"({self.rng.choice(AREA_CODES)}) {v // 10000:03d}-{v % 10000:04d}"

    def home(self) -> _Home:
        rng, p = self.rng, self.pools
        return _Home(
            f"{rng.randint(1, 9899)} {rng.choice(p.streets)}",
            rng.choice(p.cities),
            f"{rng.randint(1001, 99950):05d}",
        )

    def first_name(self, gender: str) -> str:
        return self.rng.choice(self.pools.first_f if gender == "f" else self.pools.first_m)

    def last_name(self) -> str:
        return self.rng.choice(self.pools.last)

    def kid_dob(self) -> date:
        return self._today - timedelta(days=self.rng.randint(30, 17 * 365 + 300))

    def adult_dob(self, lo: int = 22, hi: int = 60) -> date:
        return self._today - timedelta(days=self.rng.randint(lo * 365, hi * 365))

    def _dob_free(self, tokens: Iterable[str], day: int) -> bool:
        for tok in tokens:
            bits = self._dob_bits.get(tok)
            if bits is not None and bits[day >> 3] >> (day & 7) & 1:
                return False
        return True

    def _dob_take(self, tokens: Iterable[str], day: int) -> None:
        for tok in tokens:
            bits = self._dob_bits.get(tok)
            if bits is None:
                bits = self._dob_bits[tok] = bytearray(self._dob_bytes)
            bits[day >> 3] |= 1 << (day & 7)

    def contact_dob(self, first: str, last: str, want: date | None = None,
                    force: bool = False) -> date | None:
        """A contact DOB no other contact with either name token has, or None.

        This is what keeps clean contacts from ever matching as near-duplicates: a
        typo, nickname or swapped-name match also needs a shared DOB, email or phone,
        and emails and phones are unique.
        """
        tokens = (_norm(first), _norm(last))
        if want is not None:
            candidates: Iterable[date] = (want,)
        else:
            candidates = (self.adult_dob(20, 75) for _ in range(200 if force else 3))
        for dob in candidates:
            day = dob.toordinal() - self._dob_base
            if self._dob_free(tokens, day):
                self._dob_take(tokens, day)
                return dob
        if force:  # pragma: no cover - 200 random dates all taken for one name
            raise RuntimeError("no free contact DOB")
        return None

    def mark_dob(self, first: str, last: str, dob: date | None) -> None:
        if dob is not None:
            self._dob_take((_norm(first), _norm(last)), dob.toordinal() - self._dob_base)

    def ident(self, gender: str, last: str | None = None, dob: bool | None = None,
              first: str | None = None) -> _Ident:
        first = first or self.first_name(gender)
        last = last or self.last_name()
        with_dob = self.rng.random() < 0.35 if dob is None else dob
        born = self.contact_dob(first, last, force=bool(dob)) if with_dob else None
        return _Ident(first, last, gender, self.email(first, last), self.phone(), born)

    # emitting -----------------------------------------------------------------------

    def emit(self, table: str, item: object) -> int:
        """Queue one row; returns its physical line in the file."""
        self.out[table].append(item)
        self.lines[table] += 1
        return self.lines[table]

    def expect(self, check: str, detail: str, *, severity: Severity | None = None,
               action: Action | None = None, **ids: Any) -> None:
        spec = BY_ID[check]
        act = action or spec.action
        self.findings.append(
            Finding(
                check=check,
                severity=severity or spec.severity,
                action=act,
                detail=detail,
                fix=spec.fix if act is Action.FIX else None,
                cross_system=spec.cross_system,
                **ids,
            )
        )
        self.stats[f"finding:{check}"] += 1

    def patient(self, first: str, last: str, dob: date, email: str = "",
                status: str = "Active", recent: bool = False) -> Patient:
        rec = Patient(self.pid(), first, last, dob, email, status,
                      self.recent() if recent else self.old())
        self.emit("patients", rec)
        self.patients_made += 1
        return rec

    def contact(self, who: _Ident, home: _Home, *, email: str | None = None, active: bool = True,
                patient_id: str | None = None, recent: bool = False) -> Contact:
        rec = Contact(
            self.cid(), who.first, who.last, who.email if email is None else email, who.dob,
            who.phone, home.address, home.city, home.postcode, active, patient_id,
            self.recent() if recent else self.old(),
        )
        self.emit("contacts", rec)
        return rec

    def fc(self, patient: Patient, contact: Contact, role: str, authority: str,
           recent: bool = False) -> None:
        when = self.recent() if recent else self.old()
        if authority == "":
            parsed = FamilyContact(patient.patient_id, contact.contact_id, role, Authority.NONE,
                                   when)
            self.emit("family_contacts", RawRow({
                "patient_id": patient.patient_id, "contact_id": contact.contact_id,
                "role_reason": role, "authority": "", "updated_at": when.isoformat(),
            }, parsed))
        else:
            self.emit("family_contacts", FamilyContact(
                patient.patient_id, contact.contact_id, role, _AUTHORITY[authority], when))

    def source(self, user_id: str) -> None:
        self.emit("portal_sources", PortalSource(user_id, CONNECTED, self.old()))

    def welcome(self, email: str, at: datetime, user_id: str | None = None) -> None:
        self.emit("portal_audit", AuditEvent(at, WELCOME_ACTION, user_id, email))

    def caregiver_user(self, contact: Contact) -> PortalUser:
        """An active caregiver account, its connected source and its Welcome event."""
        user = PortalUser(
            self.uid(), None, contact.contact_id, contact.first_name, contact.last_name,
            contact.email, "Caregiver", True, self.old(),
        )
        self.emit("portal_users", user)
        self.source(user.user_id)
        self.welcome(user.email, self.old(), user.user_id)
        if self.rng.random() < 0.1:
            self.emit("portal_audit", AuditEvent(self.old(), "Profile: Login", user.user_id,
                                                 user.email))
        return user

    def patient_user(self, patient: Patient, *, role: str = "Patient", email: str = "dummy",
                     active: bool = True) -> PortalUser:
        if email == "dummy":
            domain = "dummy.com" if self.rng.random() < 0.97 else "Dummy.com"
            address = f"{_ascii(patient.first_name)}.{patient.patient_id.lower()}@{domain}"
        elif email == "typo":
            address = f"{_ascii(patient.first_name)}.{patient.patient_id.lower()}@dummy.co"
        else:  # "real": a personal address, as when a parent typed their own
            address = self.email(patient.first_name, patient.last_name)
        user = PortalUser(
            self.uid(), patient.patient_id, None, patient.first_name, patient.last_name,
            address, role, active, self.old(),
        )
        self.emit("portal_users", user)
        self.source(user.user_id)
        return user

    def link(self, caregiver: PortalUser, dependent: PortalUser) -> None:
        self.emit("portal_links", CaregiverLink(caregiver.user_id, dependent.user_id, self.old()))
