"""Households: one from its specs (OP rows, then the portal), and the clean ones.

Why apart: every defect is planted as a household built here, and the clean households
are the practice's bulk; what "clean" means (no finding under docs/checks.md) is decided
in this file alone.
"""

from __future__ import annotations

from typing import Any

from worker.devtools.generator.builder import _Core
from worker.devtools.generator.people import _Adult, _Kid
from worker.model.records import Contact, Patient

TRAP_SHARE = 0.02  # of clean households: a duplicate-matcher trap (generator.duplicates)


class _Households(_Core):
    def trap_household(self, kind: str, n_kids: int) -> int:
        raise NotImplementedError  # generator.duplicates._Duplicates

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
        if budget >= 1 and r < TRAP_SHARE:  # looks like duplicates, is a family
            return self.trap_household(rng.choice(("similar_spouses", "father_and_son")),
                                       min(budget, 2))
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
