"""A synthetic practice: OP and portal exports plus the findings a correct run must raise.

Why it exists: the checks are scored against ground truth, so every defect is planted in
an *isolated* household (its own contacts, users and links) whose consequences under
docs/checks.md are known exactly, and every finding it causes, consequential ones
included, goes to `manifest.jsonl`. Everything else is clean by construction: unique
emails and phones, and no two contacts share a name token with a matching date of birth,
so the duplicate detector cannot find a pair we did not plant.

It must scale to a million patients: names come from pools built once from Faker's
word lists and are sampled with one seeded `random.Random`; rows are streamed to the
files in small batches by one writer thread per file (the shared CSV writers take one
iterable per file, and one generation pass has to feed all seven at once).

Same seed and same `now` give byte-identical files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import random
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from worker.checks.catalog import BY_ID
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

# The nicknames duplicates.py knows for certain (DESIGN brief); formal name -> nickname.
NICKNAMES_F = {"Elizabeth": "Liz", "Katherine": "Kate"}
NICKNAMES_M = {"Robert": "Bob", "William": "Bill", "James": "Jim", "Michael": "Mike"}
ACCENTED_F = ("Zoë", "Renée", "Chloé", "Inés", "Noémie", "Hélène", "Mónica", "Léa")
ACCENTED_M = ("José", "André", "Jérôme", "Raúl", "Andrés", "Hernán", "Joël", "Rubén")
EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example.com")
AREA_CODES = ("212", "310", "415", "503", "512", "617", "702", "808", "919", "971")
_KEYBOARD = {
    "q": "wa", "w": "qes", "e": "wrd", "r": "etf", "t": "ryg", "y": "tuh", "u": "yij",
    "i": "uok", "o": "ipl", "p": "ol", "a": "qsz", "s": "adw", "d": "sfe", "f": "dgr",
    "g": "fht", "h": "gjy", "j": "hku", "k": "jli", "l": "ko", "z": "xa", "x": "zc",
    "c": "xv", "v": "cb", "b": "vn", "n": "bm", "m": "n",
}
_AUTHORITY = {a.value: a for a in Authority}
_ASCII_NAME = re.compile(r"[A-Za-z]+")
_LETTERS = re.compile(r"[^\W\d_]+")  # letters only, accents allowed: no spaces or hyphens


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


@dataclass
class GenerateResult:
    out_dir: Path
    seed: int
    now: datetime
    patients: int
    counts: dict[str, int]
    findings: dict[str, int]
    suppressed_recent: dict[str, int]
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"{self.patients} patients, {sum(self.counts.values())} rows, "
                f"{sum(self.findings.values())} expected findings, "
                f"{sum(self.suppressed_recent.values())} suppressed as recent, "
                f"{self.seconds:.1f}s")


@dataclass
class PracticeRecords:
    """The whole practice in memory (small sizes only): rows per table in file order."""

    now: datetime
    seed: int
    rows: dict[str, list[Any]]
    findings: list[Finding]
    stats: dict[str, Any]

    def records(self, table: str) -> list[Any]:
        """Parsed records of a table, as a correct reader sees them (bad rows dropped)."""
        out = []
        for item in self.rows[table]:
            if isinstance(item, RawRow):
                if item.record is not None:
                    out.append(item.record)
            else:
                out.append(item)
        return out


# -- pools -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pools:
    first_f: tuple[str, ...]
    first_m: tuple[str, ...]
    last: tuple[str, ...]
    streets: tuple[str, ...]
    cities: tuple[str, ...]
    typo_f: tuple[str, ...]  # plain ASCII names of 5+ letters: a typo is visible
    typo_m: tuple[str, ...]
    first_norm: frozenset[str]


@lru_cache(maxsize=1)
def _pools() -> _Pools:
    """Built once per process from Faker's word lists (sorted, so runs agree)."""
    from faker import Faker

    locales = ("en_US", "en_GB", "es_MX", "fr_FR", "it_IT", "de_DE")
    first_f: set[str] = set()
    first_m: set[str] = set()
    last: set[str] = set()
    for loc in locales:
        mod = __import__(f"faker.providers.person.{loc}", fromlist=["Provider"])
        provider = mod.Provider
        first_f.update(getattr(provider, "first_names_female", ()))
        first_m.update(getattr(provider, "first_names_male", ()))
        last.update(getattr(provider, "last_names", ()))

    def keep(names: Iterable[str]) -> tuple[str, ...]:
        return tuple(sorted(n for n in names if _LETTERS.fullmatch(n) and len(n) >= 2))

    fake = Faker("en_US")
    fake.seed_instance(20240601)
    streets = sorted({fake.street_name() for _ in range(2500)})
    cities = sorted({fake.city() for _ in range(400)})
    ff, fm = keep(first_f), keep(first_m)
    return _Pools(
        first_f=ff,
        first_m=fm,
        last=keep(last),
        streets=tuple(streets),
        cities=tuple(cities),
        typo_f=tuple(n for n in ff if _ASCII_NAME.fullmatch(n) and len(n) >= 5),
        typo_m=tuple(n for n in fm if _ASCII_NAME.fullmatch(n) and len(n) >= 5),
        first_norm=frozenset(_norm(n) for n in first_f | first_m),
    )


