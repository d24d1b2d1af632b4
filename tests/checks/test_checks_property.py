"""Property: no snapshot, however odd, makes a check crash or yield a malformed finding."""

from __future__ import annotations

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
    prints = [f.fingerprint for f in found]
    assert len(prints) == len(set(prints))
    for f in found:
        assert f.check in BY_ID and f.detail and "\n" not in f.detail
