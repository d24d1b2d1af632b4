"""Duplicate-contact detection: groups of contact records that are one person.

Why: the same parent entered twice breaks portal links, and an inactive contact is often
the stale half of such a pair (support guide). Staff search by last name, then email,
then DOB, and fix duplicates with *Merge Contacts*; this does that search for every
contact at once and returns *groups* (`contact_duplicate`). Inactive contacts are
included on purpose. Nothing here logs or raises with a name, email, phone or DOB.

The pipeline, one small module per step:

1. `normalise` / `columns`: each field in one normal form, as integer codes; an
   unreadable DOB or email is a missing field, never a dropped contact. Emails, phones
   and addresses held by more than `max_block` contacts are placeholders (a practice's
   front-desk email): missing, and counted.
2. `blocking`: several passes (email, phone, postcode + house number, DOB + either
   name's Soundex, both names' Soundex, ...) give the candidate pairs, each once.
3. `compare`: graded levels per field (names by Jaro-Winkler with nickname, middle or
   married-name and swap levels; DOB by digits and day/month swap; email and phone, with
   a family's shared value apart from one person's; address; city).
4. `fellegi_sunter`: m/u weights learned by EM on the practice's own pairs (no labels),
   term-frequency adjusted for common names; a pair is kept when its match probability
   reaches `threshold` (setting `duplicate_match_threshold`).
5. `household`: named rules that veto a kept pair (two different given names; DOBs a
   generation apart; Jr/Sr; only a family's email or landline agrees).
6. Groups: union-find over kept pairs, strongest first; a link that would put two
   conflicting DOBs, or a pair a rule calls two people, into one group is dropped.
   Each group reports the fields that agreed (`reasons`) and its weakest pair's
   probability (`score`).

Results do not depend on input order. `score_pair` scores one pair with the default
(untrained) weights, for tests and data generators.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from worker.matching import blocking, fellegi_sunter, household
from worker.matching.columns import Columns
from worker.matching.compare import (
    F_ADDR,
    F_DOB,
    F_EMAIL,
    F_FIRST,
    F_LAST,
    F_PHONE,
    Compared,
    compare,
)
from worker.matching.normalise import (  # re-exported: the public normal forms
    name_key,
    normalise_address,
    normalise_email,
    normalise_phone,
)
from worker.model.records import Contact

__all__ = [
    "DEFAULT_MAX_BLOCK", "DEFAULT_THRESHOLD", "DuplicateGroup", "DuplicateStats",
    "find_duplicate_groups", "name_key", "normalise_address", "normalise_email",
    "normalise_phone", "score_pair",
]

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.9
DEFAULT_MAX_BLOCK = 50


@dataclass(frozen=True, slots=True)
class DuplicateGroup:
    """Two or more contact records judged to be one person (one `contact_duplicate`)."""

    contact_ids: tuple[str, ...]
    score: float
    reasons: tuple[str, ...]


@dataclass(slots=True)
class DuplicateStats:
    """Counters of one run, for logs and the benchmark (no PHI, only numbers)."""

    contacts: int = 0
    comparisons: int = 0
    pairs: int = 0
    groups: int = 0
    placeholder_values: int = 0
    placeholder_contacts: int = 0
    oversized_blocks: int = 0
    conflicting_links: int = 0
    vetoed: dict[str, int] = field(default_factory=dict)
    prior: float = 0.0
    trained: bool = False
    # The parameters learned (an incremental scan scores with them: worker.matching.index).
    model: fellegi_sunter.Model | None = None


# -- reasons ------------------------------------------------------------------------------

_FIRST_REASONS = {4: "same first name", 2: "similar first name", 1: "similar first name"}
_LAST_REASONS = {4: "same last name", 3: "married or double last name",
                 2: "similar last name", 1: "similar last name"}
_DOB_REASONS = {3: "same date of birth", 2: "date of birth one typo apart",
                1: "date of birth two digits apart"}
_EMAIL_REASONS = {3: "same email", 2: "same family email", 1: "email one typo apart"}
_PHONE_REASONS = {3: "same phone", 2: "same family phone", 1: "phone one digit apart"}
_ADDR_REASONS = {3: "same address", 2: "same house number"}
REASON_ORDER = (
    "same first name", "nickname", "middle name", "similar first name",
    "first/last swapped", "same last name", "married or double last name",
    "similar last name", "same date of birth", "day and month swapped",
    "date of birth one typo apart", "date of birth two digits apart", "same email",
    "same family email", "email one typo apart", "same phone", "same family phone",
    "phone one digit apart", "same address", "same house number",
)


def _pair_reasons(cmp: Compared, k: int) -> set[str]:
    g = cmp.gamma[k]
    out: set[str] = set()
    first, last = int(g[F_FIRST]), int(g[F_LAST])
    tables: tuple[tuple[int, dict[int, str]], ...] = (
        (F_DOB, _DOB_REASONS), (F_EMAIL, _EMAIL_REASONS), (F_PHONE, _PHONE_REASONS),
        (F_ADDR, _ADDR_REASONS))
    if cmp.swapped[k]:
        out.add("first/last swapped")
        if min(first, last) < 4:
            out.add("similar last name" if first == 4 else "similar first name")
    else:
        if first == 3:
            out.add("nickname" if cmp.related[k] else "middle name")
        elif first in _FIRST_REASONS:
            out.add(_FIRST_REASONS[first])
        tables = ((F_LAST, _LAST_REASONS), *tables)
    for col, table in tables:
        level = int(g[col])
        if level in table:
            out.add(table[level])
    if cmp.dob_swap[k]:
        out.discard("date of birth one typo apart")
        out.add("day and month swapped")
    return out


def _ordered(reasons: set[str]) -> tuple[str, ...]:
    return tuple(r for r in REASON_ORDER if r in reasons)


# -- the public API -----------------------------------------------------------------------


def find_duplicate_groups(
    contacts: Iterable[Contact],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    max_block: int = DEFAULT_MAX_BLOCK,
    stats: DuplicateStats | None = None,
    focus: Collection[str] | None = None,
    on_columns: Callable[[Columns], None] | None = None,
) -> list[DuplicateGroup]:
    """Groups of contacts that are one person, by the pipeline of the module docstring.

    `focus` (contact ids), when given, returns only the groups holding one of them: the
    changed contacts of an incremental scan, compared with every contact through the
    same blocks and scored with weights learned from the same population.
    `on_columns` is given the normalised columns before placeholders are made missing
    (a full scan keeps their blocking keys: worker.matching.index).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError("threshold must be in (0, 1)")
    if max_block < 2:
        raise ValueError("max_block must be at least 2")
    st = stats if stats is not None else DuplicateStats()
    with _gc_paused():
        groups = _find(contacts, threshold, max_block, st, focus, on_columns)
    log.info(
        "duplicates: contacts=%d comparisons=%d pairs=%d groups=%d placeholder_values=%d "
        "placeholder_contacts=%d oversized_blocks=%d conflicting_links=%d vetoed=%s",
        st.contacts, st.comparisons, st.pairs, st.groups, st.placeholder_values,
        st.placeholder_contacts, st.oversized_blocks, st.conflicting_links,
        ",".join(f"{k}:{v}" for k, v in sorted(st.vetoed.items())) or "0",
    )
    return groups


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cycle collector: this code makes no cycles, and each full collection
    would re-walk every contact object the caller holds."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _find(
    contacts: Iterable[Contact], threshold: float, max_block: int, st: DuplicateStats,
    focus: Collection[str] | None, on_columns: Callable[[Columns], None] | None = None,
) -> list[DuplicateGroup]:
    cols = Columns(contacts)
    if on_columns is not None:
        on_columns(cols)
    st.contacts = cols.n
    for name in ("email", "phone", "addr"):
        cols.blank_common(name, max_block)
    st.placeholder_values, st.placeholder_contacts = (
        cols.placeholder_values, cols.placeholder_contacts)
    cand = blocking.candidates(cols, max_block)
    st.oversized_blocks = cand.oversized_blocks
    st.comparisons = len(cand.i)
    cmp = compare(cols, cand.i, cand.j)
    vetoes = household.veto(cols, cand.i, cand.j, cmp)
    model = fellegi_sunter.train(cols, cmp.gamma, cand.passes, vetoes < 0)
    st.prior, st.trained, st.model = model.prior, model.trained, model
    tf_first = fellegi_sunter.tf_bonus(cols, cols.first, model.u[F_FIRST, 4])
    tf_last = fellegi_sunter.tf_bonus(cols, cols.last, model.u[F_LAST, 4])
    weight = fellegi_sunter.weights(model, cmp.gamma, tf_first[cand.i], tf_last[cand.i])
    prob = fellegi_sunter.probability(weight)
    above = prob >= threshold
    for pos, rule in enumerate(household.RULE_NAMES):
        count = int((above & (vetoes == pos)).sum())
        if count:
            st.vetoed[rule] = count
    keep = np.flatnonzero(above & (vetoes < 0))
    # Vetoed pairs matter only where a group could join them: both ends in kept pairs.
    linked = np.zeros(cols.n, dtype=bool)
    linked[cand.i[keep]] = True
    linked[cand.j[keep]] = True
    two_people = np.isin(vetoes, list(household.TWO_PEOPLE))
    vetoed = np.flatnonzero(above & two_people & linked[cand.i] & linked[cand.j])
    blocked = {(int(a), int(b)) for a, b in zip(cand.i[vetoed], cand.j[vetoed], strict=True)}
    del weight, above, vetoes, linked, two_people
    groups = _group(cols, cand.i, cand.j, prob, keep, cmp, blocked, st)
    if focus is not None:
        wanted = set(focus)
        groups = [g for g in groups if not wanted.isdisjoint(g.contact_ids)]
    st.pairs = len(keep)
    st.groups = len(groups)
    return groups