@lru_cache(maxsize=65536)
def _norm(name: str) -> str:
    """Name as a duplicate detector compares it: accents, case and spacing folded."""
    text = unicodedata.normalize("NFKD", name)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(text.casefold().split())


@lru_cache(maxsize=65536)
def _ascii(name: str) -> str:
    return re.sub(r"[^a-z]", "", _norm(name))


# -- household specs -------------------------------------------------------------------


@dataclass
class _Ident:
    first: str
    last: str
    gender: str
    email: str
    phone: str
    dob: date | None


@dataclass
class _Adult:
    """One adult of a household and how they appear in OP and the portal.

    `user=None` means: a caregiver user exactly when authorized with a valid email.
    `links`: auto (one per kid the adult is authorized on), all, none, or miss_first /
    miss_own (auto minus the first kid's link / minus the link to their own chart).
    `own`: the adult is also a patient; ok (Other Relative + Joint, blank chart email),
    ok_email (same with a real chart email), self, missing or none_auth.
    """

    role: str = "Mother"
    gender: str = "f"
    authority: str = "Joint"
    on_kids: bool = True
    active: bool = True
    email: str = "valid"
    user: bool | None = None
    welcome: str = "sent"
    links: str = "auto"
    own: str | None = None
    recent_contact: bool = False
    recent_fc: bool = False
    home: int = 0
    ident: _Ident | None = None
    # filled in by the builder
    contact: Contact | None = None
    user_rec: PortalUser | None = None
    own_patient: Patient | None = None
    own_user: PortalUser | None = None

    # ids of what the builder made, for the expected findings
    @property
    def cid(self) -> str:
        assert self.contact is not None
        return self.contact.contact_id

    @property
    def uid(self) -> str:
        assert self.user_rec is not None
        return self.user_rec.user_id

    @property
    def own_pid(self) -> str:
        assert self.own_patient is not None
        return self.own_patient.patient_id

    @property
    def grants(self) -> bool:
        return self.authority in ("Joint", "Exclusive")

    @property
    def authorized(self) -> bool:
        return self.grants and self.active and self.on_kids


@dataclass
class _Kid:
    status: str = "Active"
    chart_email: str = "none"
    user: str = "auto"
    user_role: str = "Patient"
    user_email: str = "dummy"
    recent: bool = False
    patient: Patient | None = None
    user_rec: PortalUser | None = None

    @property
    def pid(self) -> str:
        assert self.patient is not None
        return self.patient.patient_id

    @property
    def uid(self) -> str:
        assert self.user_rec is not None
        return self.user_rec.user_id


@dataclass
class _Home:
    address: str
    city: str
    postcode: str


# -- the builder -----------------------------------------------------------------------


