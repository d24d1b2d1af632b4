"""Household rules: named reasons why a pair that scores like one person is NOT one.

Why on top of the weights: a family shares an address, a landline and often one email,
and parents name children after themselves. Fellegi–Sunter adds evidence up, so two
spouses with similar names (Daniel/Danielle) at one address with one family email score
as high as a re-registration. Staff merging two different parents is the worst outcome
of the Contact Manager step, so each rule below vetoes a pair outright:

- `different_given_names`: the first names are two different known given names, not
  forms of one name (Mary/Mark, John/Joan), or one name's forms for two sexes, known or
  not (Daniel/Danielle, Joel/Joelle, Mario/Maria: `compare.gender_variant`), and not
  first/last swapped
  - unless the DOB is identical, the last names alike and (on practice data) a personal
  email or phone shared too, or the home and first names a typo could link (Jaro-Winkler
  0.8 or more): then a typo or a mix-up that happens to make another real name,
  Dean/Dan, is far likelier than two people (twins at home are the price, and rare
  among parents). Two unlike names born the same day at one home (Jack/Chelsea) are a
  couple who share a birthday: at a million contacts there are dozens.
- `generation_apart`: both DOBs are known and 14 or more years apart, and not one
  typed digit apart (a parent and an adult child or grandparent with one name: Jr/Sr).
- `different_suffix`: both names carry a generational suffix and they differ (Jr/Sr).
- `family_contact_only`: the first names are not the same, the DOBs do not agree (or one
  is missing), and no email or phone of one person is shared, but a family's email or
  landline is: shared family contact details are weak evidence and never enough alone.
- `relative_at_home`: the first names are not the same (similar, or a nickname:
  Kathleen/Kathy, a grandmother Katelyn and a granddaughter Kaitlyn), the DOBs do not
  agree, and nothing of one person's (email, phone) is shared - only the home: a
  household, not a re-registration.
- `different_last_name`: the last names have nothing in common (not similar, not one
  inside the other, not swapped) and no email or phone of one person is shared: a
  married name keeps its owner's email or phone; without them, one first name and DOB
  is a coincidence among thousands of contacts.
- `no_name`: neither name can be compared (missing on one record or the other):
  whatever else is shared, staff could not tell who the person is.
- `name_only`: nothing but the names (and the town) agrees - no DOB within a typo, no
  email, phone or anything of the address: two people who share a name are commoner than a
  re-registration that changed everything else.

Practice data versus a bare list: `generation_apart`, `relative_at_home` and
`different_last_name` need an email or phone on either record. On a list with neither
(FEBRL), a different DOB, a similar first name at one address or a new last name is as
likely a mistyped field as another person, there is nothing to tell them apart, and the
weights decide.

`RULES` maps each rule to its one-line reason; `veto` returns, per pair, the index of
the first rule that applies (-1 for none). The first three say "two people": a group
never joins such a pair through a third record. The others say "not enough evidence for
one person", and a third record with better evidence may still link the two.
"""

from __future__ import annotations

import numpy as np
from rapidfuzz.distance import OSA

from worker.matching.columns import Columns
from worker.matching.compare import F_ADDR, F_DOB, F_EMAIL, F_FIRST, F_LAST, F_PHONE, Compared

GENERATION_YEARS = 14

RULES = {
    "different_given_names": "two different given names",
    "generation_apart": "dates of birth a generation apart",
    "different_suffix": "different generational suffixes (Jr/Sr)",
    "family_contact_only": "only a family's shared email or phone agrees",
    "relative_at_home": "different first names sharing only a home",
    "different_last_name": "different last names with no email or phone in common",
    "no_name": "no name to compare",
    "name_only": "only the name agrees",
}
RULE_NAMES = tuple(RULES)
# Rules that say "two people" (a group never joins such a pair through a third record),
# as against "not enough evidence for one" (a third record may still link them).
TWO_PEOPLE = frozenset({0, 1, 2})


