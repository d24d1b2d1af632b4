"""Each check on hand-made families: it fires on the defect and stays quiet on the
normal cases the design names (self-managing adults, relatives without authority)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from factory import (
    OLD,
    caregiver,
    clean_family,
    contact,
    fc,
    link,
    patient,
    patient_user,
    snap,
    source,
    welcome,
)

from worker.checks import CheckContext, run_checks
from worker.model.findings import Action, Severity
from worker.model.records import Authority, InvalidRecord

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def checks_of(*records: object, now: datetime = NOW) -> list[tuple[str, ...]]:
    found = run_checks(CheckContext(snap(*records), now))
    return sorted(
        (f.check, f.patient_id or "", f.contact_id or "", f.portal_user_id or "") for f in found
    )


def without(records: list[object], *drop: object) -> list[object]:
    return [r for r in records if r not in drop]


def test_clean_family_has_no_findings() -> None:
    assert checks_of(*clean_family()) == []


def test_normal_cases_are_not_findings() -> None:
    adult = [patient("A1", email="adult@example.org"), contact("CA", patient_id="A1"),
             fc("A1", "CA", role="Self")]
    grandma = [contact("G1"), fc("P1", "G1", role="Other Relative", authority=Authority.NONE)]
    assert checks_of(*clean_family(), *adult, *grandma) == []


@pytest.mark.parametrize("authority", [Authority.NONE])
@pytest.mark.parametrize("role", ["Father", " legal  GUARDIAN ", "stepmother"])
def test_authority_invalid_for_parent_roles(role: str, authority: Authority) -> None:
    records = [*clean_family(), contact("C2"), fc("P1", "C2", role=role, authority=authority)]
    assert ("authority_invalid", "P1", "C2", "") in checks_of(*records)


def test_authority_invalid_needs_an_email_and_a_parent_role() -> None:
    no_email = [contact("C2", email=""), fc("P1", "C2", role="Father", authority=Authority.NONE)]
    aunt = [contact("C3"), fc("P1", "C3", role="Aunt", authority=Authority.NONE)]
    assert checks_of(*clean_family(), *no_email, *aunt) == []


def test_self_role_and_self_dependent_missing() -> None:
    # C1 is the mother of P1 and a patient herself (chart M1).
    base = clean_family()
    mother = contact("C1", patient_id="M1")
    records = [*without(base, base[1]), mother, patient("M1", email="")]
    assert ("self_dependent_missing", "M1", "C1", "") in checks_of(*records)
    with_self = [*records, fc("M1", "C1", role="Self")]
    assert ("self_role", "M1", "C1", "") in checks_of(*with_self)
    fixed = [*records, fc("M1", "C1", role="Other Relative")]
    assert checks_of(*fixed) == []
    no_authority = [*records, fc("M1", "C1", role="Other Relative", authority=Authority.NONE)]
    assert ("self_dependent_missing", "M1", "C1", "") in checks_of(*no_authority)


def test_a_self_row_means_the_contact_is_that_patient_whatever_the_contact_says() -> None:
    """The guide: a parent who is also a patient and "already has an entry in their own
    Family Contacts with the Role/Reason listed as Self" gets no Welcome email. The
    Self row is what says the chart is theirs; `contacts.patient_id` may be blank or
    name another chart."""
    base = clean_family()  # C1: Joint mother of P1, with a portal account
    blank = [*base, patient("M1", email=""), fc("M1", "C1", role="Self")]
    assert ("self_role", "M1", "C1", "") in checks_of(*blank)
    # The contact record names chart M2 (where she is rightly Other Relative + Joint),
    # but chart M1 lists her as Self too: that row still blocks her Welcome email.
    other = [*without(base, base[1]), contact("C1", patient_id="M2"), patient("M2"),
             fc("M2", "C1", role="Other Relative"), patient("M1"), fc("M1", "C1", role="Self")]
    found = checks_of(*other)
    assert ("self_role", "M1", "C1", "") in found
    assert not any(c == "self_dependent_missing" for c, *_ in found)
    # Without an account, the Welcome email cannot go out: an alert, never a resend.
    no_account = [patient("P8"), contact("C8"), fc("P8", "C8"), patient("M8"),
                  fc("M8", "C8", role="self")]
    by_check = {x.check: x for x in run_checks(CheckContext(snap(*no_account), NOW))}
    assert by_check["self_role"].patient_id == "M8"
    assert by_check["welcome_not_sent"].action is Action.ALERT


def test_a_link_to_a_deleted_contact_is_a_stale_link() -> None:
    """OP no longer has the caregiver's contact (deleted or merged away) but the portal
    still shows them the child: the privacy problem of a stale link, high severity."""
    base = clean_family()
    gone = without(base, base[1], base[2])  # contact C1 and its family-contact row
    found = {x.check: x for x in run_checks(CheckContext(snap(*gone), NOW))}
    stale = found["caregiver_link_stale"]
    assert (stale.patient_id, stale.contact_id, stale.portal_user_id) == ("P1", "C1", "U1")
    assert stale.severity is Severity.HIGH and stale.action is Action.FIX
    assert "portal_orphan_user" in found  # the account itself still needs removing
    # A contacts row that could not be read is unknown, not deleted: no conclusion.
    unreadable = InvalidRecord("contacts.csv", 3, "bad dob 1984-13-07", contact_id="C1")
    assert not any(x.check == "caregiver_link_stale"
                   for x in run_checks(CheckContext(snap(*gone, unreadable), NOW)))


def test_a_link_to_a_deleted_patient_is_a_stale_link() -> None:
    """OP no longer has the child's chart (deleted or merged away) but the portal still
    links the parent to the child's account: OP authorizes nobody for a chart it does not
    have, so it is the same privacy problem as a deleted contact's link (guide: the
    parent's source refresh resyncs their dependents from OP)."""
    base = clean_family()
    gone = without(base, base[0], base[2])  # patient P1 and its family-contact row
    found = {x.check: x for x in run_checks(CheckContext(snap(*gone), NOW))}
    stale = found["caregiver_link_stale"]
    assert (stale.patient_id, stale.contact_id, stale.portal_user_id) == ("P1", "C1", "U1")
    assert stale.severity is Severity.HIGH and stale.action is Action.FIX
    assert "dependent user U2" in stale.detail and "no longer exists" in stale.detail
    assert found["portal_orphan_user"].portal_user_id == "U2"  # the account still needs removing
    # Unknown is not absent: a patients row naming P1 that could not be read, or one
    # whose id could not be read at all, may be that very chart.
    for unreadable in (InvalidRecord("patients.csv", 2, "bad dob", patient_id="P1",
                                     table="patients"),
                       InvalidRecord("patients.csv", 2, "bad patient_id", table="patients")):
        assert not any(x.check == "caregiver_link_stale"
                       for x in run_checks(CheckContext(snap(*gone, unreadable), NOW)))
    # Another chart's unreadable row says nothing about P1.
    other = InvalidRecord("patients.csv", 2, "bad dob", patient_id="P9", table="patients")
    assert "caregiver_link_stale" in {
        x.check for x in run_checks(CheckContext(snap(*gone, other), NOW))}