def _dob_conflict(a: int, b: int) -> bool:
    """Two known DOBs that cannot be one person's (more than a typo or day/month swap)."""
    if a < 0 or b < 0 or a == b:
        return False
    sa, sb = f"{a:08d}", f"{b:08d}"
    if sa[:4] == sb[:4] and sa[4:6] == sb[6:] and sa[6:] == sb[4:6]:
        return False
    diff = [k for k in range(8) if sa[k] != sb[k]]
    if len(diff) == 1:
        return False
    return not (len(diff) == 2 and diff[1] == diff[0] + 1 and sa[diff[0]] == sb[diff[1]]
                and sa[diff[1]] == sb[diff[0]])


def _group(cols: Columns, ci: np.ndarray, cj: np.ndarray, prob: np.ndarray,
           keep: np.ndarray, cmp: Compared, blocked: set[tuple[int, int]],
           st: DuplicateStats) -> list[DuplicateGroup]:
    """Union-find over kept pairs, strongest first; never joins conflicting DOBs or a
    vetoed pair. A group's score is its weakest kept pair, its reasons their union."""
    ids = cols.ids
    dob = cols.dob
    order = sorted(keep.tolist(), key=lambda k: (-float(prob[k]), ids[int(ci[k])],
                                                 ids[int(cj[k])]))
    parent: dict[int, int] = {}
    members: dict[int, list[int]] = {}

    def find(x: int) -> int:
        root = x
        while (up := parent.get(root, root)) != root:
            root = up
        while x != root:
            parent[x], x = root, parent[x]
        return root

    matched = {(int(a), int(b)) for a, b in zip(ci[keep], cj[keep], strict=True)}
    kept: list[int] = []
    for k in order:
        a, b = int(ci[k]), int(cj[k])
        ra, rb = find(a), find(b)
        if ra != rb:
            ma, mb = members.get(ra, [ra]), members.get(rb, [rb])
            if any(
                (min(x, y), max(x, y)) in blocked
                or ((min(x, y), max(x, y)) not in matched
                    and _dob_conflict(int(dob[x]), int(dob[y])))
                for x in ma for y in mb
            ):
                st.conflicting_links += 1
                continue
            root, child = min(ra, rb), max(ra, rb)
            parent[child] = root
            members[root] = ma + mb
            members.pop(child, None)
        kept.append(k)
    weakest: dict[int, float] = {}
    reasons: dict[int, set[str]] = {}
    for k in kept:
        root = find(int(ci[k]))
        weakest[root] = min(weakest.get(root, 1.0), float(prob[k]))
        reasons.setdefault(root, set()).update(_pair_reasons(cmp, k))
    out = []
    for root, rows in members.items():
        contact_ids = tuple(sorted({ids[row] for row in rows}))
        if len(contact_ids) < 2:
            continue  # one id entered twice is the snapshot's business (invalid_record)
        out.append(DuplicateGroup(contact_ids, round(weakest[root], 4),
                                  _ordered(reasons[root])))
    out.sort(key=lambda g: g.contact_ids)
    return out


def score_pair(a: Contact, b: Contact) -> tuple[float, tuple[str, ...]]:
    """Match probability and agreeing fields of one pair with the default weights;
    (0.0, ()) when a household rule vetoes it. For tests and data generators."""
    cols = Columns((a, b))
    i, j = np.array([0]), np.array([1])
    cmp = compare(cols, i, j)
    model = fellegi_sunter.Model()
    zero = np.zeros(1)
    prob = float(fellegi_sunter.probability(fellegi_sunter.weights(model, cmp.gamma, zero,
                                                                   zero))[0])
    if household.veto(cols, i, j, cmp)[0] >= 0:
        return 0.0, ()
    return round(prob, 4), _ordered(_pair_reasons(cmp, 0))
