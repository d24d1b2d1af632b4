"""Who lives in a generated practice: name pools, identities, and household specs.

Why apart: every planter draws people from here, and the pools decide what a duplicate
detector can and cannot confuse (see `_norm`), so the rules for names sit in one place.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from functools import lru_cache

from worker.model.records import Contact, Patient, PortalUser

EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example.com")
AREA_CODES = ("212", "310", "415", "503", "512", "617", "702", "808", "919", "971")
_ASCII_NAME = re.compile(r"[A-Za-z]+")
_LETTERS = re.compile(r"[^\W\d_]+")  # letters only, accents allowed: no spaces or hyphens


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

