"""Duplicate contacts: near-identical records of one parent, in groups of two or three.

Why apart: the duplicate detector is the fuzziest check, so the variants it must catch
(case, typo, nickname, swapped names, accents, an inactive old record) and the name
tables they use live together, next to nothing else.
"""

from __future__ import annotations

import unicodedata

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


class _Duplicates(_Households):
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
        copies = [self._dup_ident(base, n, share) for n in names]
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
