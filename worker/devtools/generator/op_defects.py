"""Defects planted in OP (the health record): authority, roles, emails, statuses, bad rows.

Why apart: each method plants one kind in an isolated household and states every
finding it must cause, so a reader can check one against docs/checks.md at a glance.
`recent_change` sits here too: cross-system defects on records changed in OP within
the propagation delay, for which no finding is expected.
"""

from __future__ import annotations

from worker.devtools.generator.builder import RawRow
from worker.devtools.generator.duplicates import _Duplicates
from worker.devtools.generator.people import _Adult, _Kid
from worker.model.findings import Action, Severity


class _OpDefects(_Duplicates):
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

    def _d_invalid_record(self, v: int) -> None:
        """Rows a reader must reject, written verbatim; the finding names file and line."""
        rng = self.rng
        v %= 5
        g = rng.choice("fm")
        first, last = self.first_name(g), self.last_name()
        when = self.old().isoformat()
        if v in (0, 1):
            # A row naming no id at all would make every absence from patients.csv
            # unknown (no orphan could be reported): the typo keeps the id readable.
            pid = self.pid()
            row = {"patient_id": pid, "first_name": first, "last_name": last,
                   "dob": "2019-02-30" if v == 0 else self.kid_dob().isoformat(),
                   "email": "", "status": "Active" if v == 0 else "Actve", "updated_at": when}
            line = self.emit("patients", RawRow(row))
            self.expect("invalid_record", "bad dob" if v == 0 else "bad status",
                        patient_id=pid, key_extra=f"patients.csv:{line}")
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