class _Builder:
    """Emits households row by row into per-table buffers, and their expected findings.

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

    # households ---------------------------------------------------------------------

    def household(self, adults: list[_Adult], kids: list[_Kid]) -> None:
        """Build one household from its specs: OP rows first, then the portal."""
        rng = self.rng
        homes = [self.home() for _ in range(1 + max((a.home for a in adults), default=0))]
        first_ident = adults[0].ident if adults else None
        family_last = first_ident.last if first_ident else self.last_name()
        for a in adults:
            if a.ident is None:
                same = a.role.lower() in ("mother", "father") and rng.random() < 0.7
                a.ident = self.ident(a.gender, last=family_last if same else None)
        for k in kids:
            first = self.first_name(rng.choice("fm"))
            if k.chart_email == "real":
                email = self.email(first, family_last)
            else:
                email = rng.choice(("", "", "", "N/A", "n/a", "NA"))
            k.patient = self.patient(first, family_last, self.kid_dob(), email, k.status,
                                     recent=k.recent)
        for a in adults:
            who = a.ident
            assert who is not None
            if a.own is not None:
                # a parent who is their own dependent must keep their chart email blank
                own_email = rng.choice(("", "", "N/A")) if a.own == "ok" else who.email
                born = who.dob or self.adult_dob()
                a.own_patient = self.patient(who.first, who.last, born, own_email)
            email = {"valid": who.email, "blank": "",
                     "bad@@": who.email.replace("@", "@@"),
                     "bad-no-at": who.email.replace("@", "."),
                     "bad-space": who.email.replace(".", " ", 1)}[a.email]
            a.contact = self.contact(
                who, homes[a.home], email=email, active=a.active,
                patient_id=a.own_patient.patient_id if a.own_patient else None,
                recent=a.recent_contact,
            )
            if a.on_kids:
                for k in kids:
                    assert k.patient is not None
                    self.fc(k.patient, a.contact, a.role, a.authority, recent=a.recent_fc)
            if a.own_patient is not None:
                own_fc = {"ok": ("Other Relative", "Joint"),
                          "ok_email": ("Other Relative", "Joint"),
                          "self": ("Self", "Joint"), "none_auth": ("Other Relative", "None"),
                          "missing": None}[a.own or "missing"]
                if own_fc is not None:
                    self.fc(a.own_patient, a.contact, *own_fc)
        # portal
        for a in adults:
            assert a.contact is not None and a.ident is not None
            has_user = a.user if a.user is not None else (a.authorized and a.email == "valid")
            if has_user:
                a.user_rec = self.caregiver_user(a.contact)
            elif a.welcome == "recent":
                at = self.days_ago(0.5, 6.5)
                email = a.contact.email.upper() if rng.random() < 0.2 else a.contact.email
                self.welcome(email, at)
            elif a.welcome == "old":
                self.welcome(a.contact.email, self.days_ago(9, 300))
            elif a.welcome == "other":
                self.welcome(self.email(a.ident.first, a.ident.last), self.days_ago(0.5, 6))
            if a.user_rec is not None and a.own in ("ok", "ok_email") and a.own_patient:
                a.own_user = self.patient_user(a.own_patient)
        any_caregiver = any(a.user_rec is not None for a in adults)
        for k in kids:
            assert k.patient is not None
            mode = k.user
            if mode == "auto":
                mode = "active" if (k.status == "Active" and any_caregiver) else "none"
            if mode == "active":
                k.user_rec = self.patient_user(k.patient, role=k.user_role, email=k.user_email)
            elif mode == "inactive":
                k.user_rec = self.patient_user(k.patient, active=False)
        for a in adults:
            if a.user_rec is None:
                continue
            for i, k in enumerate(kids):
                if k.user_rec is None:
                    continue
                want = {"auto": a.authorized, "all": True, "none": False,
                        "miss_first": a.authorized and i != 0,
                        "miss_own": a.authorized}[a.links]
                if want:
                    self.link(a.user_rec, k.user_rec)
            if a.own_user is not None and a.links != "miss_own":
                self.link(a.user_rec, a.own_user)

    def kids(self, lo: int = 1, hi: int = 2, **kw: Any) -> list[_Kid]:
        return [_Kid(**kw) for _ in range(self.rng.randint(lo, hi))]

    # clean households ---------------------------------------------------------------

    def clean(self, budget: int) -> int:
        """One defect-free household of at most `budget` patients; returns its size."""
        rng = self.rng
        r = rng.random()
        if budget < 2 and r < 0.70:
            r = 0.95  # a lone adult, or a one-child household below
        if r < 0.50:
            n = min(budget, rng.choices((1, 2, 3, 4), (35, 40, 18, 7))[0])
            adults = [_Adult("Mother", "f"), _Adult("Father", "m")]
            if rng.random() < 0.15:
                adults[rng.randrange(2)].authority = "Exclusive"
            self._extras(adults)
            self.household(adults, [_Kid() for _ in range(n)])
            self.stats["clean:two_parents"] += 1
            return n
        if r < 0.62:
            n = min(budget, rng.choices((1, 2, 3), (50, 35, 15))[0])
            role, g = rng.choice((("Mother", "f"), ("Mother", "f"), ("Father", "m"),
                                  ("Legal Guardian", "f"), ("Foster Parent", "m"),
                                  ("Grandmother", "f"), ("guardian", "m")))
            adults = [_Adult(role, g)]
            self._extras(adults)
            self.household(adults, [_Kid() for _ in range(n)])
            self.stats["clean:single_parent"] += 1
            return n
        if r < 0.70:
            n = min(budget, rng.choice((1, 2, 2, 3)))
            mom = _Adult("Mother", "f", authority=rng.choice(("Joint", "Exclusive")))
            if rng.random() < 0.5:
                # non-custodial father with no email on file: no authority, no finding
                dad = _Adult("Father", "m", authority=rng.choice(("None", "")), email="blank",
                             home=1)
            else:
                dad = _Adult("Father", "m", authority="Joint", home=1)
            self.household([mom, dad], [_Kid() for _ in range(n)])
            self.stats["clean:divorced"] += 1
            return n
        if r < 0.76 and budget >= 2:
            n = min(budget - 1, rng.choice((1, 1, 2, 3)))
            parent = _Adult("Mother", "f", own="ok") if rng.random() < 0.6 else \
                _Adult("Father", "m", own="ok")
            other = _Adult("Father" if parent.gender == "f" else "Mother",
                           "m" if parent.gender == "f" else "f")
            self.household([parent, other], [_Kid() for _ in range(n)])
            self.stats["clean:parent_patient"] += 1
            return n + 1
        if r < 0.80 and budget >= 1:
            n = min(budget, rng.choice((1, 2)))
            adults = [_Adult("Mother", "f"), _Adult("Father", "m",
                                                    authority=rng.choice(("Joint", "None")))]
            deactivated = rng.random() < 0.5
            kids = [_Kid(status="Inactive", user="inactive" if deactivated else "none",
                         chart_email=rng.choice(("none", "real"))) for _ in range(n)]
            for a in adults:
                a.user = deactivated and a.authority == "Joint"
                a.links = "all"
            self.household(adults, kids)
            self.stats["clean:former"] += 1
            return n
        # a lone adult patient
        self.adult_patient(self_contact=rng.random() < 0.8)
        self.stats["clean:adult"] += 1
        return 1

    def _extras(self, adults: list[_Adult]) -> None:
        """Grandparents without authority, stepparents, recently invited parents."""
        rng = self.rng
        if rng.random() < 0.12:
            role = rng.choice(("Grandmother", "Grandfather", "Other Relative", "Aunt"))
            adults.append(_Adult(role, "f" if role in ("Grandmother", "Aunt") else "m",
                                 authority=rng.choice(("None", "None", "")),
                                 email=rng.choice(("valid", "valid", "blank")), home=1))
        if rng.random() < 0.04:
            adults.append(_Adult("Stepfather", "m", authority="Joint"))
        if rng.random() < 0.04:
            # invited in the last week, has not registered yet: clean
            adults[0].user = False
            adults[0].welcome = "recent"

    def adult_patient(self, self_contact: bool = True) -> tuple[Patient, Contact | None]:
        """An adult who manages their own care: chart email, own contact with role Self."""
        rng = self.rng
        g = rng.choice("fm")
        who = self.ident(g, dob=False)
        born = self.adult_dob(18, 85)
        pat = self.patient(who.first, who.last, born, who.email)
        if not self_contact:
            return pat, None
        who.dob = self.contact_dob(who.first, who.last, want=born)
        con = self.contact(who, self.home(), patient_id=pat.patient_id)
        self.fc(pat, con, rng.choice(("Self", "Self", "self")), rng.choice(("Joint", "None", "")))
        return pat, con

    # defects ------------------------------------------------------------------------

    def defect(self, kind: str, variant: int) -> int:
        before = self.patients_made
        getattr(self, f"_d_{kind}")(variant)
        self.stats[f"defect:{kind}"] += 1
        return self.patients_made - before

    def _d_authority_invalid(self, v: int) -> None:
        """A parent with an email but no authority: one finding per chart."""
        role, auth, recent = [("Father", "None", False), ("legal  guardian", "", False),
                              ("MOTHER", "None", True)][v % 3]
        parent = _Adult(role, "m" if role == "Father" else "f", authority=auth,
                        recent_fc=recent)
        other = _Adult("Mother" if role == "Father" else "Father",
                       "f" if role == "Father" else "m")
        kids = self.kids()
        self.household([other, parent], kids)
        for k in kids:
            self.expect("authority_invalid", f"{role.strip()} without authority",
                        patient_id=k.pid, contact_id=parent.cid)
        if recent:
            self.op_only_recent["authority_invalid"] += len(kids)

    def _d_self_role(self, v: int) -> None:
        """A parent-patient whose own chart lists them as Self; without a portal account
        the Welcome email cannot go out either (welcome_not_sent, as an alert)."""
        registered = v % 2 == 1
        parent = _Adult("Mother", "f", own="self", user=registered)
        dad = _Adult("Father", "m")
        self.household([parent, dad], self.kids())
        self.expect("self_role", "own chart lists them as Self",
                    patient_id=parent.own_pid, contact_id=parent.cid)
        if not registered:
            self.expect("welcome_not_sent", "no account, Welcome blocked by Self role",
                        action=Action.ALERT, contact_id=parent.cid)

    def _d_self_dependent_missing(self, v: int) -> None:
        """A parent-patient absent from their own chart (or there without authority)."""
        parent = _Adult("Father", "m", own=("missing", "none_auth")[v % 2])
        mom = _Adult("Mother", "f")
        self.household([mom, parent], self.kids())
        self.expect("self_dependent_missing", "not a dependent on own chart",
                    patient_id=parent.own_pid, contact_id=parent.cid)

    def _d_contact_email_invalid(self, v: int) -> None:
        """An authorized parent without a usable email: no account, nothing to resend to."""
        kind = ("blank", "bad@@", "bad-no-at", "bad-space")[v % 4]
        recent = v % 5 == 4  # OP-only: a recent change does not hide it
        # living apart: an adult without a usable email must not share an address with
        # another adult, or the address alone could make them look like one person
        parent = _Adult("Mother", "f", email=kind, user=False, welcome="none",
                        recent_contact=recent, home=1)
        self.household([parent, _Adult("Father", "m")], self.kids())
        self.expect("contact_email_invalid", f"email {kind}",
                    severity=Severity.INFO if kind == "blank" else Severity.WARNING,
                    contact_id=parent.cid)
        if recent:
            self.op_only_recent["contact_email_invalid"] += 1

    def _d_contact_inactive(self, v: int) -> None:
        """An inactive parent with authority; if their account still sees the children,
        those links are stale too (the FC is no longer authorized)."""
        keeps_account = v % 2 == 1
        parent = _Adult("Father", "m", active=False, user=keeps_account,
                        links="all" if keeps_account else "auto")
        kids = self.kids()
        self.household([_Adult("Mother", "f"), parent], kids)
        for k in kids:
            self.expect("contact_inactive", "inactive contact with authority",
                        patient_id=k.pid, contact_id=parent.cid)
            if keeps_account:
                self.expect("caregiver_link_stale", "inactive contact still linked",
                            patient_id=k.pid, contact_id=parent.cid, portal_user_id=parent.uid)

    def _dup_ident(self, base: _Ident, name: tuple[str, str], share: str) -> _Ident:
        """A second record for the same person: other name spelling, some shared keys."""
        first, last = name
        # never blank: a blank email would let a shared address count as evidence
        # between this copy and the other adults of the household
        email = base.email if "email" in share else self.email(first, last)
        phone = base.phone if "phone" in share else self.phone()
        dob = base.dob if "dob" in share else None
        self.mark_dob(first, last, dob)
        return _Ident(first, last, base.gender, email, phone, dob)

    def _typo(self, name: str) -> str:
        """One letter swapped for a keyboard neighbour, never giving another real name
        (Karen/Karin are two people, not a typo)."""
        rng = self.rng
        for _ in range(20):
            i = rng.randrange(1, len(name) - 1)
            near = _KEYBOARD.get(name[i].lower(), "x")
            typo = name[:i] + rng.choice(near) + name[i + 1:]
            if _norm(typo) not in self.pools.first_norm:
                return typo
        return name[:1] + "x" + name[2:]  # pragma: no cover

    def _d_contact_duplicate(self, v: int) -> None:
        """Near-duplicate contact records of one parent, in groups of two or three."""
        rng = self.rng
        v %= 7
        g = "f" if v in (0, 1, 4) else "m"
        role = "Mother" if g == "f" else "Father"
        if v == 4:
            first = rng.choice(ACCENTED_F)
        elif v in (2, 5):
            first = rng.choice(tuple(NICKNAMES_M))
        elif v == 6:
            first = rng.choice(ACCENTED_M)
        else:
            first = rng.choice(self.pools.typo_f if g == "f" else self.pools.typo_m)
        share = ("email", "dob", "phone", "email+dob", "email", "phone", "email")[v]
        base = self.ident(g, first=first, dob="dob" in share)
        f, last = base.first, base.last
        if v == 0:
            names = [(f.upper(), last + " ")]
        elif v == 1:
            names = [(self._typo(f), last)]
        elif v == 2:
            names = [(NICKNAMES_M[f], last)]
        elif v == 3:
            names = [(last, f)]
        elif v == 4:
            names = [(_strip_accents(f), last), (f.upper(), last.upper())]
        elif v == 5:
            names = [(f.upper(), last), (NICKNAMES_M[f], last)]
        else:
            names = [(_strip_accents(f), last)]
        copies = [self._dup_ident(base, n, share) for n in names]
        other = _Adult("Father" if g == "f" else "Mother", "m" if g == "f" else "f")
        kids = self.kids()
        if v == 6:
            # the guide's case: the old record is inactive but still holds the authority;
            # the newer active one is what the parent registered with
            old = _Adult(role, g, active=False, user=False, ident=base)
            new = _Adult(role, g, ident=copies[0])
            self.household([old, new, other], kids)
            group = [old.cid, new.cid]
            for k in kids:
                self.expect("contact_inactive", "inactive duplicate holds authority",
                            patient_id=k.pid, contact_id=old.cid)
        else:
            main = _Adult(role, g, ident=base)
            extra = []
            for c in copies:
                if v == 1:
                    extra.append(_Adult("Other Relative", g, authority="None", ident=c))
                else:
                    extra.append(_Adult(role, g, active=False, on_kids=False, user=False,
                                        ident=c))
            self.household([main, other, *extra], kids)
            group = [main.cid] + [a.cid for a in extra]
        ids = tuple(sorted(group))
        self.expect("contact_duplicate", f"{len(ids)} records of one person",
                    contact_id=ids[0], contact_ids=ids)

    def _d_patient_inactive(self, v: int) -> None:
        """An Inactive child whose portal account is still active (and maybe linked)."""
        kid = _Kid(status="Inactive", user="active")
        if v % 2 == 0:
            adults = [_Adult("Mother", "f"), _Adult("Father", "m")]
            kids = [kid, _Kid()]
        else:
            adults = [_Adult("Mother", "f", links="none")]
            kids = [kid]
        self.household(adults, kids)
        self.expect("patient_inactive", "inactive patient with active portal user",
                    patient_id=kid.pid, portal_user_id=kid.uid)

    def _d_patient_email_present(self, v: int) -> None:
        """A dependent's chart holding a real email: a teen's, or a parent-patient's own."""
        if v % 2 == 0:
            kid = _Kid(chart_email="real")
            self.household([_Adult("Mother", "f"), _Adult("Father", "m")], [kid, *self.kids(0, 1)])
            pid = kid.pid
        else:
            parent = _Adult("Mother", "f", own="ok_email")
            self.household([parent, _Adult("Father", "m")], self.kids())
            pid = parent.own_pid
        self.expect("patient_email_present", "dependent chart has an email", patient_id=pid)

    def _d_portal_patient_email_not_dummy(self, v: int) -> None:
        """A child's portal account with a personal address, or a near-miss domain."""
        kid = _Kid(user_email="typo" if v % 2 else "real")
        mom = _Adult("Mother", "f")
        self.household([mom, _Adult("Father", "m")], [kid])
        self.expect("portal_patient_email_not_dummy", "patient user without @dummy.com",
                    patient_id=kid.pid, portal_user_id=kid.uid)

    def _d_portal_patient_role_invalid(self, v: int) -> None:
        """A child's portal account created with a role other than Patient."""
        kid = _Kid(user_role=("Caregiver", "Proxy")[v % 2])
        self.household([_Adult("Mother", "f"), _Adult("Father", "m")], [kid, *self.kids(0, 1)])
        self.expect("portal_patient_role_invalid", "patient user with wrong role",
                    patient_id=kid.pid, portal_user_id=kid.uid)

    def _d_caregiver_link_missing(self, v: int) -> None:
        """The portal lost one caregiver -> dependent link (a child, or the parent's own
        chart for a parent-patient)."""
        if v % 2 == 0:
            mom = _Adult("Mother", "f", links="miss_first")
            kids = self.kids()
            self.household([mom, _Adult("Father", "m")], kids)
            pid = kids[0].pid
        else:
            mom = _Adult("Mother", "f", own="ok", links="miss_own")
            self.household([mom, _Adult("Father", "m")], self.kids(1, 1))
            pid = mom.own_pid
        self.expect("caregiver_link_missing", "caregiver not linked to dependent",
                    patient_id=pid, contact_id=mom.cid,
                    portal_user_id=mom.uid)

    def _d_caregiver_link_stale(self, v: int) -> None:
        """Authority withdrawn (set to None on a grandparent) or the family contact
        removed (a former stepparent), while the portal still shows the child."""
        if v % 2 == 0:
            ex = _Adult("Grandmother", "f", authority="None", user=True, links="all", home=1)
        else:
            ex = _Adult("Stepfather", "m", on_kids=False, user=True, links="all", home=1)
        kids = self.kids()
        self.household([_Adult("Mother", "f"), ex], kids)
        for k in kids:
            self.expect("caregiver_link_stale", "link without authorization",
                        patient_id=k.pid, contact_id=ex.cid,
                        portal_user_id=ex.uid)

    def _d_welcome_not_sent(self, v: int) -> None:
        """Authorized, valid email, no account: never invited, invited too long ago, or
        invited at an old address."""
        dad = _Adult("Father", "m", user=False, welcome=("none", "old", "other")[v % 3])
        self.household([_Adult("Mother", "f"), dad], self.kids())
        self.expect("welcome_not_sent", "no account and no recent Welcome",
                    contact_id=dad.cid)

    def _d_portal_orphan_user(self, v: int) -> None:
        """Portal accounts pointing at OP records that are gone (merged or deleted)."""
        rng = self.rng
        g = rng.choice("fm")
        who = _Ident(self.first_name(g), self.last_name(), g, "", "", None)
        v %= 3
        if v == 0:
            ghost = Contact(self.cid(), who.first, who.last, self.email(who.first, who.last),
                            None, "", "", "", "", True)
            user = self.caregiver_user(ghost)
            what = f"deleted contact {ghost.contact_id}"
        elif v == 1:
            ghost_p = Patient(self.pid(), who.first, who.last, self.kid_dob(), "", "Active")
            user = self.patient_user(ghost_p)
            what = f"deleted patient {ghost_p.patient_id}"
        else:
            user = PortalUser(self.uid(), None, None, who.first, who.last,
                              self.email(who.first, who.last), "Caregiver", True, self.old())
            self.emit("portal_users", user)
            self.source(user.user_id)
            what = "no OP ids"
        self.expect("portal_orphan_user", f"portal user points to {what}",
                    portal_user_id=user.user_id)

    def _d_invalid_record(self, v: int) -> None:
        """Rows a reader must reject, written verbatim; the finding names file and line."""
        rng = self.rng
        v %= 5
        g = rng.choice("fm")
        first, last = self.first_name(g), self.last_name()
        when = self.old().isoformat()
        if v in (0, 1):
            pid = self.pid()
            row = {"patient_id": pid if v == 0 else "", "first_name": first, "last_name": last,
                   "dob": "2019-02-30" if v == 0 else self.kid_dob().isoformat(),
                   "email": "", "status": "Active", "updated_at": when}
            line = self.emit("patients", RawRow(row))
            self.expect("invalid_record", "bad dob" if v == 0 else "missing patient_id",
                        patient_id=pid if v == 0 else None, key_extra=f"patients.csv:{line}")
        elif v == 2:
            cid = self.cid()
            home = self.home()
            row = {"contact_id": cid, "first_name": first, "last_name": last,
                   "email": self.email(first, last), "dob": "1984-13-07",
                   "phone": self.phone(), "address": home.address, "city": home.city,
                   "postcode": home.postcode, "active": "true", "patient_id": "",
                   "updated_at": when}
            line = self.emit("contacts", RawRow(row))
            self.expect("invalid_record", "bad contact dob", contact_id=cid,
                        key_extra=f"contacts.csv:{line}")
        else:
            # an adult patient with an aunt whose family-contact row is unreadable; the
            # aunt has no other rows, so dropping the bad one changes nothing else
            pat, _ = self.adult_patient()
            aunt = self.contact(self.ident("f", dob=False), self.home())
            row = {"patient_id": pat.patient_id,
                   "contact_id": aunt.contact_id if v == 3 else "",
                   "role_reason": "Aunt", "authority": "Shared" if v == 3 else "None",
                   "updated_at": when}
            line = self.emit("family_contacts", RawRow(row))
            self.expect("invalid_record", "unknown authority" if v == 3 else "missing contact_id",
                        patient_id=pat.patient_id,
                        contact_id=aunt.contact_id if v == 3 else None,
                        key_extra=f"family_contacts.csv:{line}")

    def _d_recent_change(self, v: int) -> None:
        """Cross-system defects on records changed within the propagation delay: the
        portal may not show the change yet, so no finding is expected."""
        v %= 5
        if v == 0:
            mom = _Adult("Mother", "f", links="miss_first", recent_contact=True)
            self.household([mom, _Adult("Father", "m")], self.kids())
            check = "caregiver_link_missing"
        elif v == 1:
            # a parent added a few minutes ago: not invited yet
            dad = _Adult("Father", "m", user=False, welcome="none", recent_contact=True,
                         recent_fc=True)
            self.household([_Adult("Mother", "f"), dad], self.kids())
            check = "welcome_not_sent"
        elif v == 2:
            kid = _Kid(status="Inactive", user="active", recent=True)
            self.household([_Adult("Mother", "f")], [kid])
            check = "patient_inactive"
        elif v == 3:
            kid = _Kid(user_email="real", recent=True)
            self.household([_Adult("Mother", "f"), _Adult("Father", "m")], [kid])
            check = "portal_patient_email_not_dummy"
        else:
            # a grandparent's authority was withdrawn minutes ago; the link goes later
            ex = _Adult("Grandmother", "f", authority="None", user=True, links="all",
                        recent_fc=True, home=1)
            self.household([_Adult("Mother", "f"), ex], self.kids(1, 1))
            check = "caregiver_link_stale"
        self.suppressed[check] += 1


