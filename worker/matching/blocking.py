"""Blocking: which pairs of contacts are compared at all.

Comparing every contact with every other is N²/2 pairs (5·10¹¹ at a million). Each pass
below pairs only the contacts that share one key; a duplicate needs to share the key of
just one pass to be compared, so several loose passes find pairs that any single one
misses (a DOB typo *and* a move; swapped first and last names; a married name).

| pass | key | finds |
|---|---|---|
| `email` | normalised email | re-registrations, married names with the family email |
| `phone` | normalised phone | the same, by phone |
| `address` | postcode + house number | re-registrations at one home, any name change |
| `dob_name` | DOB + Soundex of either name | typos, nicknames, swapped names, new contact details |
| `names` | Soundex of both names, in either order | DOB typos or missing DOB, moves |
| `name_year` | Soundex of either name + birth year | a nickname *and* a DOB typo *and* a move |
| `postcode_name` | postcode + Soundex of either name | missing DOB, new email and phone |
| `number_name` | house number + Soundex of either name | the same with a postcode typo |
| `dob` | DOB alone (small blocks only) | both names mistyped |

A key held by more than the pass's cap of contacts makes a block too big to compare
(a very common name in one year); it is skipped and counted in `oversized_blocks`. The
cap is `max_block` (50) for the identifier and DOB passes, `LOOSE_BLOCK` (12) for names
alone or with a postcode or house number, and `SMALL_BLOCK` (12) for the two loosest:
they only help where their key is rare, and elsewhere would cost most of the pairs.
Emails, phones and addresses held by that many contacts were already made missing as
placeholders (`Columns.blank_common`). Pairs found by several passes are compared once;
`passes` records, per pair, which passes found it (bit mask), for EM training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.matching.columns import Columns

PASSES = ("email", "phone", "address", "dob_name", "names", "name_year", "postcode_name",
          "number_name", "dob")
BIT = {name: 1 << pos for pos, name in enumerate(PASSES)}
IDENTIFIER_PASSES = BIT["email"] | BIT["phone"] | BIT["address"]
NAME_PASSES = (BIT["dob_name"] | BIT["names"] | BIT["name_year"] | BIT["postcode_name"]
               | BIT["number_name"] | BIT["dob"])
SMALL_BLOCK = 12  # the loosest passes (name_year, dob): only small blocks
LOOSE_BLOCK = 12  # passes on names alone or with a postcode or house number
_PASS_SHIFT = 4  # low bits of a packed pair key: the index of the pass that found it
assert len(PASSES) <= 1 << _PASS_SHIFT


@dataclass(slots=True)
class Candidates:
    """Candidate pairs, i < j, sorted, with the passes that found each."""

    i: np.ndarray
    j: np.ndarray
    passes: np.ndarray
    oversized_blocks: int


def _combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One int64 key from two non-negative code arrays; -1 where either is missing."""
    a64, b64 = a.astype(np.int64), b.astype(np.int64)
    width = int(b64.max()) + 1 if len(b64) else 1
    out = a64 * max(width, 1) + b64
    out[(a64 < 0) | (b64 < 0)] = -1
    return out


def _block_pairs(keys: np.ndarray, rows: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray,
                                                                          int]:
    """All pairs of rows sharing a key (blocks of 2..cap rows), and how many were too big."""
    keep = keys >= 0
    keys, rows = keys[keep], rows[keep]
    if len(keys) < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, 0
    width = int(rows.max()) + 1
    if int(keys.max()) < np.iinfo(np.int64).max // width:
        # Sort (key, row) packed into one integer: several times faster than an argsort.
        packed = keys * width + rows
        packed.sort()
        keys, rows = packed // width, packed % width
        del packed
    else:
        order = np.argsort(keys)  # the order within a block does not matter: i < j later
        keys, rows = keys[order], rows[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    out_i, out_j = [], []
    for size in range(2, min(cap, int(sizes.max())) + 1):
        at = starts[sizes == size]
        if not len(at):
            continue
        a, b = np.triu_indices(int(size), 1)
        out_i.append(rows[(at[:, None] + a).ravel()])
        out_j.append(rows[(at[:, None] + b).ravel()])
    oversized = int((sizes > cap).sum())
    if not out_i:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, oversized
    return np.concatenate(out_i), np.concatenate(out_j), oversized


def candidates(cols: Columns, cap: int, focus: np.ndarray | None = None) -> Candidates:
    """Candidate pairs of every pass, deduplicated.

    `focus` (a boolean mask), when given, keeps only pairs with at least one focus row:
    an incremental scan compares its changed contacts with everyone, through the same
    blocks, and nothing else.
    """
    n = cols.n
    rows = np.arange(n, dtype=np.int64)
    both = np.concatenate([rows, rows])
    f_sx, l_sx = cols.sx(cols.first), cols.sx(cols.last)
    either_sx = np.concatenate([f_sx, l_sx])
    dob = cols.dob.astype(np.int64)
    year = cols.y.astype(np.int64)
    year[year == 0] = -1
    lo, hi = np.minimum(f_sx, l_sx), np.maximum(f_sx, l_sx)
    names = _combine(lo, hi)
    names[(f_sx < 0) | (l_sx < 0)] = -1
    passes = {
        "email": (cols.email.astype(np.int64), rows, cap),
        "phone": (cols.phone.astype(np.int64), rows, cap),
        "address": (_combine(cols.postcode, cols.number), rows, cap),
        "dob_name": (_combine(np.concatenate([dob, dob]), either_sx), both, cap),
        "names": (names, rows, min(cap, LOOSE_BLOCK)),
        "name_year": (_combine(np.concatenate([year, year]), either_sx), both, SMALL_BLOCK),
        "postcode_name": (_combine(np.concatenate([cols.postcode, cols.postcode]), either_sx),
                          both, min(cap, LOOSE_BLOCK)),
        "number_name": (_combine(np.concatenate([cols.number, cols.number]), either_sx),
                        both, min(cap, LOOSE_BLOCK)),
        "dob": (dob, rows, SMALL_BLOCK),
    }
    # Every pass's pairs as one int64 each: (lo * n + hi) << 4 | pass index. One sort
    # of all of them then dedups across and within passes (a pair meets twice in a
    # pass on either name) and gathers each pair's passes, with no argsort or hashing.
    found_all = []
    oversized = 0
    for name, (keys, which, limit) in passes.items():
        bi, bj, over = _block_pairs(keys, which, limit)
        if name not in ("name_year", "dob"):  # these skip big blocks by design
            oversized += over
        lo_ij, hi_ij = np.minimum(bi, bj), np.maximum(bi, bj)
        del bi, bj
        keep = lo_ij != hi_ij
        if focus is not None:
            keep &= focus[lo_ij] | focus[hi_ij]
        found_all.append((lo_ij[keep] * n + hi_ij[keep]) << _PASS_SHIFT | PASSES.index(name))
        del lo_ij, hi_ij, keep
    found = np.concatenate(found_all) if found_all else np.empty(0, dtype=np.int64)
    del found_all
    found.sort()
    pair_keys = found >> _PASS_SHIFT
    bits = (np.int16(1) << (found & ((1 << _PASS_SHIFT) - 1)).astype(np.int16))
    del found
    if len(pair_keys):
        starts = np.flatnonzero(np.r_[True, pair_keys[1:] != pair_keys[:-1]])
        uniq = pair_keys[starts]
        merged = np.bitwise_or.reduceat(bits, starts)
    else:
        uniq, merged = pair_keys, bits
    del pair_keys, bits
    return Candidates((uniq // n).astype(np.int32), (uniq % n).astype(np.int32), merged,
                      oversized)
