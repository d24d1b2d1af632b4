"""Defects planted in the OP Portal: patient accounts, caregiver links, Welcome, orphans.

Why apart: the portal side is what the fixes touch, so its planted defects (and the
findings each must cause) are kept apart from the OP-side ones.
"""

from __future__ import annotations

from worker.devtools.generator.op_defects import _OpDefects
from worker.devtools.generator.people import _Adult, _Ident, _Kid
from worker.model.records import Contact, Patient, PortalUser


class _PortalDefects(_OpDefects):
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
