"""The matcher before issue 15 (worker/matching/duplicates.py at 7106c82), kept only so
the benchmark can show old and new side by side. Not used by the worker.

Why: the same parent entered twice breaks portal links, and an inactive contact is often
the stale half of such a pair (support guide). Staff look for duplicates by last name,
then email, then DOB, and fix them with *Merge Contacts*; this module does that search
for every contact at once and returns *groups* (`contact_duplicate`). Inactive contacts
are included on purpose. Nothing here logs or raises with a name, email, phone or DOB.

Normalisation (what "equal" means below)
- name: casefolded, accents stripped (NFKD), punctuation and spaces dropped for the
  comparison: "O'Brien" = "obrien", "Mary-Jo" = "Mary Jo" = "MARYJO", "José" = "Jose".
  A trailing generational suffix (Jr, Sr, II, III, IV, 2nd, 3rd) is split off; two
  records whose suffixes differ (including one without) are never one person.
- email: trimmed, casefolded; for gmail.com/googlemail.com dots and a "+tag" in the local
  part are ignored. Ignored altogether: no "@", a placeholder local part (noemail, none,
  na, n/a, unknown, declined, ...: `_PLACEHOLDER_LOCALS`), the portal's dummy.com domain.
- phone: digits only, an extension after "x" dropped, last 10 digits kept; fewer than 7
  digits, one repeated digit, 1234567890 or 0123456789 is ignored.
- DOB: a year of 1900 or earlier is ignored.
- address: address + postcode together (both needed). Casefolded, accents and punctuation
  ("#" too) dropped, unit words (apt, apartment, unit, suite, ste, flat, no, number)
  dropped, street words abbreviated as in `_STREET_WORDS` (Street->st, Avenue->ave,
  North->n, ...); postcode upper-case without spaces, ZIP+4 cut to 5 digits. City is
  not used.
- placeholder: an email, phone or address shared by more than `max_block` (default 50)
  contacts, or a DOB shared by more than max(`max_block`, 10 x the mean per DOB), is a
  placeholder (a practice address, "0000000000"...): it neither blocks nor counts as
  evidence, and `DuplicateStats.placeholder_values` counts it.

A pair is one person when its names agree, its DOBs do not conflict, it has evidence,
and its score reaches `threshold`.

Names agree - exactly one of these perturbations (F first name, L last name, both
non-empty on both records). Each: weight, reason, rule.

- same name, 1.00, "same name": F equal and L equal (so case, whitespace, punctuation
  and accent changes are all "same name").
- nickname, 0.95, "nickname": L equal; the two F are forms of one name in
  `worker.matching.nicknames` (Bob/Robert, Liz/Elizabeth, Bob/Rob, spelling variants Sara/Sarah).
- swapped, 0.95, "first/last swapped": F1 = L2 and L1 = F2.
- middle name, 0.90, "middle name": L equal; one F is a single word equal to the other
  F's first word, at least 2 letters ("Mary" / "Mary Ann").
- first name typo, 0.90 (1 edit) or 0.85 (2 edits), "first name typo": L equal; F at
  most 1 edit apart when the longer F has <= 5 letters, at most 2 edits otherwise
  (Damerau-Levenshtein: insert, delete, substitute, swap two adjacent letters); both F >= 3
  letters; and NOT when both F are different names in `nicknames.KNOWN_GIVEN_NAMES`
  (Mary/Mark, Emma/Ella are two people).
- last name typo, 0.85, "last name typo": F equal; L exactly 1 edit apart, both L
  with >= 4 letters.

Two perturbations at once (a typo in a nickname, swapped and misspelt, a typo in both
names) are not detected.

DOB conflict: both DOBs present and different -> never a duplicate (mother and daughter,
father and son with one name).

Evidence - at least one identifier agrees:

    same email            0.90    "same email"
    same date of birth    0.95    "same date of birth"
    same phone            0.90    "same phone"
    same address          0.85    "same address"   only with "same name" or "first/last
                                                   swapped" (never nickname, middle name or
                                                   a typo: households share addresses and
                                                   name children after parents), and not
                                                   when both emails and both phones are
                                                   present and differ

evidence = 1 - product(1 - weight); score = name weight x evidence; the pair is accepted
when score >= `threshold` (default 0.75). At the default every name kind qualifies with
any single identifier allowed for it (the lowest, a 2-edit typo with only an email or
only a phone, scores 0.765).

Deliberately not duplicates: one last name and address but different first names (a
family); a shared email or phone with different first names (families share both); two
people with one common name and nothing else shared; one name with different DOBs; two
different known given names one letter apart.

Groups: union-find over accepted pairs, strongest first; a link that would put two
different DOBs into one group (a DOB-less record matching both a father and his
same-named son) is dropped. A group's score is its weakest kept pair, its reasons the
union over its kept pairs. Ids are sorted as plain strings; groups are ordered by their
first id. The result does not depend on the input order.

Cost: a pair is compared only when it shares an email, a phone, an address, or a DOB
together with a first or last name (as either). Every pair the rules can accept shares
one of those, so blocking loses nothing but placeholders (and a DOB + name block of more
than `max_block` records, counted in `oversized_blocks`); the work is close to linear.

For data generators: a detectable duplicate is a copy of a contact with exactly one name
perturbation from the table above, at least one identifier from the evidence table equal
after normalisation (the address only with the same or swapped names, and with its email
or phone blank or unchanged), the same generational suffix, and either the same DOB or
none. `score_pair` says whether a given pair is detected (placeholder detection aside,
which needs the whole population).
"""