def _strip_accents(name: str) -> str:
    text = unicodedata.normalize("NFKD", name)
    return "".join(c for c in text if not unicodedata.combining(c))


DEFECT_KINDS: tuple[str, ...] = tuple(f.name for f in fields(DefectRates))
_RESERVE = 3  # most patients any defect household uses


def _defect_plan(patients: int, rates: DefectRates, rng: random.Random) -> list[tuple[str, int]]:
    households = max(1, patients // 2)
    floor = 1 if patients >= 100 else 0
    per_kind = {k: max(floor, round(getattr(rates, k) * households)) for k in DEFECT_KINDS}
    # Too many for the size asked: trim the biggest kinds first so every patient budget
    # still holds the worst case of what is planned.
    while sum(per_kind.values()) * _RESERVE > patients and any(per_kind.values()):
        biggest = max(per_kind, key=lambda k: (per_kind[k], k))
        per_kind[biggest] -= 1
    plan = [(k, i) for k in DEFECT_KINDS for i in range(per_kind[k])]
    rng.shuffle(plan)
    return plan


def _run(builder: _Builder, patients: int, flush: Any = None, every: int = 512) -> None:
    """Interleave defect households among clean ones until exactly `patients` exist."""
    if patients < 0:
        raise ValueError("patients must be >= 0")
    rng = builder.rng
    plan = _defect_plan(patients, builder.rates, rng)
    remaining = patients
    n = 0
    while remaining > 0 or plan:
        room = remaining - _RESERVE * len(plan)
        if plan and (room <= 0 or rng.random() * (len(plan) + room / 2.2) < len(plan)):
            kind, variant = plan.pop()
            remaining -= builder.defect(kind, variant)
        else:
            remaining -= builder.clean(room)
        n += 1
        if flush is not None and n % every == 0:
            flush()
    if remaining != 0:  # pragma: no cover - the reserve makes this impossible
        raise AssertionError(f"patient budget off by {remaining}")


def _resolve_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC).replace(microsecond=0)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(UTC)


