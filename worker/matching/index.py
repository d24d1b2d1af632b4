"""Deciding the duplicate groups of a few contacts without reading the whole practice.

Why: a whole run (`duplicates.find_duplicate_groups`) costs ~6 s of CPU at 200,000
contacts, and an incremental scan in which ten contacts changed needs only the groups
that hold one of them. What makes a group depend on the rest of the practice is small
and can be kept between scans:

- `contact_keys`: per contact, stable 63-bit hashes of the normal forms the blocking
  passes and the population counts use (names and their Soundex, DOB, email, phone,
  whole address, postcode, house number). `KeyIndex` holds them for every contact: built
  by the whole run, updated for the contacts an incremental scan reread.
- `KeyIndex.candidates`: each contact's candidates through the same passes as
  `blocking.candidates`, with the same caps on block sizes and the same placeholders
  (an email, phone or address held by more than `max_block` contacts), counted over the
  whole practice: the ids to read, nothing else.
- the learned `fellegi_sunter.Model` (m, u, prior), frozen: `model_to_dict` /
  `model_from_dict`. Term frequencies come from the kept name hashes, so they are the
  practice's current counts, as a whole run would take them.
- `decide`: the groups a whole run would form around the given contacts, from those
  contacts and their candidates only. A group's links can reach past the contacts whose
  candidates were read (a kept pair to a contact not expanded): `Decided.reached` names
  them, and the caller reads their candidates and decides again, until nothing is
  reached. Then every pair among the group members is known, and the union-find
  (`duplicates._group`, strongest link first, conflicts dropped) gives the same groups.

What differs from a whole run is only the frozen parameters: a pair whose probability
moves across the threshold because the practice changed since they were learned is
settled by the next whole run. Nothing here logs a name, email, phone or DOB.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np

from worker.matching import blocking, fellegi_sunter, household
from worker.matching.columns import Columns
from worker.matching.compare import F_FIRST, F_LAST, FIELDS, LEVELS, compare
from worker.matching.duplicates import (
    DEFAULT_MAX_BLOCK,
    DEFAULT_THRESHOLD,
    DuplicateGroup,
    DuplicateStats,
    _group,
)
from worker.matching.normalise import soundex
from worker.model.records import Contact

KEYS = ("first", "last", "first_sx", "last_sx", "dob", "email", "phone", "addr", "postcode",
        "number")
FIRST, LAST, FIRST_SX, LAST_SX, DOB, EMAIL, PHONE, ADDR, POSTCODE, NUMBER = range(len(KEYS))
# Bump when a key's meaning changes: kept indexes of another version are not used.
KEY_VERSION = 2
PARAMS_VERSION = 1

_MASK = 0x7FFF_FFFF_FFFF_FFFF  # hashes are non-negative: -1 is "missing"


def _hash(value: str) -> int:
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK


def _vocabulary(values: Sequence[str]) -> np.ndarray:
    """The hash of each vocabulary entry (a Columns code -> its stable key)."""
    return np.fromiter((_hash(v) for v in values), dtype=np.int64, count=len(values))


def _lookup(hashes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    out = np.full(len(codes), -1, dtype=np.int64)
    ok = codes >= 0
    out[ok] = hashes[codes[ok]]
    return out


def column_keys(cols: Columns) -> np.ndarray:
    """The kept keys of each row of `cols` (`KEYS`; -1 where missing), taken before
    `Columns.blank_common`: equal keys are equal codes of `cols`, in any practice."""
    out = np.empty((cols.n, len(KEYS)), dtype=np.int64)
    names = _vocabulary(cols.names)
    sx_of: dict[str, int] = {}
    sounds = np.fromiter((sx_of.setdefault(sx, _hash(sx)) for sx in map(
        soundex, cols.name_compact)), dtype=np.int64, count=len(cols.names))
    out[:, FIRST], out[:, LAST] = _lookup(names, cols.first), _lookup(names, cols.last)
    out[:, FIRST_SX], out[:, LAST_SX] = _lookup(sounds, cols.first), _lookup(sounds, cols.last)
    out[:, DOB] = cols.dob
    out[:, EMAIL] = _lookup(_vocabulary(cols.emails), cols.email)
    # A normal phone is its digits: "1" + digits is exact (leading zeros kept) and cheap.
    phones = np.fromiter((int("1" + v) for v in cols.phones), dtype=np.int64,
                         count=len(cols.phones))
    out[:, PHONE] = _lookup(phones, cols.phone)
    out[:, POSTCODE] = _lookup(_vocabulary(cols.postcodes), cols.postcode)
    out[:, NUMBER] = _lookup(_vocabulary(cols.numbers), cols.number)
    street = _lookup(_vocabulary(cols.streets), cols.street)
    # Columns.addr: street and postcode known; the house number may be missing (0 here).
    out[:, ADDR] = _mix(_mix(street, np.maximum(out[:, NUMBER], 0)), out[:, POSTCODE])
    return out


def contact_keys(contacts: Iterable[Contact]) -> tuple[list[str], np.ndarray]:
    """Ids (in id order) and kept keys of some contacts."""
    cols = Columns(contacts)
    return cols.ids, column_keys(cols)


def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One key from two (a hash of the pair, 63 bits); -1 where either is missing."""
    x = a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ b.astype(np.uint64)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    out = (x >> np.uint64(1)).astype(np.int64)
    out[(a < 0) | (b < 0)] = -1
    return out