from __future__ import annotations

import gc
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date

from rapidfuzz.distance import DamerauLevenshtein

from worker.matching import nicknames
from worker.model.records import Contact

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.75
DEFAULT_MAX_BLOCK = 50

# Name weights.
W_SAME, W_NICK, W_SWAP, W_MIDDLE = 1.0, 0.95, 0.95, 0.90
W_TYPO1, W_TYPO2, W_LAST_TYPO = 0.90, 0.85, 0.85
# Evidence weights, stored as the miss probability 1 - weight.
_MISS_EMAIL, _MISS_DOB, _MISS_PHONE, _MISS_ADDR = 0.10, 0.05, 0.10, 0.15

# Reason bits, in the order reasons are reported.
_R_SAME, _R_NICK, _R_SWAP, _R_MIDDLE, _R_TYPO, _R_LAST_TYPO = 1, 2, 4, 8, 16, 32
_R_EMAIL, _R_DOB, _R_PHONE, _R_ADDR = 64, 128, 256, 512
_REASONS = (
    (_R_SAME, "same name"),
    (_R_NICK, "nickname"),
    (_R_SWAP, "first/last swapped"),
    (_R_MIDDLE, "middle name"),
    (_R_TYPO, "first name typo"),
    (_R_LAST_TYPO, "last name typo"),
    (_R_EMAIL, "same email"),
    (_R_DOB, "same date of birth"),
    (_R_PHONE, "same phone"),
    (_R_ADDR, "same address"),
)
# Households share an address, and name children after parents with nicknames and
# middle names: the address only counts when both names are the same words.
_ADDRESS_NAME_KINDS = _R_SAME | _R_SWAP

_GMAIL = frozenset({"gmail.com", "googlemail.com"})
_PLACEHOLDER_LOCALS = frozenset(
    {
        "noemail", "no-email", "no_email", "nomail", "none", "na", "n/a", "no", "null",
        "unknown", "declined", "refused", "noreply", "no-reply", "donotreply",
        "do-not-reply", "test", "email", "mail",
    }
)
_PLACEHOLDER_DOMAINS = frozenset({"dummy.com"})
_PLACEHOLDER_PHONES = frozenset({"1234567890", "0123456789"})

