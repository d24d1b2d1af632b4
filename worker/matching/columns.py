"""The contacts as normalised, integer-coded columns (numpy), built once per run.

Why: a million contacts as Python objects cannot be compared pair by pair in time. Each
field is normalised once per distinct value (names repeat a lot) and replaced by an
integer code into a vocabulary, so blocking is a sort of integers and comparisons run on
the (far fewer) distinct value pairs. Code -1 means missing.
"""

from __future__ import annotations

from collections.abc import Iterable
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


class Vocab:
    """Distinct values of one field, each with a small integer code."""

    __slots__ = ("codes", "values")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.values: list[str] = []

    def code(self, value: str) -> int:
        if not value:
            return -1
        got = self.codes.get(value)
        if got is None:
            got = self.codes[value] = len(self.values)
            self.values.append(value)
        return got


class Columns:
    """Normalised contacts; row i of every array is contact `ids[i]`.

    `names` is one vocabulary for first and last names (so a swapped name compares with
    the same code); its per-name arrays hold the Soundex code, whether it is a known given
    name, and up to three nickname-group ids.
    """

    def __init__(self, contacts: Iterable[Contact]) -> None:
        names, sx, emails, phones = Vocab(), Vocab(), Vocab(), Vocab()
        streets, numbers, postcodes, cities, addrs = Vocab(), Vocab(), Vocab(), Vocab(), Vocab()
        cols: dict[str, list[int]] = {k: [] for k in (
            "first", "last", "suffix", "email", "phone", "street", "number", "postcode",
            "city", "addr", "y", "m", "d")}
        ids: list[str] = []
        f_add, l_add, s_add = cols["first"].append, cols["last"].append, cols["suffix"].append
        e_add, p_add = cols["email"].append, cols["phone"].append
        st_add, nu_add, pc_add = cols["street"].append, cols["number"].append, cols[
            "postcode"].append
        ci_add, ad_add = cols["city"].append, cols["addr"].append
        y_add, m_add, d_add = cols["y"].append, cols["m"].append, cols["d"].append
        suffixes: dict[str, int] = {"": 0}
        addr_cache: dict[str, tuple[str, str]] = {}
        for c in contacts:
            cid = c.contact_id
            ids.append(cid if cid.__class__ is str else str(cid))
            fk = name_key(c.first_name or "")
            lk = name_key(c.last_name or "")
            f_add(names.code(fk[1]))
            l_add(names.code(lk[1]))
            suffix = fk[2] + lk[2]
            s_add(suffixes.setdefault(suffix, len(suffixes)))
            e_add(emails.code(normalise_email(c.email) if c.email else ""))
            p_add(phones.code(normalise_phone(c.phone) if c.phone else ""))
            raw_addr = c.address or ""
            parts = addr_cache.get(raw_addr)
            if parts is None:
                parts = addr_cache[raw_addr] = address_parts(raw_addr)
            code = normalise_postcode(c.postcode) if c.postcode else ""
            nu_add(numbers.code(parts[0]))
            st_add(streets.code(parts[1]))
            pc_add(postcodes.code(code))
            ci_add(cities.code(fold(c.city).strip() if c.city else ""))
            ad_add(addrs.code(f"{parts[0]} {parts[1]}|{code}" if code and parts[1] else ""))
            y, m, d = dob_parts(c.dob)
            y_add(y)
            m_add(m)
            d_add(d)
        self.ids = ids
        self.n = len(ids)
        i32 = np.int32
        self.first = np.array(cols["first"], dtype=i32)
        self.last = np.array(cols["last"], dtype=i32)
        self.suffix = np.array(cols["suffix"], dtype=i32)
        self.email = np.array(cols["email"], dtype=i32)
        self.phone = np.array(cols["phone"], dtype=i32)
        self.street = np.array(cols["street"], dtype=i32)
        self.number = np.array(cols["number"], dtype=i32)
        self.postcode = np.array(cols["postcode"], dtype=i32)
        self.city = np.array(cols["city"], dtype=i32)
        self.addr = np.array(cols["addr"], dtype=i32)
        self.y = np.array(cols["y"], dtype=np.int16)
        self.m = np.array(cols["m"], dtype=np.int8)
        self.d = np.array(cols["d"], dtype=np.int8)
        self.dob = self.y.astype(np.int32) * 10000 + self.m.astype(np.int32) * 100 + self.d
        self.dob[self.y == 0] = -1
        self.names = names.values
        self.name_words = [v.split(" ") for v in names.values]
        compact = [v.replace(" ", "") for v in names.values]
        self.name_compact = compact
        self.name_known = np.array(
            [nicknames.is_known(v) or nicknames.is_known(v.split(" ")[0]) for v in compact],
            dtype=bool)
        groups = np.full((len(compact), 3), -1, dtype=np.int32)
        for pos, v in enumerate(compact):
            for k, gid in enumerate(sorted(nicknames.group_ids(v.split(" ")[0]))[:3]):
                groups[pos, k] = gid
        self.name_groups = groups
        self.name_sx = np.array([sx.code(soundex(v)) for v in compact], dtype=i32)
        self.emails = emails.values
        self.phones = phones.values
        self.streets = streets.values
        self.cities = cities.values
        self.suffix_names = list(suffixes)
        # Filled by blocking: values so common they identify nobody (placeholders).
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