@dataclass
class KeyIndex:
    """The kept keys of every contact of the practice (`ids[k]` has `keys[k]`)."""

    ids: list[str]
    keys: np.ndarray
    _row: dict[str, int] = field(init=False, repr=False)
    _memo: dict[Any, Any] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._row = {c: k for k, c in enumerate(self.ids)}

    @classmethod
    def build(cls, contacts: Iterable[Contact]) -> KeyIndex:
        return cls.from_columns(Columns(contacts))

    @classmethod
    def from_columns(cls, cols: Columns) -> KeyIndex:
        """The index of a whole run's columns (before `blank_common`)."""
        return cls(list(cols.ids), column_keys(cols))

    @property
    def n(self) -> int:
        return len(self.ids)

    def __contains__(self, contact_id: object) -> bool:
        return contact_id in self._row

    def keys_of(self, contact_id: str) -> np.ndarray | None:
        row = self._row.get(contact_id)
        return None if row is None else self.keys[row]

    def updated(self, changes: Mapping[str, np.ndarray | None]) -> KeyIndex:
        """A new index with `changes` applied: new keys of a contact, or None: gone."""
        if not changes:
            return self
        keep = np.ones(self.n, dtype=bool)
        new_ids, new_keys = [], []
        for cid, keys in changes.items():
            row = self._row.get(cid)
            if row is not None:
                keep[row] = False
            if keys is not None:
                new_ids.append(cid)
                new_keys.append(keys)
        ids = [c for c, k in zip(self.ids, keep.tolist(), strict=True) if k] + new_ids
        added = np.array(new_keys, dtype=np.int64).reshape(-1, len(KEYS))
        return KeyIndex(ids, np.concatenate([self.keys[keep], added]))

    # -- serialisation ------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        encoded = [c.encode("utf-8", "surrogatepass") for c in self.ids]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        packed = np.frombuffer(zlib.compress(b"".join(encoded), 1), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, version=np.array([KEY_VERSION]), keys=self.keys, lengths=lengths,
                 ids=packed)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyIndex:
        """Raises ValueError for anything but an index of this `KEY_VERSION`."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                version, keys = int(z["version"][0]), z["keys"]
                lengths, packed = z["lengths"], z["ids"]
            raw = zlib.decompress(packed.tobytes())
        except (OSError, KeyError, IndexError, ValueError, EOFError, zlib.error,
                zipfile.BadZipFile) as err:
            raise ValueError(f"not a kept key index: {type(err).__name__}") from err
        if version != KEY_VERSION or keys.ndim != 2 or keys.shape[1] != len(KEYS) or (
                len(lengths) != len(keys)) or int(lengths.sum()) != len(raw):
            raise ValueError("a kept key index of another version")
        ends = np.cumsum(lengths).tolist()
        starts = [0, *ends[:-1]]
        ids = [raw[a:b].decode("utf-8", "surrogatepass")
               for a, b in zip(starts, ends, strict=True)]
        return cls(ids, keys.astype(np.int64, copy=False))

    # -- what a whole run counts over the practice ----------------------------------------

    def _counts(self, column: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._memo.get(("counts", column))
        if got is None:
            col = self.keys[:, column]
            got = self._memo[("counts", column)] = np.unique(col[col >= 0], return_counts=True)
        return got

    def count(self, column: int, values: np.ndarray) -> np.ndarray:
        """How many contacts of the practice hold each value (0 for -1)."""
        uniq, counts = self._counts(column)
        out = np.zeros(len(values), dtype=np.int64)
        if not len(uniq):
            return out
        at = np.clip(np.searchsorted(uniq, values), 0, len(uniq) - 1)
        found = (uniq[at] == values) & (values >= 0)
        out[found] = counts[at[found]]
        return out

    def placeholders(self, column: int, values: np.ndarray, max_block: int) -> np.ndarray:
        """Values held by more than `max_block` contacts (`Columns.blank_common`)."""
        return self.count(column, values) > max_block

    def name_tf(self, column: int, values: np.ndarray, u_exact: float) -> np.ndarray:
        """`fellegi_sunter.tf_bonus` of these names, from the practice's counts."""
        out = np.zeros(len(values), dtype=np.float64)
        present = int((self.keys[:, column] >= 0).sum())
        if self.n < fellegi_sunter.MIN_TF_CONTACTS or not present or u_exact <= 0:
            return out
        ok = values >= 0
        p = np.maximum(self.count(column, values[ok]), 1) / present
        out[ok] = np.clip(np.log2(u_exact / p), fellegi_sunter.TF_FLOOR, fellegi_sunter.TF_CAP)
        return out

    def _passes(self, max_block: int) -> list[tuple[np.ndarray, int]]:
        """Per blocking pass: the key of each entry (n entries, or 2n for "either name":
        entry k + n is contact k's second key) and the pass's cap (`blocking`)."""
        got = self._memo.get(("passes", max_block))
        if got is not None:
            return got
        k = self.keys
        email, phone = k[:, EMAIL].copy(), k[:, PHONE].copy()
        email[self.placeholders(EMAIL, email, max_block)] = -1
        phone[self.placeholders(PHONE, phone, max_block)] = -1
        f_sx, l_sx = k[:, FIRST_SX], k[:, LAST_SX]
        either = np.concatenate([f_sx, l_sx])
        dob = k[:, DOB]
        year = np.where(dob >= 0, dob // 10000, -1)
        post, num = k[:, POSTCODE], k[:, NUMBER]
        loose = min(max_block, blocking.LOOSE_BLOCK)

        def twice(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, a])

        got = self._memo[("passes", max_block)] = [
            (email, max_block),
            (phone, max_block),
            (_mix(post, num), max_block),
            (_mix(twice(dob), either), max_block),
            (_mix(np.minimum(f_sx, l_sx), np.maximum(f_sx, l_sx)), loose),
            (_mix(twice(year), either), blocking.SMALL_BLOCK),
            (_mix(twice(post), either), loose),
            (_mix(twice(num), either), loose),
            (dob, blocking.SMALL_BLOCK),
        ]
        assert len(got) == len(blocking.PASSES)
        return got

    def candidates(self, contact_ids: Collection[str],
                   max_block: int = DEFAULT_MAX_BLOCK) -> dict[str, set[str]]:
        """Each kept contact's candidates (ids) through every blocking pass, with block
        sizes counted over the whole practice; contacts not kept get none."""
        rows = np.array(sorted({self._row[c] for c in contact_ids if c in self._row}),
                        dtype=np.int64)
        out: dict[str, set[str]] = {self.ids[r]: set() for r in rows.tolist()}
        n = self.n
        for keys, cap in self._passes(max_block):
            owners = np.arange(len(keys), dtype=np.int64) % max(n, 1)
            entries = rows if len(keys) == n else np.concatenate([rows, rows + n])
            wanted = np.unique(keys[entries])
            wanted = wanted[wanted >= 0]
            if not len(wanted):
                continue
            hit = np.flatnonzero(np.isin(keys, wanted))
            hk, hr = keys[hit], owners[hit]
            order = np.argsort(hk, kind="stable")
            hk, hr = hk[order], hr[order]
            starts = np.flatnonzero(np.r_[True, hk[1:] != hk[:-1]])
            sizes = np.diff(np.r_[starts, len(hk)])
            blocks = {int(hk[s]): hr[s:s + size].tolist()
                      for s, size in zip(starts.tolist(), sizes.tolist(), strict=True)
                      if 2 <= size <= cap}
            if not blocks:
                continue
            for entry in entries.tolist():
                members = blocks.get(int(keys[entry]))
                if members is not None:
                    own = entry % n
                    out[self.ids[own]].update(self.ids[m] for m in members if m != own)
        return out


