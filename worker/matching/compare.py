"""Graded comparisons: how closely two contacts agree, field by field (the γ vectors).

Each field of a candidate pair gets a *level*; -1 means a value is missing on either side
(no evidence either way, as in Fellegi–Sunter). String similarity is computed once per
distinct pair of values, with rapidfuzz's vectorised `cpdist`, and only where a cheap
character-count bound says the pair could reach the level's threshold at all.

- first, last: 4 same · 3 one name holds the other (nickname, middle name, married or
  double name "Smith"/"Smith-Doe") · 2 Jaro-Winkler ≥ 0.92 · 1 ≥ 0.80 · 0 other.
- dob: 3 same · 2 one digit, two adjacent digits transposed, or day/month swapped ·
  1 two digits · 0 other.
- email, phone: 3 same (one person's) · 2 same, but shared by two people (different
  first names or DOBs, or a name's male and female forms: a family's) · 1 one edit
  apart · 0 other.
- address: 3 same house, street and postcode · 2 same house number with the same
  postcode or a similar street · 1 same postcode or similar street · 0 other.
- city: 2 same · 1 Jaro-Winkler ≥ 0.88 · 0 other.

Swapped names: when first-vs-last and last-vs-first agree better than the straight
comparison (both at least level 2), the swapped levels are used and the pair says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from rapidfuzz.distance import JaroWinkler, Levenshtein
from rapidfuzz.process import cdist, cpdist

from worker.matching.columns import Columns

FIELDS = ("first", "last", "dob", "email", "phone", "address", "city")
LEVELS = {"first": 5, "last": 5, "dob": 4, "email": 4, "phone": 4, "address": 4, "city": 3}
F_FIRST, F_LAST, F_DOB, F_EMAIL, F_PHONE, F_ADDR, F_CITY = range(len(FIELDS))
WORKERS = 2


@dataclass(slots=True)
class Compared:
    """γ matrix (pairs x fields, int8, -1 missing) and the facts the rules need."""

    gamma: np.ndarray
    swapped: np.ndarray  # names matched first-to-last
    related: np.ndarray  # first names on one nickname line (Bob/Robert)
    dob_swap: np.ndarray  # day and month swapped
    years_apart: np.ndarray  # |birth year difference| (int16), 0 when a DOB is missing
    gendered: np.ndarray  # first names are one name's forms for two sexes (Joel/Joelle)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (a, b) code pairs and, per input pair, its index among them."""
    key = a.astype(np.int64) << 32 | (b.astype(np.int64) & 0xFFFFFFFF)
    order = np.argsort(key)  # np.unique(return_inverse=True) does the same, slower
    key = key[order]
    first = np.empty(len(key), dtype=bool)
    first[:1] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    uniq = key[first]
    inverse = np.empty(len(key), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return uniq >> 32, uniq & 0xFFFFFFFF, inverse


_BINS = 32  # characters hashed into this many bins for `_char_counts`


def _char_counts(cols: Columns, vocab: str) -> tuple[np.ndarray, np.ndarray]:
    """Length and character histogram (32 bins) of each value of `cols.<vocab>`, once
    per run: a cheap upper bound on how similar two values can be."""
    if vocab not in cols.char_counts:
        strings = getattr(cols, vocab).tolist()
        lens = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
        chars = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"),
                              dtype=np.uint32)
        owner = np.repeat(np.arange(len(strings), dtype=np.int64), lens)
        counts = np.bincount(owner * _BINS + chars % _BINS, minlength=len(strings) * _BINS)
        dtype = np.uint8 if counts.max(initial=0) < 256 else np.int32
        cols.char_counts[vocab] = lens, counts.reshape(-1, _BINS).astype(dtype)
    return cols.char_counts[vocab]