def generate_records(patients: int, seed: int = 0, now: datetime | None = None,
                     rates: DefectRates | None = None) -> PracticeRecords:
    """The practice in memory, rows in file order (for tests, SQL and the simulator)."""
    now = _resolve_now(now)
    builder = _Builder(seed, now, rates or DefectRates())
    _run(builder, patients)
    return PracticeRecords(now, seed, builder.out, builder.findings, _stats(builder, patients))


def _stats(b: _Builder, patients: int) -> dict[str, Any]:
    return {
        "patients": patients,
        "findings": dict(sorted((k.split(":", 1)[1], v) for k, v in b.stats.items()
                                if k.startswith("finding:"))),
        "households": dict(sorted((k, v) for k, v in b.stats.items()
                                  if not k.startswith("finding:"))),
        "suppressed_recent": dict(sorted(b.suppressed.items())),
        "op_only_recent": dict(sorted(b.op_only_recent.items())),
    }


class _Spool:
    """Feeds one file's writer thread in batches (the writer takes a plain iterable)."""

    def __init__(self, path: Path, table: str) -> None:
        from worker.sources.csv_source import write_table_csv

        self.q: queue.Queue[list[Any] | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.count = 0

        def rows() -> Iterator[Any]:
            while True:
                batch = self.q.get()
                if batch is None:
                    return
                yield from batch

        def work() -> None:
            try:
                self.count = write_table_csv(path, table, rows())
            except BaseException as err:  # handed to the producer, which re-raises
                self.error = err
                while self.q.get() is not None:  # drain so the producer never blocks
                    pass

        self.thread = threading.Thread(target=work, name=f"gen-{table}", daemon=True)
        self.thread.start()

    def put(self, batch: list[Any] | None) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(batch, timeout=1.0)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise RuntimeError("CSV writer thread died") from self.error

    def close(self) -> int:
        if self.error is None:
            self.put(None)
        else:
            with contextlib.suppress(queue.Full):
                self.q.put_nowait(None)
        self.thread.join(timeout=60)
        if self.error is not None:
            raise self.error
        return self.count


def generate_practice(out_dir: Path, patients: int, seed: int = 0, now: datetime | None = None,
                      rates: DefectRates | None = None) -> GenerateResult:
    """Write `op/`, `portal/`, `manifest.jsonl` and `generator.json` under `out_dir`."""
    import time

    started = time.perf_counter()
    out_dir = Path(out_dir)
    now = _resolve_now(now)
    rates = rates or DefectRates()
    (out_dir / "op").mkdir(parents=True, exist_ok=True)
    (out_dir / "portal").mkdir(parents=True, exist_ok=True)
    builder = _Builder(seed, now, rates)
    spools = {t: _Spool(out_dir / ("op" if t in OP_LAYOUT else "portal") / f"{t}.csv", t)
              for t in TABLES}
    manifest = open(out_dir / "manifest.jsonl", "w", encoding="utf-8", newline="\n")  # noqa: SIM115

    def flush() -> None:
        for table, rows in builder.out.items():
            if rows:
                spools[table].put(rows)
                builder.out[table] = []
        if builder.findings:
            manifest.writelines(f.json_line() + "\n" for f in builder.findings)
            builder.findings = []

    try:
        _run(builder, patients, flush)
        flush()
    finally:
        manifest.close()
        counts = {t: s.close() for t, s in spools.items()}
    stats = _stats(builder, patients)
    info = {
        "seed": seed,
        "now": now.isoformat(),
        "patients": patients,
        "counts": counts,
        "rates": asdict(rates),
        **{k: v for k, v in stats.items() if k != "patients"},
    }
    (out_dir / "generator.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return GenerateResult(out_dir, seed, now, patients, counts, stats["findings"],
                          stats["suppressed_recent"], time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.devtools.generator",
                                     description="Write a synthetic practice and its manifest.")
    parser.add_argument("--patients", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--now", type=datetime.fromisoformat, default=None,
                        help="ISO time the practice is generated at (default: now, UTC)")
    args = parser.parse_args(argv)
    result = generate_practice(args.out, args.patients, args.seed, args.now)
    print(json.dumps({"out": str(result.out_dir), "patients": result.patients,
                      "rows": result.counts, "findings": sum(result.findings.values()),
                      "seconds": round(result.seconds, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