@dataclass
class Learned:
    """What a whole run leaves for incremental scans: its parameters and every contact's
    blocking keys."""

    model: fellegi_sunter.Model
    index: KeyIndex


# -- the frozen parameters ------------------------------------------------------------


def model_to_dict(model: fellegi_sunter.Model) -> dict[str, Any]:
    return {"version": PARAMS_VERSION, "fields": list(FIELDS), "m": model.m.tolist(),
            "u": model.u.tolist(), "prior": float(model.prior), "trained": bool(model.trained)}


def model_from_dict(value: Mapping[str, Any] | None) -> fellegi_sunter.Model | None:
    """The model kept by `model_to_dict`, or None when it is not one of this version."""
    if not value or value.get("version") != PARAMS_VERSION or value.get("fields") != list(
            FIELDS):
        return None
    try:
        m = np.array(value["m"], dtype=np.float64)
        u = np.array(value["u"], dtype=np.float64)
        prior = float(value["prior"])
    except (KeyError, TypeError, ValueError):
        return None
    shape = fellegi_sunter.DEFAULT_M.shape
    if m.shape != shape or u.shape != shape or not 0.0 < prior < 1.0:
        return None
    return fellegi_sunter.Model(m=m, u=u, prior=prior, trained=bool(value.get("trained")))


