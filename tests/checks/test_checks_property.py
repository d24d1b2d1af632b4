"""Properties of the checks over odd snapshots: they never crash, every finding is well
formed, and what they find depends on the records, not on the order the rows came in
(exports are not sorted, and SQL, CSV and HTTP return rows in different orders)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.checks import CheckContext, run_checks
from worker.checks.catalog import BY_ID
from worker.model.records import (
    AuditEvent,
    Authority,
    CaregiverLink,
    Contact,
    FamilyContact,
    Patient,
    PortalSource,
    PortalUser,
)
from worker.model.snapshot import Snapshot

NOW = datetime(2026, 6, 1, tzinfo=UTC)
pids = st.sampled_from(["P1", "P2", "P3", "P4"])
cids = st.sampled_from(["C1", "C2", "C3", "C4"])
uids = st.sampled_from(["U1", "U2", "U3", "U4", "U5"])
text = st.text(max_size=12)
emails = st.one_of(text, st.sampled_from(["", "N/A", "a@b.org", "A@B.ORG", "x@dummy.com", "@@"]))
times = st.one_of(st.none(), st.integers(-100_000, 100).map(lambda m: NOW + timedelta(minutes=m)))
roles = st.one_of(text, st.sampled_from(["Mother", "father", "Self", " SELF ", "Other Relative"]))

patients = st.builds(Patient, patient_id=pids, first_name=text, last_name=text,
                     dob=st.none(), email=emails,
                     status=st.sampled_from(["Active", "Inactive", "active", "?"]),
                     updated_at=times)
contacts = st.builds(Contact, contact_id=cids, first_name=text, last_name=text, email=emails,
                     dob=st.none(), phone=text, address=text, city=text, postcode=text,
                     active=st.booleans(), patient_id=st.one_of(st.none(), pids),
                     updated_at=times)
fcs = st.builds(FamilyContact, patient_id=pids, contact_id=cids, role_reason=roles,
                authority=st.sampled_from(list(Authority)), updated_at=times)
users = st.builds(PortalUser, user_id=uids, op_patient_id=st.one_of(st.none(), pids),
                  op_contact_id=st.one_of(st.none(), cids), first_name=text, last_name=text,
                  email=emails, role=st.sampled_from(["Patient", "Caregiver", ""]),
                  active=st.booleans(), updated_at=times)
links = st.builds(CaregiverLink, caregiver_user_id=uids, dependent_user_id=uids)
audit = st.builds(AuditEvent, at=times.filter(lambda t: t is not None), action=st.sampled_from(
    ["Profile: Welcome Mail Sent", "Login"]), user_id=st.none(), email=emails)
records = st.lists(st.one_of(patients, contacts, fcs, users, links, audit), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_checks_never_crash(recs: list[object]) -> None:
    found = run_checks(CheckContext(Snapshot.build(recs), NOW))
    for f in found:
        assert f.check in BY_ID and f.detail and "\n" not in f.detail
        assert f.severity == BY_ID[f.check].severity or f.check in _SEVERITY_VARIES


# Checks whose severity depends on the case (a malformed email warns, a missing one informs).
_SEVERITY_VARIES = {"contact_email_invalid", "invalid_record", "caregiver_link_stale",
                    "welcome_not_sent", "portal_orphan_user"}


def _identity(record: object) -> tuple[object, ...]:
    """The key a source row is known by; two rows with one key are a different test
    (the first one wins, so their order matters by design)."""
    match record:
        case Patient():
            return ("patient", record.patient_id)
        case Contact():
            return ("contact", record.contact_id)
        case FamilyContact():
            return ("fc", record.patient_id, record.contact_id)
        case PortalUser():
            return ("user", record.user_id)
        case PortalSource():
            return ("source", record.user_id)
        case _:
            return ("row", id(record))


def _found(recs: list[object]) -> list[tuple[str, str, str]]:
    return sorted((f.check, f.fingerprint, f.detail)
                  for f in run_checks(CheckContext(Snapshot.build(recs), NOW)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.randoms(use_true_random=False))
def test_findings_do_not_depend_on_row_order(recs: list[object], rnd: random.Random) -> None:
    unique = list({_identity(r): r for r in reversed(recs)}.values())
    shuffled = list(unique)
    rnd.shuffle(shuffled)
    assert _found(shuffled) == _found(unique)
