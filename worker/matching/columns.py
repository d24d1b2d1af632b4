"""The contacts as normalised, integer-coded columns (numpy), built once per run.

Why: a million contacts as Python objects cannot be compared pair by pair in time. Each
field is normalised once per distinct value (names repeat a lot) and replaced by an
integer code into a vocabulary, so blocking is a sort of integers and comparisons run on
the (far fewer) distinct value pairs. Code -1 means missing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any

import numpy as np

from worker.matching import nicknames
from worker.matching.normalise import (
    PHONE_KEY_BASE,
    address_parts,
    dob_parts,
    fold,
    name_key,
    normalise_email,
    normalise_postcode,
    phone_key,
    soundex,
)
from worker.model.records import Contact


def _factorize(values: list) -> tuple[np.ndarray, list]:
    """Codes 0..k-1 of `values` in order of first appearance, and the k distinct values.

    One C-level pass (`dict.setdefault` mapped over the list records where each value was
    first seen); the rest is numpy: a million values in ~0.2 s.
    """
    first: dict = {}
    pos = np.fromiter(map(first.setdefault, values, itertools.count()), dtype=np.int64,
                      count=len(values))
    dense = np.empty(len(values), dtype=np.int32)
    dense[np.fromiter(first.values(), dtype=np.int64, count=len(first))] = np.arange(
        len(first), dtype=np.int32)
    return dense[pos], list(first)


def _drop_blank(codes: np.ndarray, values: list) -> tuple[np.ndarray, list]:
    """`codes` into `values` with the value "" removed: its code becomes -1."""
    try:
        blank = values.index("")
    except ValueError:
        return codes, values
    remap = np.arange(len(values), dtype=np.int32)
    remap[blank] = -1
    remap[blank + 1:] -= 1
    del values[blank]
    return remap[codes], values


def _codes(raw: list, normalise: Callable[[Any], str],
           repeats: bool = True) -> tuple[np.ndarray, list[str]]:
    """Normalise each distinct raw value once; integer codes (-1 for "") and the values.

    `repeats=False` (emails: nearly all distinct) normalises every value instead: finding
    the distinct ones first would cost more than it saves.
    """
    if not repeats:
        return _drop_blank(*_factorize([normalise(value) if value else "" for value in raw]))
    raw_codes, distinct = _factorize(raw)
    norm_codes, values = _drop_blank(*_factorize(
        [normalise(value) if value else "" for value in distinct]))
    return norm_codes[raw_codes], values


def _phone_codes(raw: list) -> tuple[np.ndarray, list[str]]:
    """`_codes(raw, normalise_phone)` by integer keys: nearly every phone is distinct, and
    a numpy sort of integers codes them far faster than dicts of strings."""
    keys = np.fromiter(map(phone_key, raw), dtype=np.int64, count=len(raw))
    uniq, inverse = np.unique(keys, return_inverse=True)
    codes: np.ndarray = inverse.astype(np.int32).reshape(-1)
    if len(uniq) and uniq[0] < 0:
        uniq, codes = uniq[1:], codes - 1
    # Back to text, with the leading zeros the integer lost: a kept phone has 7-10 digits.
    digits, width = (uniq % PHONE_KEY_BASE).astype(str), uniq // PHONE_KEY_BASE
    values = np.empty(len(uniq), dtype=object)
    for w in range(7, 11):
        if (sel := width == w).any():
            values[sel] = np.char.zfill(digits[sel], w)
    return codes, values.tolist()


class Columns:
    """Normalised contacts; row i of every array is contact `ids[i]`.

    `names` is one vocabulary for first and last names (so a swapped name compares with
    the same code); its per-name arrays hold the Soundex code, whether it is a known given
    name, and up to three nickname-group ids.
    """

    def __init__(self, contacts: Iterable[Contact]) -> None:
        # In id order: random samples (u, EM) then do not depend on the input order.
        rows = sorted(contacts, key=attrgetter("contact_id"))
        self.ids = [c.contact_id if c.contact_id.__class__ is str else str(c.contact_id)
                    for c in rows]
        self.n = n = len(rows)
        # Names: one vocabulary for both fields; the suffix (Jr/Sr) split off.
        raw_codes, raw_names = _factorize([c.first_name or "" for c in rows]
                                          + [c.last_name or "" for c in rows])
        keys = [name_key(v) for v in raw_names]
        name_codes, names = _drop_blank(*_factorize([k[1] for k in keys]))
        code_of = name_codes[raw_codes]
        self.first, self.last = code_of[:n].copy(), code_of[n:].copy()
        # The suffix of a contact: its first name's and its last name's, joined.
        sfx_codes, sfx_values = _factorize([k[2] for k in keys])
        sfx_raw = sfx_codes[raw_codes].astype(np.int64)
        pairs, pair_codes = np.unique(sfx_raw[:n] * len(sfx_values) + sfx_raw[n:],
                                      return_inverse=True)
        joined = [sfx_values[p // len(sfx_values)] + sfx_values[p % len(sfx_values)]
                  for p in pairs.tolist()]
        suffixes: dict[str, int] = {"": 0}
        ids = np.array([suffixes.setdefault(v, len(suffixes)) for v in joined],
                       dtype=np.int32)
        self.suffix = ids[pair_codes]
        del raw_codes, raw_names, keys, name_codes, code_of, sfx_raw, pair_codes
        self.email, self.emails = _codes([c.email for c in rows], normalise_email,
                                         repeats=False)
        self.phone, self.phones = _phone_codes([c.phone for c in rows])
        self.city, self.cities = _codes([c.city for c in rows], lambda v: fold(v).strip())
        self.postcode, self.postcodes = _codes([c.postcode for c in rows], normalise_postcode)
        addr_codes, addr_distinct = _factorize([c.address or "" for c in rows])
        parts = [address_parts(v) for v in addr_distinct]
        number, self.numbers = _codes([p[0] for p in parts], str)
        street, self.streets = _codes([p[1] for p in parts], str)
        self.number, self.street = number[addr_codes], street[addr_codes]
        del addr_codes, addr_distinct, parts
        # The whole address (house, street, postcode) as one code; -1 without a street
        # or postcode. The house number's code is shifted by one (-1, none, becomes 0)
        # and spaced by the count of numbers, so "4 Main St" and "1 Oak St" never meet.
        key = self.street.astype(np.int64) * (len(self.numbers) + 1) + (self.number + 1)
        key = key * (int(self.postcode.max(initial=0)) + 2) + self.postcode
        key[(self.street < 0) | (self.postcode < 0)] = -1
        _, self.addr = np.unique(key, return_inverse=True)
        self.addr = self.addr.astype(np.int32)
        self.addr[key < 0] = -1
        dob_codes, dob_distinct = _factorize(
            [c.dob if c.dob is not None else (c.dob_text or None) for c in rows])
        ymd = np.array([dob_parts(d) for d in dob_distinct], dtype=np.int32).reshape(-1, 3)
        self.y = ymd[:, 0].astype(np.int16)[dob_codes]
        self.m = ymd[:, 1].astype(np.int8)[dob_codes]
        self.d = ymd[:, 2].astype(np.int8)[dob_codes]
        del dob_codes, dob_distinct, ymd
        self.dob = self.y.astype(np.int32) * 10000 + self.m.astype(np.int32) * 100 + self.d
        self.dob[self.y == 0] = -1
        self.names = names
        self.name_words = [v.split(" ") for v in names]
        compact = [v.replace(" ", "") for v in names]
        self.name_compact = compact
        self.name_known = np.array(
            [nicknames.is_known(v) or nicknames.is_known(v.split(" ")[0]) for v in names],
            dtype=bool)
        groups = np.full((len(names), 3), -1, dtype=np.int32)
        for pos, v in enumerate(names):
            for k, gid in enumerate(sorted(nicknames.group_ids(v.split(" ")[0]))[:3]):
                groups[pos, k] = gid
        self.name_groups = groups
        sx_codes: dict[str, int] = {}
        self.name_sx = np.array([sx_codes.setdefault(soundex(v), len(sx_codes))
                                 for v in compact], dtype=np.int32)
        self.suffix_names = list(suffixes)
        # The vocabularies as object arrays: comparisons index them by code in C.
        self.name_obj = np.array(compact, dtype=object)
        self.email_obj = np.array(self.emails, dtype=object)
        self.phone_obj = np.array(self.phones, dtype=object)
        self.street_obj = np.array(self.streets, dtype=object)
        self.city_obj = np.array(self.cities, dtype=object)
        # Filled by compare: per vocabulary, each value's length and character histogram.
        self.char_counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # Filled by blank_common: values so common they identify nobody (placeholders).
        self.placeholder_values = 0
        self.placeholder_contacts = 0

    def sx(self, name_codes: np.ndarray) -> np.ndarray:
        """Soundex codes of name codes (-1 stays -1)."""
        out = np.full(name_codes.shape, -1, dtype=np.int32)
        ok = name_codes >= 0
        out[ok] = self.name_sx[name_codes[ok]]
        return out

    def blank_common(self, field: str, cap: int) -> None:
        """Values of `field` held by more than `cap` contacts are placeholders: missing."""
        col: Any = getattr(self, field)
        present = col[col >= 0]
        if not len(present):
            return
        counts = np.bincount(present)
        common = np.flatnonzero(counts > cap)
        if len(common):
            self.placeholder_values += len(common)
            hit = np.isin(col, common)
            self.placeholder_contacts += int(hit.sum())
            col[hit] = -1