# -- deciding -----------------------------------------------------------------------------


@dataclass
class Decided:
    """Groups holding an expanded contact; when `reached` is not empty, contacts a kept
    pair links to whose candidates were not read yet: `groups` is then incomplete."""

    groups: list[DuplicateGroup]
    reached: set[str]
    pairs: int = 0


def _pair_codes(rows_a: Sequence[int], rows_b: Sequence[int], n: int) -> np.ndarray:
    a, b = np.asarray(rows_a, dtype=np.int64), np.asarray(rows_b, dtype=np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return np.unique((lo * n + hi)[lo != hi])


def _sharing(codes: np.ndarray, n: int) -> np.ndarray:
    """Pairs of rows sharing a code (>= 0), as pair codes."""
    out = []
    for _, rows in _groups(codes):
        if len(rows) > 1:
            a, b = np.triu_indices(len(rows), 1)
            out.append(rows[a] * n + rows[b])
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _groups(codes: np.ndarray) -> Iterable[tuple[int, np.ndarray]]:
    rows = np.flatnonzero(codes >= 0)
    order = rows[np.argsort(codes[rows], kind="stable")]
    values = codes[order]
    if not len(values):
        return
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]]).tolist()
    for s, e in zip(starts, [*starts[1:], len(values)], strict=True):
        yield int(values[s]), order[s:e]