_WORD = re.compile(r"[^\W_]+")
_SUFFIXES = frozenset({"jr", "sr", "ii", "iii", "iv", "2nd", "3rd"})
_NON_DIGIT = re.compile(r"[^0-9]+")
_UNIT_WORDS = frozenset({"apt", "apartment", "unit", "suite", "ste", "no", "number", "flat"})
_STREET_WORDS = {
    "street": "st", "avenue": "ave", "av": "ave", "road": "rd", "drive": "dr",
    "lane": "ln", "court": "ct", "boulevard": "blvd", "place": "pl", "terrace": "ter",
    "circle": "cir", "parkway": "pkwy", "highway": "hwy", "square": "sq", "trail": "trl",
    "way": "wy", "north": "n", "south": "s", "east": "e", "west": "w",
    "northeast": "ne", "northwest": "nw", "southeast": "se", "southwest": "sw",
    "mount": "mt", "fort": "ft", "saint": "st", "crescent": "cres", "close": "cl",
}


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


# -- normalisation ------------------------------------------------------------------------


def _fold(raw: str) -> str:
    """Casefold and strip accents; the cheap path for plain ASCII."""
    text = raw.casefold()
    if text.isascii():
        return text
    return "".join(
        ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch)
    )


def name_key(raw: str) -> tuple[str, str, str]:
    """(compact form, first word, generational suffix) of a name: what the rules compare.

    A trailing Jr/Sr/II/III/IV is split off: father and son share every other word.
    """
    words = _WORD.findall(_fold(raw or ""))
    suffix = ""
    while len(words) > 1 and words[-1] in _SUFFIXES:
        suffix = words.pop() + suffix
    if not words:
        return "", "", ""
    return "".join(words), words[0], suffix


def normalise_email(raw: str) -> str:
    """Comparable email, or "" when it identifies nobody (blank, placeholder, malformed)."""
    text = (raw or "").strip().casefold()
    at = text.rfind("@")
    if at <= 0 or at == len(text) - 1:
        return ""
    local, domain = text[:at], text[at + 1 :].rstrip(".")
    if domain in _GMAIL:
        local = local.split("+", 1)[0].replace(".", "")
        domain = "gmail.com"
    if not local or local in _PLACEHOLDER_LOCALS or domain in _PLACEHOLDER_DOMAINS:
        return ""
    return f"{local}@{domain}"


def normalise_phone(raw: str) -> str:
    """Last 10 digits, or "" for something too short or obviously fake."""
    text = (raw or "").lower()
    cut = text.find("x")
    if cut >= 0:
        text = text[:cut]
    digits = _NON_DIGIT.sub("", text)[-10:]
    if len(digits) < 7 or digits.count(digits[0]) == len(digits):
        return ""
    return "" if digits in _PLACEHOLDER_PHONES else digits


def normalise_address(address: str, postcode: str) -> str:
    """Address and postcode as one comparable key, or "" when either is missing."""
    code = "".join(_WORD.findall((postcode or "").upper()))
    if len(code) == 9 and code.isdigit():  # ZIP+4 written without its dash
        code = code[:5]
    if not code:
        return ""
    words = [
        _STREET_WORDS.get(word, word)
        for word in _WORD.findall(_fold(address or ""))
        if word not in _UNIT_WORDS
    ]
    return f"{' '.join(words)}|{code}" if words else ""


def _dob_ordinal(value: object) -> int:
    """Day number of a DOB, 0 when missing or a placeholder year."""
    if isinstance(value, date) and value.year > 1900:
        return value.toordinal()
    return 0


# -- the table of normalised columns --------------------------------------------------------