def test_contact_email_invalid_blank_is_info_malformed_is_warning() -> None:
    blank = [patient("P5"), contact("C5", email=""), fc("P5", "C5")]
    bad = [patient("P6"), contact("C6", email="mom@@example"), fc("P6", "C6")]
    found = {f.contact_id: f for f in run_checks(CheckContext(snap(*blank, *bad), NOW))
             if f.check == "contact_email_invalid"}
    assert found["C5"].severity is Severity.INFO
    assert found["C6"].severity is Severity.WARNING


def test_contact_inactive() -> None:
    base = clean_family()
    records = [*without(base, base[1]), contact("C1", active=False)]
    found = checks_of(*records)
    assert ("contact_inactive", "P1", "C1", "") in found
    # The link to P1 is no longer backed by an authorized contact: a privacy finding too.
    assert ("caregiver_link_stale", "P1", "C1", "U1") in found


def test_patient_inactive_and_nothing_else_for_that_child() -> None:
    base = clean_family()
    records = [*without(base, base[0]), patient("P1", status="Inactive")]
    assert checks_of(*records) == [("patient_inactive", "P1", "", "U2")]


def test_patient_email_present_only_on_dependents() -> None:
    base = clean_family()
    records = [*without(base, base[0]), patient("P1", email="kid@example.org")]
    assert ("patient_email_present", "P1", "", "") in checks_of(*records)
    for harmless in ("", "N/A", " n/a "):
        records = [*without(base, base[0]), patient("P1", email=harmless)]
        assert checks_of(*records) == []