def decide(
    pool: Iterable[Contact], candidates: Mapping[str, Collection[str]], index: KeyIndex,
    model: fellegi_sunter.Model, threshold: float = DEFAULT_THRESHOLD,
    max_block: int = DEFAULT_MAX_BLOCK,
) -> Decided:
    """The groups a whole run over the practice (`index`) would form that hold a contact
    of `candidates` (the expanded contacts, each with every candidate of the practice),
    scored with `model`. `pool`: the current records of those contacts and candidates
    (one per id); a candidate missing from it is gone and has no pair."""
    if not 0.0 < threshold < 1.0:
        raise ValueError("threshold must be in (0, 1)")
    contacts = sorted({c.contact_id: c for c in pool}.values(), key=attrgetter("contact_id"))
    if len(contacts) < 2:
        return Decided([], set())
    cols = Columns(contacts)
    keys = column_keys(cols)
    for name, column in (("email", EMAIL), ("phone", PHONE), ("addr", ADDR)):
        codes = getattr(cols, name)
        codes[index.placeholders(column, keys[:, column], max_block)] = -1
    n = cols.n
    row = {cid: k for k, cid in enumerate(cols.ids)}
    a_rows, b_rows = [], []
    for a, others in candidates.items():
        ra = row.get(a)
        if ra is None:
            continue
        for b in others:
            rb = row.get(b)
            if rb is not None:
                a_rows.append(ra)
                b_rows.append(rb)
    scored_codes = _pair_codes(a_rows, b_rows, n)
    # A shared email or phone is a family's when any two holders are two people: all
    # holders of an expanded contact's values are among its candidates (email and phone
    # passes), so comparing every pair sharing one gives the whole run's verdict.
    family = np.concatenate([_sharing(cols.email, n), _sharing(cols.phone, n)])
    codes = np.union1d(scored_codes, family)
    i, j = (codes // n).astype(np.int64), (codes % n).astype(np.int64)
    scored = np.isin(codes, scored_codes)
    cmp = compare(cols, i, j)
    vetoes = household.veto(cols, i, j, cmp)
    top_first, top_last = LEVELS["first"] - 1, LEVELS["last"] - 1
    tf_first = index.name_tf(FIRST, keys[:, FIRST], float(model.u[F_FIRST, top_first]))
    tf_last = index.name_tf(LAST, keys[:, LAST], float(model.u[F_LAST, top_last]))
    prob = fellegi_sunter.probability(
        fellegi_sunter.weights(model, cmp.gamma, tf_first[i], tf_last[i]))
    above = scored & (prob >= threshold)
    keep = np.flatnonzero(above & (vetoes < 0))
    expanded = np.zeros(n, dtype=bool)
    expanded[[row[c] for c in candidates if c in row]] = True
    ends = np.concatenate([i[keep], j[keep]])
    reached = {cols.ids[r] for r in np.unique(ends[~expanded[ends]]).tolist()}
    if reached:
        return Decided([], reached, int(scored.sum()))
    linked = np.zeros(n, dtype=bool)
    linked[ends] = True
    two_people = np.isin(vetoes, list(household.TWO_PEOPLE))
    vetoed = np.flatnonzero(above & two_people & linked[i] & linked[j])
    blocked = {(int(x), int(y)) for x, y in zip(i[vetoed], j[vetoed], strict=True)}
    groups = _group(cols, i, j, prob, keep, cmp, blocked, DuplicateStats())
    return Decided(groups, set(), int(scored.sum()))


# Rounds of `groups_around`: each reads the candidates of the contacts a kept link newly
# reached. Real groups are two or three records; a chain longer than this is left to a
# whole run.
MAX_ROUNDS = 5


@dataclass
class Around:
    """What `groups_around` found: the groups (None when links kept reaching new
    contacts after `MAX_ROUNDS`), the contacts it read and the pairs it scored."""

    groups: list[DuplicateGroup] | None
    read: int
    rounds: int
    pairs: int


def groups_around(
    focus: Collection[str], index: KeyIndex, model: fellegi_sunter.Model,
    read: Callable[[set[str]], Iterable[Contact]], *, known: Iterable[Contact] = (),
    threshold: float = DEFAULT_THRESHOLD, max_block: int = DEFAULT_MAX_BLOCK,
    rounds: int = MAX_ROUNDS,
) -> Around:
    """The groups holding a `focus` contact, as a whole run over `index`'s practice with
    `model` would form them, reading (`read`: ids -> their current records) only the
    focus contacts, their candidates, and theirs in turn while a group grows. `known`:
    records already read (not read again). `index` must hold the focus contacts'
    current keys (contacts gone: not in it)."""
    wanted = set(focus)
    pool: dict[str, Contact] = {}
    for c in known:
        pool.setdefault(c.contact_id, c)
    count = 0
    expanded: dict[str, set[str]] = {}
    todo = wanted
    pairs = 0
    for round_no in range(1, rounds + 1):
        found = index.candidates(todo - set(expanded), max_block)
        expanded.update(found)
        missing = (set(found).union(*found.values()) if found else set()) - set(pool)
        if missing:
            for c in read(missing):
                if c.contact_id in missing and c.contact_id not in pool:
                    pool[c.contact_id] = c
                    count += 1
        decided = decide(pool.values(), expanded, index, model, threshold, max_block)
        pairs = decided.pairs
        if not decided.reached:
            groups = [g for g in decided.groups if not wanted.isdisjoint(g.contact_ids)]
            return Around(groups, count, round_no, pairs)
        todo = decided.reached
    return Around(None, count, rounds, pairs)
