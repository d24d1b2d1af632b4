"""Duplicate contacts: re-registrations of one parent, in groups of two or three, with
the noise front desks add; and household traps, which are NOT duplicates.

Why apart: the duplicate detector is the fuzziest check, so the variants it must catch
and the traps it must not fall into live together, next to nothing else. The variants
are no longer shaped by the matcher's rules (issue 15): on top of the kind of each
group (case, typo, nickname, swapped names, accents, an inactive old record), a copy
may carry a DOB typo or a day/month swap, a married name ("Smith-Doe") with the same
email and phone, a reformatted phone, or an email typed in capitals with spaces. The
traps (`trap_household`): spouses with similar names (Daniel/Danielle) sharing a home and
a landline, and a father and his adult son with one name at one address and landline,
their DOBs a generation apart (Jr written now and then). The manifest plants no finding
for a trap, so `tests/checks/test_scoring.py` measures the matcher on both.
"""

from __future__ import annotations

import unicodedata
from datetime import date, timedelta

from worker.devtools.generator.households import _Households
from worker.devtools.generator.people import _Adult, _Ident, _norm

# The nicknames duplicates.py knows for certain (DESIGN brief); formal name -> nickname.
NICKNAMES_F = {"Elizabeth": "Liz", "Katherine": "Kate"}
NICKNAMES_M = {"Robert": "Bob", "William": "Bill", "James": "Jim", "Michael": "Mike"}
ACCENTED_F = ("Zoë", "Renée", "Chloé", "Inés", "Noémie", "Hélène", "Mónica", "Léa")
ACCENTED_M = ("José", "André", "Jérôme", "Raúl", "Andrés", "Hernán", "Joël", "Rubén")
EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example.com")
AREA_CODES = ("212", "310", "415", "503", "512", "617", "702", "808", "919", "971")
_KEYBOARD = {
    "q": "wa", "w": "qes", "e": "wrd", "r": "etf", "t": "ryg", "y": "tuh", "u": "yij",
    "i": "uok", "o": "ipl", "p": "ol", "a": "qsz", "s": "adw", "d": "sfe", "f": "dgr",
    "g": "fht", "h": "gjy", "j": "hku", "k": "jli", "l": "ko", "z": "xa", "x": "zc",
    "c": "xv", "v": "cb", "b": "vn", "n": "bm", "m": "n",
}


def _strip_accents(name: str) -> str:
    text = unicodedata.normalize("NFKD", name)
    return "".join(c for c in text if not unicodedata.combining(c))


SIMILAR_SPOUSES = (("Danielle", "Daniel"), ("Erica", "Eric"), ("Paula", "Paul"),
                   ("Michelle", "Michael"), ("Carla", "Carl"), ("Frances", "Francis"),
                   ("Louise", "Louis"), ("Antonia", "Antonio"), ("Joelle", "Joel"),
                   ("Justine", "Justin"), ("Gabriela", "Gabriel"), ("Julia", "Julian"))