class _Table:
    """Normalised fields in parallel lists: far smaller than an object per contact."""

    __slots__ = ("ids", "first", "fword", "last", "suffix", "email", "phone", "addr", "dob")

    def __init__(self, contacts: Iterable[Contact]) -> None:
        ids: list[str] = []
        first: list[str] = []
        fword: list[str] = []
        last: list[str] = []
        suffix: list[str] = []
        email: list[str] = []
        phone: list[str] = []
        addr: list[str] = []
        dob: list[int] = []
        names: dict[str, tuple[str, str, str]] = {}  # names repeat a lot: normalise each once
        names_get = names.get
        add_id, add_first, add_fword, add_last = ids.append, first.append, fword.append, last.append
        add_suffix, add_email, add_phone = suffix.append, email.append, phone.append
        add_addr, add_dob = addr.append, dob.append
        norm_email, norm_phone, norm_addr = normalise_email, normalise_phone, normalise_address
        for c in contacts:
            raw = c.first_name or ""
            fk = names_get(raw)
            if fk is None:
                fk = names[raw] = name_key(raw)
            raw = c.last_name or ""
            lk = names_get(raw)
            if lk is None:
                lk = names[raw] = name_key(raw)
            cid = c.contact_id
            add_id(cid if cid.__class__ is str else str(cid))
            add_first(fk[0])
            add_fword(fk[1])
            add_last(lk[0])
            add_suffix(fk[2] + lk[2] if fk[2] or lk[2] else "")
            add_email(norm_email(c.email) if c.email else "")
            add_phone(norm_phone(c.phone) if c.phone else "")
            add_addr(norm_addr(c.address, c.postcode) if c.address else "")
            born = c.dob
            if born is None:
                add_dob(0)
            else:
                add_dob(born.toordinal() if born.__class__ is date and born.year > 1900
                        else _dob_ordinal(born))
        self.ids, self.first, self.fword, self.last = ids, first, fword, last
        self.suffix = suffix
        self.email, self.phone, self.addr, self.dob = email, phone, addr, dob


# -- pair rules -------------------------------------------------------------------------


def _first_relation(a: str, b: str, aw: str, bw: str) -> tuple[float, int] | None:
    """How two different normalised first names can still be one person's, if at all."""
    if nicknames.are_related(a, b):
        return W_NICK, _R_NICK
    if aw == bw and len(aw) >= 2 and (a == aw or b == bw):
        return W_MIDDLE, _R_MIDDLE
    la, lb = len(a), len(b)
    if la < 3 or lb < 3:
        return None
    allowed = 1 if max(la, lb) <= 5 else 2
    if abs(la - lb) > allowed:
        return None
    edits = DamerauLevenshtein.distance(a, b, score_cutoff=allowed)
    if edits > allowed:
        return None
    if a in nicknames.KNOWN_GIVEN_NAMES and b in nicknames.KNOWN_GIVEN_NAMES:
        return None  # two real names, e.g. Mary and Mark: two people
    return (W_TYPO1 if edits == 1 else W_TYPO2), _R_TYPO


def _scorer(t: _Table, threshold: float) -> Callable[[int, int], tuple[float, int] | None]:
    """The pair rule of the module docstring, as a closure over the columns (speed)."""
    first, fword, last, suffix = t.first, t.fword, t.last, t.suffix
    email, phone, addr, dob = t.email, t.phone, t.addr, t.dob
    related = _first_relation
    damerau = DamerauLevenshtein.distance

    def score(i: int, j: int) -> tuple[float, int] | None:
        di, dj = dob[i], dob[j]
        if di and dj and di != dj:
            return None
        fi, fj, li, lj = first[i], first[j], last[i], last[j]
        if not (fi and fj and li and lj) or suffix[i] != suffix[j]:
            return None
        if li == lj:
            if fi == fj:
                weight, bits = W_SAME, _R_SAME
            else:
                rel = related(fi, fj, fword[i], fword[j])
                if rel is None:
                    return None
                weight, bits = rel
        elif fi == lj and li == fj:
            weight, bits = W_SWAP, _R_SWAP
        elif fi == fj and len(li) >= 4 and len(lj) >= 4 and damerau(li, lj, score_cutoff=1) <= 1:
            weight, bits = W_LAST_TYPO, _R_LAST_TYPO
        else:
            return None
        miss = 1.0
        ei, ej, pi, pj = email[i], email[j], phone[i], phone[j]
        if ei and ei == ej:
            miss *= _MISS_EMAIL
            bits |= _R_EMAIL
        if di and di == dj:
            miss *= _MISS_DOB
            bits |= _R_DOB
        if pi and pi == pj:
            miss *= _MISS_PHONE
            bits |= _R_PHONE
        if bits & _ADDRESS_NAME_KINDS:
            ai = addr[i]
            if (
                ai
                and ai == addr[j]
                and not (ei and ej and ei != ej and pi and pj and pi != pj)
            ):
                miss *= _MISS_ADDR
                bits |= _R_ADDR
        if miss == 1.0:
            return None
        value = weight * (1.0 - miss)
        if value < threshold:
            return None
        return value, bits

    return score