def veto(cols: Columns, i: np.ndarray, j: np.ndarray, cmp: Compared) -> np.ndarray:
    """Per pair, the index in `RULE_NAMES` of the first rule that applies, else -1."""
    g = cmp.gamma
    out = np.full(len(i), -1, dtype=np.int8)
    first, last, dob = g[:, F_FIRST], g[:, F_LAST], g[:, F_DOB]
    email, phone = g[:, F_EMAIL], g[:, F_PHONE]

    fi, fj = cols.first[i], cols.first[j]
    known = np.zeros(len(i), dtype=bool)
    ok = (fi >= 0) & (fj >= 0)
    known[ok] = cols.name_known[fi[ok]] & cols.name_known[fj[ok]]
    practice = (cols.email[i] >= 0) | (cols.phone[i] >= 0) | (cols.email[j] >= 0) | (
        cols.phone[j] >= 0)
    nothing_personal = (dob < 2) & (email != 3) & (phone != 3)
    # A mistyped first name is not a relative: one edit from a known given name that is
    # itself no known name (Stephen/Stphen, Troy/Tror), with no DOB against it.
    typo = _first_name_typo(cols, fi, fj, first, known, dob)
    # Same DOB and last name: a typo that made another real name, unless practice data
    # shows nothing of one person's in common (then: twins, or strangers born one day),
    # or only the home with first names no typo links (a couple born the same day).
    identical_else = (dob == 3) & (last >= 1) & (
        ~practice | (email == 3) | (phone == 3) | ((g[:, F_ADDR] >= 2) & (first >= 1)))
    rules = [
        ((known & (fi != fj) & (first < 3) & ~cmp.related) | cmp.gendered) & ~cmp.swapped
        & ~identical_else,
        (cmp.years_apart >= GENERATION_YEARS) & (dob >= 0) & (dob <= 1) & practice,
        (cols.suffix[i] > 0) & (cols.suffix[j] > 0) & (cols.suffix[i] != cols.suffix[j]),
        (first < 4) & nothing_personal & ((email == 2) | (phone == 2)) & ~typo,
        (first < 4) & nothing_personal & (g[:, F_ADDR] >= 1) & practice & ~typo,
        (last == 0) & ~cmp.swapped & (email != 3) & (phone != 3) & practice,
        (first < 0) & (last < 0),
        (dob < 2) & (email < 1) & (phone < 1) & (g[:, F_ADDR] < 1),
    ]
    for pos in range(len(rules) - 1, -1, -1):
        out[rules[pos]] = pos
    return out


def _first_name_typo(cols: Columns, fi: np.ndarray, fj: np.ndarray, first: np.ndarray,
                     known: np.ndarray, dob: np.ndarray) -> np.ndarray:
    """Per pair: the first names are one edit (or one swap of neighbours) apart, exactly
    one of them is a known given name, and the DOBs do not disagree (missing, or within
    a typo). A name nobody is given, next to one everybody is, is a typing slip."""
    out = np.zeros(len(fi), dtype=bool)
    ok = (fi >= 0) & (fj >= 0)
    one_known = np.zeros(len(fi), dtype=bool)
    one_known[ok] = cols.name_known[fi[ok]] != cols.name_known[fj[ok]]
    maybe = np.flatnonzero(ok & one_known & ~known & (first >= 1) & (first <= 2) & (dob != 0))
    if not len(maybe):
        return out
    words = cols.name_words
    pairs = {(int(a), int(b)) for a, b in zip(fi[maybe], fj[maybe], strict=True)}
    slip = {(a, b) for a, b in pairs
            if min(len(words[a][0]), len(words[b][0])) >= 3
            and OSA.distance(words[a][0], words[b][0], score_cutoff=1) <= 1}
    out[maybe] = [(int(a), int(b)) in slip for a, b in zip(fi[maybe], fj[maybe], strict=True)]
    return out