def test_portal_patient_user_email_and_role() -> None:
    base = clean_family()
    upper = [*without(base, base[4]), patient_user("U2", "P1", email="kid@DUMMY.COM")]
    assert checks_of(*upper) == []
    real = [*without(base, base[4]), patient_user("U2", "P1", email="kid@gmail.com")]
    assert checks_of(*real) == [("portal_patient_email_not_dummy", "P1", "", "U2")]
    role = [*without(base, base[4]), patient_user("U2", "P1", role="Caregiver")]
    assert checks_of(*role) == [("portal_patient_role_invalid", "P1", "", "U2")]


def test_caregiver_link_missing_and_stale() -> None:
    base = clean_family()
    missing = without(base, base[5])
    f = [x for x in run_checks(CheckContext(snap(*missing), NOW))]
    assert [(x.check, x.action) for x in f] == [("caregiver_link_missing", Action.FIX)]
    stale = [*without(base, base[2]), fc("P1", "C1", role="Mother", authority=Authority.NONE)]
    found = run_checks(CheckContext(snap(*stale), NOW))
    stale_f = [x for x in found if x.check == "caregiver_link_stale"]
    assert stale_f and stale_f[0].severity is Severity.HIGH
    assert ("authority_invalid", "P1", "C1", "") in checks_of(*stale)


def test_welcome_not_sent_window() -> None:
    invited = [patient("P7"), contact("C7"), fc("P7", "C7")]
    assert ("welcome_not_sent", "", "C7", "") in checks_of(*invited)
    recent = [*invited, welcome("C7@example.org", at=NOW - timedelta(days=6, hours=23))]
    assert checks_of(*recent) == []
    old = [*invited, welcome("c7@example.org", at=NOW - timedelta(days=7, seconds=1))]
    assert ("welcome_not_sent", "", "C7", "") in checks_of(*old)


def test_welcome_blocked_by_self_role_is_an_alert() -> None:
    records = [patient("P8"), patient("M8"), contact("C8", patient_id="M8"), fc("P8", "C8"),
               fc("M8", "C8", role="Self")]
    found = {x.check: x for x in run_checks(CheckContext(snap(*records), NOW))}
    assert found["welcome_not_sent"].action is Action.ALERT
    assert "self_role" in found


def test_portal_orphan_user() -> None:
    records = [*clean_family(), caregiver("U9", "C404"), source("U9")]
    assert ("portal_orphan_user", "", "", "U9") in checks_of(*records)


def test_link_to_unknown_user_is_invalid_record() -> None:
    records = [*clean_family(), link("U1", "U404")]
    assert ("invalid_record", "", "", "U1") in checks_of(*records)


def test_cross_system_checks_wait_for_recent_op_changes() -> None:
    """14:59 after a change: not compared yet; 15:00: compared."""
    changed = NOW - timedelta(minutes=14, seconds=59)
    base = clean_family()
    records = [*without(base, base[5], base[1]), contact("C1", updated_at=changed)]
    assert checks_of(*records) == []
    assert checks_of(*records, now=NOW + timedelta(seconds=1)) == [
        ("caregiver_link_missing", "P1", "C1", "U1")
    ]


def test_op_only_checks_run_on_recent_changes() -> None:
    changed = NOW - timedelta(minutes=1)
    records = [patient("P3", email="kid@example.org", updated_at=changed), contact("C3"),
               fc("P3", "C3", updated_at=changed), welcome("c3@example.org", at=OLD)]
    found = checks_of(*records)
    assert ("patient_email_present", "P3", "", "") in found
    assert not any(c == "welcome_not_sent" for c, *_ in found)