def _could_reach(cols: Columns, vocab: str, a: np.ndarray, b: np.ndarray,
                 floor: float) -> np.ndarray:
    """Pairs whose Jaro-Winkler similarity may reach `floor` (never misses one that does).

    Jaro counts matching characters, which cannot outnumber the characters the two values
    have in common (`c`, bounded above by the histograms), so Jaro <= (c/|a| + c/|b| + 1)/3,
    and Winkler's prefix bonus adds at most 0.4 of the rest. A margin keeps float32
    rounding (rapidfuzz's scores) on the safe side.
    """
    lens, counts = _char_counts(cols, vocab)
    out = np.empty(len(a), dtype=bool)
    step = 200_000  # bounds the (pairs x 32) temporaries
    for lo in range(0, len(a), step):
        pa, pb = a[lo:lo + step], b[lo:lo + step]
        common = np.minimum(counts[pa], counts[pb]).sum(axis=1)
        jaro = (common / lens[pa] + common / lens[pb] + 1.0) / 3.0
        jaro[common == 0] = 0.0
        out[lo:lo + step] = jaro + 0.4 * (1.0 - jaro) >= floor - 1e-6
    return out


def _similarity(values: np.ndarray, a: np.ndarray, b: np.ndarray, scorer: Any,
                cutoff: float | None = None, distinct: bool = True) -> np.ndarray:
    """scorer(values[a[k]], values[b[k]]) for each k (`values`: an object array), in
    rapidfuzz's C++ on two threads; 0 where below `cutoff`.

    rapidfuzz spends most of its time per pair converting the two strings, so each
    distinct (a, b) pair is scored once (`distinct`: names and streets repeat a lot;
    not worth a sort for emails and phones), and a small vocabulary (cities) is scored
    all against all once and looked up.
    """
    if not len(a):
        return np.empty(0, dtype=np.float64)
    if len(values) ** 2 <= len(a):
        table = cdist(values, values, scorer=scorer, score_cutoff=cutoff, workers=WORKERS)
        return np.asarray(table[a, b])
    if distinct:
        ua, ub, inverse = _unique_pairs(a, b)
        return _similarity(values, ua, ub, scorer, cutoff, distinct=False)[inverse]
    return np.asarray(cpdist(values[a], values[b], scorer=scorer, score_cutoff=cutoff,
                             workers=WORKERS))


def _jaro_winkler(cols: Columns, vocab: str, a: np.ndarray, b: np.ndarray,
                  floor: float) -> np.ndarray:
    """Jaro-Winkler of distinct value pairs of `cols.<vocab>` where it may reach `floor`;
    0 elsewhere (the callers only ask whether it reaches `floor` or more)."""
    sim = np.zeros(len(a), dtype=np.float32)
    maybe = np.flatnonzero(_could_reach(cols, vocab, a, b, floor))
    if len(maybe):
        sim[maybe] = _similarity(getattr(cols, vocab), a[maybe], b[maybe],
                                 JaroWinkler.normalized_similarity, distinct=False)
    return sim


def _shares_word(cols: Columns, a: np.ndarray, b: np.ndarray, first_word: bool) -> np.ndarray:
    """The names share a word of 2+ letters: for a last name any word ("Smith"/"Smith-Doe"),
    for a first name the first word ("Mary"/"Mary Ann", not "José María"/"María Elena")."""
    out = np.zeros(len(a), dtype=bool)
    words = cols.name_words
    multi = np.array([len(w) > 1 for w in words], dtype=bool) if words else np.zeros(0, bool)
    if not len(a):
        return out
    idx = np.flatnonzero(multi[a] | multi[b])
    if not len(idx):
        return out
    ua, ub, inv = _unique_pairs(a[idx], b[idx])
    if first_word:
        hit = np.array([
            words[x][0] == words[y][0] and len(words[x][0]) > 1
            for x, y in zip(ua.tolist(), ub.tolist(), strict=True)
        ], dtype=bool)
    else:
        hit = np.array([
            any(len(w) > 1 for w in set(words[x]) & set(words[y]))
            for x, y in zip(ua.tolist(), ub.tolist(), strict=True)
        ], dtype=bool)
    out[idx] = hit[inv]
    return out


