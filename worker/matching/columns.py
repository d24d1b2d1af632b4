"""The contacts as normalised, integer-coded columns (numpy), built once per run.

Why: a million contacts as Python objects cannot be compared pair by pair in time. Each
field is normalised once per distinct value (names repeat a lot) and replaced by an
integer code into a vocabulary, so blocking is a sort of integers and comparisons run on
the (far fewer) distinct value pairs. Code -1 means missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any

import numpy as np

from worker.matching import nicknames
from worker.matching.normalise import (
    address_parts,
    dob_parts,
    fold,
    name_key,
    normalise_email,
    normalise_phone,
    normalise_postcode,
    soundex,
)
from worker.model.records import Contact


def _codes(raw: list, normalise: Callable[[Any], str]) -> tuple[np.ndarray, list[str]]:
    """Normalise each distinct raw value once; integer codes (-1 for "") and the values."""
    norm_of = {value: normalise(value) if value else "" for value in dict.fromkeys(raw)}
    values = list(dict.fromkeys(v for v in norm_of.values() if v))
    code_of_norm = {v: k for k, v in enumerate(values)}
    code_of_norm[""] = -1
    code_of_raw = {value: code_of_norm[norm] for value, norm in norm_of.items()}
    return np.fromiter((code_of_raw[v] for v in raw), dtype=np.int32, count=len(raw)), values


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
        first_raw = [c.first_name or "" for c in rows]
        last_raw = [c.last_name or "" for c in rows]
        keys = {v: name_key(v) for v in dict.fromkeys(first_raw + last_raw)}
        names = list(dict.fromkeys(k[1] for k in keys.values() if k[1]))
        name_code = {v: pos for pos, v in enumerate(names)}
        name_code[""] = -1
        code_of = {raw: name_code[k[1]] for raw, k in keys.items()}
        self.first = np.fromiter((code_of[v] for v in first_raw), dtype=np.int32, count=n)
        self.last = np.fromiter((code_of[v] for v in last_raw), dtype=np.int32, count=n)
        suffixes: dict[str, int] = {"": 0}
        self.suffix = np.fromiter(
            (suffixes.setdefault(keys[f][2] + keys[last][2], len(suffixes))
             for f, last in zip(first_raw, last_raw, strict=True)), dtype=np.int32, count=n)
        del first_raw, last_raw, keys, code_of
        self.email, self.emails = _codes([c.email for c in rows], normalise_email)
        self.phone, self.phones = _codes([c.phone for c in rows], normalise_phone)
        self.city, self.cities = _codes([c.city for c in rows], lambda v: fold(v).strip())
        self.postcode, self.postcodes = _codes([c.postcode for c in rows], normalise_postcode)
        address_raw = [c.address or "" for c in rows]
        parts = {v: address_parts(v) for v in dict.fromkeys(address_raw)}
        self.number, self.numbers = _codes([parts[v][0] for v in address_raw], str)
        self.street, self.streets = _codes([parts[v][1] for v in address_raw], str)
        del address_raw, parts
        # The whole address (house, street, postcode) as one code; -1 without a street
        # or postcode. The house number's code is shifted by one (-1, none, becomes 0)
        # and spaced by the count of numbers, so "4 Main St" and "1 Oak St" never meet.
        key = self.street.astype(np.int64) * (len(self.numbers) + 1) + (self.number + 1)
        key = key * (int(self.postcode.max(initial=0)) + 2) + self.postcode
        key[(self.street < 0) | (self.postcode < 0)] = -1
        _, self.addr = np.unique(key, return_inverse=True)
        self.addr = self.addr.astype(np.int32)
        self.addr[key < 0] = -1
        dobs = [c.dob if c.dob is not None else (c.dob_text or None) for c in rows]
        parts_of = {d: dob_parts(d) for d in dict.fromkeys(dobs)}  # ~20,000 distinct
        ymd = [parts_of[d] for d in dobs]
        del dobs, parts_of
        self.y = np.fromiter((t[0] for t in ymd), dtype=np.int16, count=n)
        self.m = np.fromiter((t[1] for t in ymd), dtype=np.int8, count=n)
        self.d = np.fromiter((t[2] for t in ymd), dtype=np.int8, count=n)
        del ymd
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
