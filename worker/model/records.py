"""Record types read from OP and the portal.

Plain, slotted, frozen dataclasses: a large practice holds hundreds of thousands of
them in memory at once, and checks must never mutate what a source returned.
Ids are strings everywhere, because both systems hand them to us as text.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache


class Authority(enum.Enum):
    """Family-contact authority; only Joint and Exclusive grant portal access."""

    JOINT = "Joint"
    EXCLUSIVE = "Exclusive"
    NONE = "None"

    @property
    def grants_access(self) -> bool:
        return self is not Authority.NONE


PARENT_ROLES = frozenset(
    {
        "mother",
        "father",
        "parent",
        "guardian",
        "legal guardian",
        "stepmother",
        "stepfather",
        "foster parent",
    }
)
SELF_ROLE = "self"
WELCOME_ACTION = "Profile: Welcome Mail Sent"
PATIENT_ROLE = "Patient"
DUMMY_DOMAIN = "dummy.com"


# One plain address: a dot-atom local part, "@", the domain. Whatever else an email field
# holds (a list, a display name, a second address after a space) is not a dummy address.
_DUMMY = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                    r"@dummy\.com", re.IGNORECASE)


def is_dummy_email(email: str) -> bool:
    """Exactly one address whose domain is dummy.com (any case): the whole value is
    parsed, so `real@gmail.com,x@dummy.com` or `real@gmail.com x@dummy.com` are not."""
    return _DUMMY.fullmatch(email.strip()) is not None


@lru_cache(maxsize=4096)
def norm_role(role: str) -> str:
    """Memoised: a practice has a handful of distinct roles, and a full scan asks some
    800,000 times at 100,000 patients."""
    return " ".join(role.split()).lower()


@dataclass(slots=True, frozen=True)
class Patient:
    patient_id: str
    first_name: str
    last_name: str
    dob: date | None
    email: str
    status: str
    updated_at: datetime | None = None

    @property
    def active(self) -> bool:
        # The parsers write "Active" exactly; the general test is for hand-made records.
        status = self.status
        return status == "Active" or status.strip().lower() == "active"

    @property
    def has_real_email(self) -> bool:
        """A child's chart may only hold a blank email or the literal N/A."""
        value = self.email.strip()
        return bool(value) and value.upper() not in {"N/A", "NA"}


@dataclass(slots=True, frozen=True)
class Contact:
    contact_id: str
    first_name: str
    last_name: str
    email: str
    dob: date | None
    phone: str
    address: str
    city: str
    postcode: str
    active: bool
    patient_id: str | None = None
    updated_at: datetime | None = None
    # A DOB the source could not read (month 13): the contact is kept without it, the
    # text is kept for duplicate matching (its digits), and `invalid` is the
    # `invalid_record` the row still raises. Issue 15: a bad field is missing, not the
    # whole record.
    dob_text: str = ""
    invalid: InvalidRecord | None = field(default=None, compare=False, hash=False)


@dataclass(slots=True, frozen=True)
class FamilyContact:
    patient_id: str
    contact_id: str
    role_reason: str
    authority: Authority
    updated_at: datetime | None = None

    @property
    def role(self) -> str:
        return norm_role(self.role_reason)

    @property
    def is_self(self) -> bool:
        return self.role == SELF_ROLE

    @property
    def is_parent_role(self) -> bool:
        return self.role in PARENT_ROLES


@dataclass(slots=True, frozen=True)
class PortalUser:
    user_id: str
    op_patient_id: str | None
    op_contact_id: str | None
    first_name: str
    last_name: str
    email: str
    role: str
    active: bool
    updated_at: datetime | None = None

    @property
    def has_dummy_email(self) -> bool:
        return is_dummy_email(self.email)


@dataclass(slots=True, frozen=True)
class CaregiverLink:
    caregiver_user_id: str
    dependent_user_id: str
    created_at: datetime | None = None


@dataclass(slots=True, frozen=True)
class PortalSource:
    user_id: str
    status: str
    last_sync_at: datetime | None = None


@dataclass(slots=True, frozen=True)
class AuditEvent:
    at: datetime
    action: str
    user_id: str | None
    email: str


@dataclass(slots=True, frozen=True)
class InvalidRecord:
    """A source row we could not parse. It becomes an `invalid_record` finding.

    With `table` set (the layout the row belongs to), what the row describes becomes
    *unknown* for the run (worker.model.snapshot): its absence proves nothing. `rows`
    counts the rows it stands for (an unterminated quote swallows many), and
    `recovered` holds the ids found in those swallowed rows, as
    (patient_id, contact_id, portal_user_id, dependent_user_id).
    """

    source: str  # file or table name, e.g. "patients.csv"
    line: int | None  # 1-based physical line in a file (header is line 1); row number for SQL
    reason: str
    patient_id: str | None = None
    contact_id: str | None = None
    portal_user_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    table: str | None = field(default=None, compare=False, hash=False)
    rows: int = field(default=1, compare=False, hash=False)
    recovered: tuple[tuple[str | None, str | None, str | None, str | None], ...] = field(
        default=(), compare=False, hash=False)


OPRecord = Patient | Contact | FamilyContact
PortalRecord = PortalUser | CaregiverLink | PortalSource | AuditEvent