def _reasons(bits: int) -> tuple[str, ...]:
    return tuple(text for bit, text in _REASONS if bits & bit)


# -- blocking ---------------------------------------------------------------------------


def _blocks(column: list, cap: int, stats: DuplicateStats) -> list[list[int]]:
    """Rows sharing a value, per value; values over `cap` rows are placeholders and blanked.

    A dict value is a bare row number until a second row arrives, so the million
    singletons of a large practice cost no list each.
    """
    index: dict[object, int | list[int]] = {}
    setdefault = index.setdefault
    for row, value in enumerate(column):
        if value:
            cur = setdefault(value, row)
            if cur is row:
                continue
            if cur.__class__ is int:
                index[value] = [cur, row]
            else:
                cur.append(row)  # type: ignore[union-attr]  # a list once a value repeats
    blocks: list[list[int]] = []
    for members in index.values():
        if members.__class__ is not list:
            continue
        if len(members) > cap:
            stats.placeholder_values += 1
            stats.placeholder_contacts += len(members)
            blank = 0 if isinstance(column[members[0]], int) else ""
            for row in members:
                column[row] = blank
        else:
            blocks.append(members)
    return blocks


def _dob_cap(dob: list[int], max_block: int) -> int:
    """A DOB far more common than the mean per day is a placeholder (01/01/2000...)."""
    present = [d for d in dob if d]
    if not present:
        return max_block
    mean = len(present) / len(set(present))
    return max(max_block, int(10 * mean))


# -- the public API -----------------------------------------------------------------------