def _related(cols: Columns, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two names on one nickname line (first words compared)."""
    ga, gb = cols.name_groups[a], cols.name_groups[b]
    out = np.zeros(len(a), dtype=bool)
    for x in range(3):
        for y in range(3):
            out |= (ga[:, x] >= 0) & (ga[:, x] == gb[:, y])
    return out


_FEMININE_ENDINGS = ("a", "e", "ie", "le", "ne", "na", "ia", "elle", "ette", "ine")
_SWAPPED_ENDINGS = (frozenset("oa"), frozenset({"y", "ie"}), frozenset({"e", "ie"}))


def gender_variant(a: str, b: str) -> bool:
    """Two forms of a name for two sexes: Daniel/Danielle, Justin/Justine, Paul/Paula,
    Mario/Maria, Bobby/Bobbie, Jesse/Jessie, Ryan/Ryann. Different people's names, not a
    typo (a typo that makes one is possible, and then the DOB has to agree)."""
    if a == b:
        return False
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    if len(short) >= 3 and long.startswith(short) and long[len(short):] in _FEMININE_ENDINGS:
        return True
    if len(short) >= 4 and short.endswith("n") and long == short + "n":
        return True  # Ryan/Ryann, Brian/Briann
    for ends in _SWAPPED_ENDINGS:
        for x in ends:
            for y in ends:
                if x != y and a.endswith(x) and b.endswith(y) and len(a) - len(x) >= 3 and (
                        a[: len(a) - len(x)] == b[: len(b) - len(y)]):
                    return True
    return False


def _gendered(cols: Columns, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a):
        return np.zeros(0, dtype=bool)
    ua, ub, inv = _unique_pairs(a, b)
    words = cols.name_words
    hit = np.array([gender_variant(words[x][0], words[y][0])
                    for x, y in zip(ua.tolist(), ub.tolist(), strict=True)], dtype=bool)
    return hit[inv]


def name_levels(cols: Columns, a: np.ndarray, b: np.ndarray,
                first_word: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Levels of two name-code arrays, and whether they are nickname-related."""
    level = np.zeros(len(a), dtype=np.int8)
    missing = (a < 0) | (b < 0)
    same = (a == b) & ~missing
    level[same] = 4
    rest = np.flatnonzero(~same & ~missing)
    related = np.zeros(len(a), dtype=bool)
    if len(rest):
        # Names repeat: each distinct pair of names is compared once.
        ua, ub, inv = _unique_pairs(a[rest], b[rest])
        sim = _jaro_winkler(cols, "name_obj", ua, ub, 0.80)
        lv = np.where(sim >= 0.92, 2, np.where(sim >= 0.80, 1, 0)).astype(np.int8)
        shares = _shares_word(cols, ua, ub, first_word)
        rel = _related(cols, ua, ub) & ~shares  # "Mary"/"Mary Ann" is a middle name
        lv[(rel | shares) & (lv < 3)] = 3
        lv[sim >= 1.0] = 4  # the same letters, spaced differently ("Kayl a", "O Brien")
        level[rest] = lv[inv]
        related[rest] = rel[inv]
    level[missing] = -1
    return level, related


_NIBBLES = np.arange(28, -1, -4, dtype=np.uint32)  # YYYYMMDD, one digit per 4 bits


def _digits(cols: Columns) -> np.ndarray:
    """The 8 digits YYYYMMDD of each DOB packed into one uint32, 4 bits a digit."""
    y, m, d = cols.y.astype(np.uint32), cols.m.astype(np.uint32), cols.d.astype(np.uint32)
    out = np.zeros(cols.n, dtype=np.uint32)
    for digit in (y // 1000 % 10, y // 100 % 10, y // 10 % 10, y % 10, m // 10, m % 10,
                  d // 10, d % 10):
        out = out << np.uint32(4) | digit
    return out


def _dob_levels(cols: Columns, i: np.ndarray, j: np.ndarray,
                digits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    di, dj = cols.dob[i], cols.dob[j]
    missing = (di < 0) | (dj < 0)
    level = np.zeros(len(i), dtype=np.int8)
    # Digits that differ: a 1 in the low bit of each differing 4-bit digit, summed into
    # the top 4 bits by one multiplication.
    x = digits[i] ^ digits[j]
    x = (x | x >> np.uint32(1) | x >> np.uint32(2) | x >> np.uint32(3)) & np.uint32(0x11111111)
    ham = (x * np.uint32(0x11111111)) >> np.uint32(28)
    two = np.flatnonzero(ham == 2)
    adjacent = np.zeros(len(two), dtype=bool)
    if len(two):  # two adjacent digits transposed: looked at digit by digit
        xi = (digits[i[two], None] >> _NIBBLES) & np.uint32(15)
        xj = (digits[j[two], None] >> _NIBBLES) & np.uint32(15)
        diff = xi != xj
        for k in range(7):
            adjacent |= diff[:, k] & diff[:, k + 1] & (xi[:, k] == xj[:, k + 1]) & (
                xi[:, k + 1] == xj[:, k])
    swap = (cols.y[i] == cols.y[j]) & (cols.m[i] == cols.d[j]) & (cols.d[i] == cols.m[j]) & (
        cols.m[i] != cols.m[j])
    level[two] = 1
    level[two[adjacent]] = 2
    level[(ham == 1) | swap] = 2
    level[ham == 0] = 3
    level[missing] = -1
    apart = np.abs(cols.y[i].astype(np.int32) - cols.y[j].astype(np.int32))
    apart[missing] = 0
    return level, swap & ~missing, apart


def _id_levels(values: np.ndarray, ci: np.ndarray, cj: np.ndarray,
               family: np.ndarray, named: np.ndarray) -> np.ndarray:
    """Email / phone: 3 same, 2 same family value, 1 one edit apart, 0 different.

    The one-edit level is looked for only where the names agree (`named`): elsewhere it
    could not change the outcome, and it is the costliest comparison.
    """
    missing = (ci < 0) | (cj < 0)
    level = np.zeros(len(ci), dtype=np.int8)
    same = (ci == cj) & ~missing
    level[same] = np.where(family[ci[same]], 2, 3)
    rest = np.flatnonzero(~same & ~missing & named)
    if len(rest):
        dist = _similarity(values, ci[rest], cj[rest], Levenshtein.distance, cutoff=1,
                           distinct=False)
        level[rest[dist <= 1]] = 1
    level[missing] = -1
    return level


def _mark_family(ci: np.ndarray, cj: np.ndarray, two_people: np.ndarray,
                 family: np.ndarray) -> None:
    """Mark values (emails, phones) shared by two people: different first names or DOBs."""
    shared = (ci == cj) & (ci >= 0) & two_people
    family[ci[shared]] = True


CHUNK = 1_000_000  # pairs compared at once: bounds the temporaries at a million contacts


def compare(cols: Columns, i: np.ndarray, j: np.ndarray) -> Compared:
    """The γ matrix of candidate pairs (i[k], j[k]), computed a chunk at a time.

    Two passes over the chunks: a family's shared email or phone is known only once
    every pair sharing it has had its names and DOBs compared.
    """
    n = len(i)
    out = Compared(
        np.full((n, len(FIELDS)), -1, dtype=np.int8), np.zeros(n, dtype=bool),
        np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int16),
        np.zeros(n, dtype=bool))
    digits = _digits(cols)
    fam_e = np.zeros(max(len(cols.emails), 1), dtype=bool)
    fam_p = np.zeros(max(len(cols.phones), 1), dtype=bool)
    for lo in range(0, n, CHUNK):
        part = slice(lo, min(lo + CHUNK, n))
        _people(cols, i[part], j[part], digits, out, part, fam_e, fam_p)
    for lo in range(0, n, CHUNK):
        part = slice(lo, min(lo + CHUNK, n))
        ci, cj, g = i[part], j[part], out.gamma[part]
        named = (g[:, F_FIRST] >= 2) & (g[:, F_LAST] >= 2)
        g[:, F_EMAIL] = _id_levels(cols.email_obj, cols.email[ci], cols.email[cj], fam_e, named)
        g[:, F_PHONE] = _id_levels(cols.phone_obj, cols.phone[ci], cols.phone[cj], fam_p, named)
        g[:, F_ADDR] = _address_levels(cols, ci, cj)
        g[:, F_CITY] = _city_levels(cols, ci, cj)
    return out


def _people(cols: Columns, i: np.ndarray, j: np.ndarray, digits: np.ndarray, out: Compared,
            part: slice, fam_e: np.ndarray, fam_p: np.ndarray) -> None:
    """Names and DOB of one chunk; marks the emails and phones two people share."""
    n = len(i)
    fi, fj, li, lj = cols.first[i], cols.first[j], cols.last[i], cols.last[j]
    first, related = name_levels(cols, fi, fj, first_word=True)
    last, _ = name_levels(cols, li, lj)
    weak = np.flatnonzero((first < 3) | (last < 3))
    swapped = np.zeros(n, dtype=bool)
    if len(weak):
        c1, _ = name_levels(cols, fi[weak], lj[weak])
        # A swap needs both crossed levels >= 1: the second only where the first is.
        c2 = np.full(len(weak), -1, dtype=np.int8)
        ok = np.flatnonzero(c1 >= 1)
        c2[ok] = name_levels(cols, li[weak[ok]], fj[weak[ok]])[0]
        better = (np.minimum(c1, c2) >= 1) & (np.maximum(c1, c2) >= 2) & (
            c1.astype(np.int16) + c2 > first[weak].astype(np.int16) + last[weak])
        sel = weak[better]
        first[sel], last[sel] = c1[better], c2[better]
        related[sel] = False
        swapped[sel] = True
    gendered = np.zeros(n, dtype=bool)
    similar = np.flatnonzero((first == 1) | (first == 2))
    gendered[similar] = _gendered(cols, fi[similar], fj[similar])
    dob, dob_swap, apart = _dob_levels(cols, i, j, digits)
    g = out.gamma[part]
    g[:, F_FIRST], g[:, F_LAST], g[:, F_DOB] = first, last, dob
    out.swapped[part], out.related[part], out.dob_swap[part] = swapped, related, dob_swap
    out.years_apart[part], out.gendered[part] = apart, gendered
    others = ((first >= 0) & (first <= 1)) | (dob == 0) | gendered  # certainly two people
    _mark_family(cols.email[i], cols.email[j], others, fam_e)
    _mark_family(cols.phone[i], cols.phone[j], others, fam_p)


def _address_levels(cols: Columns, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    si, sj, pi, pj = cols.street[i], cols.street[j], cols.postcode[i], cols.postcode[j]
    ni, nj = cols.number[i], cols.number[j]
    missing = ((si < 0) & (pi < 0)) | ((sj < 0) & (pj < 0))
    level = np.zeros(len(i), dtype=np.int8)
    same_post = (pi == pj) & (pi >= 0)
    same_num = (ni == nj) & (ni >= 0)
    similar_street = (si == sj) & (si >= 0)
    # With one postcode the street's similarity changes nothing: compared elsewhere only.
    # (rapidfuzz returns float32; compared in float64, as always, a Jaro-Winkler of
    # exactly 0.9 is just below the line.)
    need = np.flatnonzero((si >= 0) & (sj >= 0) & ~similar_street & ~same_post)
    if len(need):
        ua, ub, inverse = _unique_pairs(si[need], sj[need])
        sim = _jaro_winkler(cols, "street_obj", ua, ub, 0.9).astype(np.float64)
        similar_street[need] = (sim >= 0.9)[inverse]
    level[same_post | similar_street] = 1
    level[same_num & (same_post | similar_street)] = 2
    ai, aj = cols.addr[i], cols.addr[j]
    level[(ai == aj) & (ai >= 0)] = 3
    level[missing] = -1
    return level


def _city_levels(cols: Columns, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    ci, cj = cols.city[i], cols.city[j]
    missing = (ci < 0) | (cj < 0)
    level = np.zeros(len(i), dtype=np.int8)
    level[ci == cj] = 2
    rest = np.flatnonzero((ci != cj) & ~missing)
    if len(rest):
        sim = _similarity(cols.city_obj, ci[rest], cj[rest], JaroWinkler.normalized_similarity)
        level[rest[sim >= 0.88]] = 1
    level[missing] = -1
    return level
