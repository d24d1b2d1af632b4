"""The finding: one problem with one set of records, keyed by a stable fingerprint.

The fingerprint is what makes the same problem seen in a hundred runs a single
finding, and what the generator's manifest is scored against, so it depends only on
the check id and the entity ids, never on wording or time.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    HIGH = "high"


class Action(enum.StrEnum):
    FIX = "fix"
    ALERT = "alert"
    NONE = "none"


class FixKind(enum.StrEnum):
    """The only portal changes oprecon ever makes: the ones the support guide allows."""

    SET_DUMMY_EMAIL = "set_dummy_email"
    REFRESH_SOURCE = "refresh_source"
    RESEND_WELCOME = "resend_welcome"


def fingerprint(
    check: str,
    patient_id: str | None = None,
    contact_id: str | None = None,
    portal_user_id: str | None = None,
    contact_ids: tuple[str, ...] | list[str] = (),
    extra: str = "",
) -> str:
    parts = [
        check,
        patient_id or "",
        contact_id or "",
        portal_user_id or "",
        ",".join(sorted(contact_ids)),
        extra,
    ]
    digest = hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]
    return f"{check}:{digest}"


@dataclass(slots=True, frozen=True)
class Finding:
    check: str
    severity: Severity
    action: Action
    detail: str
    patient_id: str | None = None
    contact_id: str | None = None
    portal_user_id: str | None = None
    contact_ids: tuple[str, ...] = ()
    fix: FixKind | None = None
    # True when the finding compares OP with the portal: the propagation rules apply.
    cross_system: bool = False
    # Disambiguates findings that share entity ids (e.g. two invalid rows of one file).
    key_extra: str = ""
    data: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint(
            self.check,
            self.patient_id,
            self.contact_id,
            self.portal_user_id,
            self.contact_ids,
            self.key_extra,
        )

    def to_json(self, **overrides: Any) -> dict[str, Any]:
        """The `--json` shape of DESIGN.md; `overrides` lets the planner set `action`."""
        out: dict[str, Any] = {
            "check": self.check,
            "severity": str(self.severity),
            "action": str(self.action),
            "fingerprint": self.fingerprint,
            "patient_id": self.patient_id,
            "contact_id": self.contact_id,
            "portal_user_id": self.portal_user_id,
            "detail": self.detail,
        }
        if self.check == "contact_duplicate":
            out["contact_ids"] = list(self.contact_ids)
        out.update(overrides)
        return out

    def json_line(self, **overrides: Any) -> str:
        return json.dumps(self.to_json(**overrides), sort_keys=False)