def find_duplicate_groups(
    contacts: Iterable[Contact],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    max_block: int = DEFAULT_MAX_BLOCK,
    stats: DuplicateStats | None = None,
) -> list[DuplicateGroup]:
    """Groups of contacts that are one person, by the rules of the module docstring.

    `stats`, when given, is filled with the run's counters (placeholders skipped, pairs
    compared). Output is deterministic and independent of the input order.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    if max_block < 2:
        raise ValueError("max_block must be at least 2")
    st = stats if stats is not None else DuplicateStats()
    with _gc_paused():
        groups = _find(contacts, threshold, max_block, st)
    log.info(
        "duplicates: contacts=%d comparisons=%d pairs=%d groups=%d placeholder_values=%d "
        "placeholder_contacts=%d oversized_blocks=%d conflicting_links=%d",
        st.contacts, st.comparisons, st.pairs, st.groups, st.placeholder_values,
        st.placeholder_contacts, st.oversized_blocks, st.conflicting_links,
    )
    return groups


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cycle collector: this code makes no cycles, and each full collection
    would re-walk every contact object the caller holds (~20% of the run at 1M)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _find(
    contacts: Iterable[Contact], threshold: float, max_block: int, st: DuplicateStats
) -> list[DuplicateGroup]:
    t = _Table(contacts)
    st.contacts = len(t.ids)
    first, last, email, phone, addr = t.first, t.last, t.email, t.phone, t.addr

    # Every placeholder is found before any pair is scored: it is not evidence either.
    by_email = _blocks(email, max_block, st)
    by_phone = _blocks(phone, max_block, st)
    by_addr = _blocks(addr, max_block, st)
    by_dob = _blocks(t.dob, _dob_cap(t.dob, max_block), st)

    score = _scorer(t, threshold)
    accepted: list[tuple[int, int, float, int]] = []
    comparisons = 0

    # A pair is scored in the first kind of block it shares (email, phone, address, DOB):
    # its score does not depend on the block, so later sightings are skipped.
    for kind, blocks in enumerate((by_email, by_phone, by_addr)):
        for members in blocks:
            size = len(members)
            for x in range(size - 1):
                i = members[x]
                ei, pi = email[i], phone[i]
                for y in range(x + 1, size):
                    j = members[y]
                    if kind and ((ei and ei == email[j]) or (kind == 2 and pi and pi == phone[j])):
                        continue
                    comparisons += 1
                    hit = score(i, j)
                    if hit is not None:
                        accepted.append((i, j, hit[0], hit[1]))

    # One DOB is shared by strangers, so a DOB block is split by name: a pair the rules
    # can accept shares its last name, its first name (last-name typo), or one name
    # across the two fields (swapped).
    for bucket in by_dob:
        sub: dict[str, list[int]] = {}
        for row in bucket:
            f, lname = first[row], last[row]
            if f:
                sub.setdefault(f, []).append(row)
            if lname and lname != f:
                sub.setdefault(lname, []).append(row)
        for name, members in sub.items():
            size = len(members)
            if size < 2:
                continue
            if size > max_block:
                st.oversized_blocks += 1
                continue
            for x in range(size - 1):
                i = members[x]
                fi, li, ei, pi, ai = first[i], last[i], email[i], phone[i], addr[i]
                for y in range(x + 1, size):
                    j = members[y]
                    if (ei and ei == email[j]) or (pi and pi == phone[j]) or (
                        ai and ai == addr[j]
                    ):
                        continue  # scored in an earlier block
                    fj, lj = first[j], last[j]
                    if (
                        fi != li
                        and ((fi == fj and li == lj) or (fi == lj and li == fj))
                        and name != min(fi, li)
                    ):
                        continue  # shares two names: scored in the other sub-block
                    comparisons += 1
                    hit = score(i, j)
                    if hit is not None:
                        accepted.append((i, j, hit[0], hit[1]))

    groups = _group(t.ids, t.dob, accepted, st)
    st.comparisons = comparisons
    st.pairs = len(accepted)
    st.groups = len(groups)
    return groups


def _group(
    ids: Sequence[str],
    dob: Sequence[int],
    pairs: list[tuple[int, int, float, int]],
    stats: DuplicateStats,
) -> list[DuplicateGroup]:
    """Union-find over accepted pairs, strongest first; weakest score and all reasons.

    A record without a DOB can match a father and his same-named son; a group never
    joins two different DOBs, so the weaker of two such links is dropped.
    """
    parent: dict[int, int] = {}
    group_dob: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while (up := parent.get(root, root)) != root:
            root = up
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    pairs.sort(key=lambda p: (-p[2], *sorted((ids[p[0]], ids[p[1]]))))
    kept = []
    for pair in pairs:
        ri, rj = find(pair[0]), find(pair[1])
        if ri != rj:
            di, dj = group_dob.get(ri, dob[ri]), group_dob.get(rj, dob[rj])
            if di and dj and di != dj:
                stats.conflicting_links += 1
                continue
            root, child = min(ri, rj), max(ri, rj)
            parent[child] = root
            group_dob[root] = di or dj
        kept.append(pair)
    members: dict[int, set[int]] = {}
    weakest: dict[int, float] = {}
    bits: dict[int, int] = {}
    for i, j, value, why in kept:
        root = find(i)
        members.setdefault(root, set()).update((i, j))
        weakest[root] = min(weakest.get(root, 1.0), value)
        bits[root] = bits.get(root, 0) | why
    out = []
    for root, rows in members.items():
        contact_ids = tuple(sorted({ids[row] for row in rows}))
        if len(contact_ids) < 2:
            continue  # one id entered twice is the snapshot's business (invalid_record)
        out.append(DuplicateGroup(contact_ids, round(weakest[root], 4), _reasons(bits[root])))
    out.sort(key=lambda g: g.contact_ids)
    return out


def score_pair(a: Contact, b: Contact) -> tuple[float, tuple[str, ...]]:
    """Score and reasons for one pair by the same rules; (0.0, ()) when not a duplicate.

    For tests and data generators. Placeholder detection needs the whole population,
    so it does not apply here.
    """
    t = _Table((a, b))
    hit = _scorer(t, 1e-9)(0, 1)
    if hit is None:
        return 0.0, ()
    return round(hit[0], 4), _reasons(hit[1])