class _Duplicates(_Households):
    def _noise(self, copy: _Ident, base: _Ident, clean_email: bool, dob_typo: bool) -> _Ident:
        """What a second registration picks up at the desk (module docstring)."""
        rng = self.rng
        if copy.dob is not None and (dob_typo or rng.random() < 0.3):
            d = copy.dob
            if d.day <= 12 and d.day != d.month and rng.random() < 0.5:
                copy.dob = date(d.year, d.day, d.month)  # day and month swapped
            else:
                for _ in range(10):  # one digit of the day mistyped
                    day = (d.day % 10) + 10 * rng.choice([x for x in (0, 1, 2) if x != d.day // 10])
                    if 1 <= day <= 28:
                        copy.dob = date(d.year, d.month, day)
                        break
            self.mark_dob(copy.first, copy.last, copy.dob)
        if copy.phone == base.phone and rng.random() < 0.5:
            digits = "".join(ch for ch in copy.phone if ch.isdigit())
            copy.phone = f"{digits[:3]}.{digits[3:6]}.{digits[6:]}"
        if clean_email and copy.email == base.email and rng.random() < 0.3:
            copy.email = copy.email.upper()
        return copy

    def _married(self, base: _Ident) -> _Ident:
        """A married name: the same person, email and phone, a double last name."""
        last = f"{base.last}-{self.last_name()}"
        return _Ident(base.first, last, base.gender, base.email, base.phone, None)

    def _dup_ident(self, base: _Ident, name: tuple[str, str], share: str) -> _Ident:
        """A second record for the same person: other name spelling, some shared keys."""
        first, last = name
        # never blank: a blank email would let a shared address count as evidence
        # between this copy and the other adults of the household
        email = base.email if "email" in share else self.email(first, last)
        phone = base.phone if "phone" in share else self.phone()
        dob = base.dob if "dob" in share else None
        self.mark_dob(first, last, dob)
        return _Ident(first, last, base.gender, email, phone, dob)

    def _typo(self, name: str) -> str:
        """One letter swapped for a keyboard neighbour, never giving another real name
        (Karen/Karin are two people, not a typo)."""
        rng = self.rng
        for _ in range(20):
            i = rng.randrange(1, len(name) - 1)
            near = _KEYBOARD.get(name[i].lower(), "x")
            typo = name[:i] + rng.choice(near) + name[i + 1:]
            if _norm(typo) not in self.pools.first_norm:
                return typo
        return name[:1] + "x" + name[2:]  # pragma: no cover

    def _d_contact_duplicate(self, v: int) -> None:
        """Near-duplicate contact records of one parent, in groups of two or three."""
        rng = self.rng
        married = v % 14 in (2, 11)  # a married name in two groups of every fourteen
        dob_typo = v % 7 == 1  # the typo'd first name's copy also mistypes the DOB
        v %= 7
        g = "f" if v in (0, 1, 4) else "m"
        role = "Mother" if g == "f" else "Father"
        if v == 4:
            first = rng.choice(ACCENTED_F)
        elif v in (2, 5):
            first = rng.choice(tuple(NICKNAMES_M))
        elif v == 6:
            first = rng.choice(ACCENTED_M)
        else:
            first = rng.choice(self.pools.typo_f if g == "f" else self.pools.typo_m)
        share = ("email", "dob", "phone", "email+dob", "email", "phone", "email")[v]
        base = self.ident(g, first=first, dob="dob" in share)
        f, last = base.first, base.last
        if v == 0:
            names = [(f.upper(), last + " ")]
        elif v == 1:
            names = [(self._typo(f), last)]
        elif v == 2:
            names = [(NICKNAMES_M[f], last)]
        elif v == 3:
            names = [(last, f)]
        elif v == 4:
            names = [(_strip_accents(f), last), (f.upper(), last.upper())]
        elif v == 5:
            names = [(f.upper(), last), (NICKNAMES_M[f], last)]
        else:
            names = [(_strip_accents(f), last)]
        copies = [self._noise(self._dup_ident(base, n, share), base, v != 6, dob_typo)
                  for n in names]
        if married:
            copies[-1] = self._married(base)
        other = _Adult("Father" if g == "f" else "Mother", "m" if g == "f" else "f")
        kids = self.kids()
        if v == 6:
            # the guide's case: the old record is inactive but still holds the authority;
            # the newer active one is what the parent registered with
            old = _Adult(role, g, active=False, user=False, ident=base)
            new = _Adult(role, g, ident=copies[0])
            self.household([old, new, other], kids)
            group = [old.cid, new.cid]
            for k in kids:
                self.expect("contact_inactive", "inactive duplicate holds authority",
                            patient_id=k.pid, contact_id=old.cid)
        else:
            main = _Adult(role, g, ident=base)
            extra = []
            for c in copies:
                if v == 1:
                    extra.append(_Adult("Other Relative", g, authority="None", ident=c))
                else:
                    extra.append(_Adult(role, g, active=False, on_kids=False, user=False,
                                        ident=c))
            self.household([main, other, *extra], kids)
            group = [main.cid] + [a.cid for a in extra]
        ids = tuple(sorted(group))
        self.expect("contact_duplicate", f"{len(ids)} records of one person",
                    contact_id=ids[0], contact_ids=ids)

    # traps: not duplicates ------------------------------------------------------------

    def trap_household(self, kind: str, n_kids: int) -> int:
        """A clean household that looks like duplicates and is not (module docstring);
        returns its number of patients."""
        kids = self.kids(1, n_kids)
        rng = self.rng
        if kind == "similar_spouses":
            her, him = rng.choice(SIMILAR_SPOUSES)
            last = self.last_name()
            mom = _Adult("Mother", "f", ident=self.ident("f", last=last, first=her))
            dad = _Adult("Father", "m", ident=self.ident("m", last=last, first=him))
            assert dad.ident is not None and mom.ident is not None
            dad.ident.phone = mom.ident.phone  # the family landline
            self.household([mom, dad], kids)
            self.traps.append((kind, mom.cid, dad.cid))
        else:  # a father and his adult son, one name, one home and landline
            dad_ident = self.ident("m", dob=True)
            assert dad_ident.dob is not None
            dad_ident.dob = min(dad_ident.dob, self._today - timedelta(days=48 * 365))
            self.mark_dob(dad_ident.first, dad_ident.last, dad_ident.dob)
            born = dad_ident.dob + timedelta(days=rng.randint(21 * 365, 30 * 365))
            last = dad_ident.last + (" Jr." if rng.random() < 0.3 else "")
            son = _Ident(dad_ident.first, last, "m", self.email(dad_ident.first, last),
                         dad_ident.phone, born)
            self.mark_dob(son.first, son.last, born)
            dad = _Adult("Father", "m", ident=dad_ident)
            junior = _Adult("Other Relative", "m", authority="None", ident=son)
            self.household([dad, _Adult("Mother", "f"), junior], kids)
            self.traps.append((kind, dad.cid, junior.cid))
        self.stats[f"trap:{kind}"] += 1
        return len(kids)
