"""The stable check ids and what each one defaults to (DESIGN.md, docs/checks.md).

Kept free of imports from the check modules so settings can validate policy keys
without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.model.findings import Action, FixKind, Severity


@dataclass(frozen=True, slots=True)
class CheckSpec:
    id: str
    title: str
    severity: Severity
    action: Action
    cross_system: bool
    fix: FixKind | None = None


SPECS: tuple[CheckSpec, ...] = (
    CheckSpec("authority_invalid", "Parent without portal authority",
              Severity.WARNING, Action.ALERT, False),
    CheckSpec("self_role", "Parent listed as Self on their own chart",
              Severity.WARNING, Action.ALERT, False),
    CheckSpec("self_dependent_missing", "Parent-patient cannot see their own chart",
              Severity.WARNING, Action.ALERT, False),
    CheckSpec("contact_email_invalid", "Authorized contact without a usable email",
              Severity.WARNING, Action.ALERT, False),
    CheckSpec("contact_inactive", "Authorized contact is inactive",
              Severity.WARNING, Action.ALERT, False),
    CheckSpec("contact_duplicate", "Duplicate contact records",
              Severity.WARNING, Action.ALERT, False),
    CheckSpec("patient_inactive", "Inactive patient still on the portal",
              Severity.WARNING, Action.ALERT, True),
    CheckSpec("patient_email_present", "Child's chart has a real email",
              Severity.WARNING, Action.ALERT, False),
    CheckSpec("portal_patient_email_not_dummy", "Portal patient user without a dummy email",
              Severity.WARNING, Action.FIX, True, FixKind.SET_DUMMY_EMAIL),
    CheckSpec("portal_patient_role_invalid", "Portal patient user with the wrong role",
              Severity.WARNING, Action.ALERT, True),
    CheckSpec("caregiver_link_missing", "Parent cannot see their child in the portal",
              Severity.WARNING, Action.FIX, True, FixKind.REFRESH_SOURCE),
    CheckSpec("caregiver_link_stale", "Portal shows a child to someone OP no longer authorizes",
              Severity.HIGH, Action.FIX, True, FixKind.REFRESH_SOURCE),
    CheckSpec("welcome_not_sent", "Welcome email never sent",
              Severity.INFO, Action.FIX, True, FixKind.RESEND_WELCOME),
    CheckSpec("portal_orphan_user", "Portal user with no matching OP record",
              Severity.WARNING, Action.ALERT, True),
    CheckSpec("invalid_record", "Source row that cannot be read",
              Severity.WARNING, Action.ALERT, False),
)

BY_ID: dict[str, CheckSpec] = {s.id: s for s in SPECS}
CHECK_IDS: tuple[str, ...] = tuple(BY_ID)
