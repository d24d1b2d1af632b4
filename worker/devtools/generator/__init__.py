"""A synthetic practice: OP and portal exports plus the findings a correct run must raise.

Why it exists: the checks are scored against ground truth, so every defect is planted in
an *isolated* household (its own contacts, users and links) whose consequences under
docs/checks.md are known exactly, and every finding it causes, consequential ones
included, goes to `manifest.jsonl`. Everything else is clean by construction: unique
emails and phones, and no two contacts share a name token with a matching date of birth,
so the duplicate detector cannot find a pair we did not plant.

It must scale to a million patients: names come from pools built once from Faker's
word lists and are sampled with one seeded `random.Random`; rows are streamed to the
files in small batches by one writer thread per file (the shared CSV writers take one
iterable per file, and one generation pass has to feed all seven at once).

Same seed and same `now` give byte-identical files.

One module per thing planted, each read on its own; the builder is one class chain,
each link adding one kind of planter:

    people.py          name pools, identities, household specs (adults, kids, homes)
    builder.py         _Core: ids, clocks, values, emit/expect, one constructor per row
    households.py      _Households: a household from its specs; clean households
    duplicates.py      _Duplicates: near-duplicate contact records
    op_defects.py      _OpDefects: defects in OP, bad rows, recent changes
    portal_defects.py  _PortalDefects: defects in the portal
    practice.py        _Builder and the defect plan; the practice in memory
    writer.py          the files on disk and the command line
"""

from worker.devtools.generator.builder import (
    CONNECTED,
    OP_TABLES,
    PORTAL_TABLES,
    PROPAGATION_DELAY,
    TABLES,
    WELCOME_WINDOW,
    DefectRates,
    RawRow,
)
from worker.devtools.generator.duplicates import (
    ACCENTED_F,
    ACCENTED_M,
    NICKNAMES_F,
    NICKNAMES_M,
)
from worker.devtools.generator.people import AREA_CODES, EMAIL_DOMAINS, _norm
from worker.devtools.generator.practice import (
    DEFECT_KINDS,
    PracticeRecords,
    generate_records,
)
from worker.devtools.generator.writer import GenerateResult, generate_practice, main

__all__ = [
    "ACCENTED_F",
    "ACCENTED_M",
    "AREA_CODES",
    "CONNECTED",
    "DEFECT_KINDS",
    "EMAIL_DOMAINS",
    "NICKNAMES_F",
    "NICKNAMES_M",
    "OP_TABLES",
    "PORTAL_TABLES",
    "PROPAGATION_DELAY",
    "TABLES",
    "WELCOME_WINDOW",
    "DefectRates",
    "GenerateResult",
    "PracticeRecords",
    "RawRow",
    "_norm",
    "generate_practice",
    "generate_records",
    "main",
]
