"""Benchmark: an incremental scan in which 10 contacts changed, on a large practice.

    .venv/bin/python bench/incremental_duplicates_bench.py --patients 197000 --dir DIR

(197,000 generated patients have ~200,000 contacts.) Generates the practice into DIR once
(reused when there), copies its CSV exports to a scratch directory (`--op sqlite`: and
loads OP into a SQLite database there; the portal stays CSV), and in this one
process, as a worker runs scans: a full scan at T, incremental scans at T+20 and T+40
(they settle what the generator changed just before T and confirm the pending
findings), then 10 contacts change (6 edited: email, phone or a name; 2 re-registrations
of existing parents; 2 deleted, or `--deleted N`) and the incremental scan at T+70 is
timed. Prints one
JSON line: the code measured, contacts, the full scan's seconds, the incremental scan's
seconds, the rows it read and its trace lines about duplicates.

"Before vs after": run it once on this tree and once on the code before the kept
duplicate index, e.g. `git archive <commit> worker config | tar -x -C /tmp/before` and
`OPRECON_BENCH_CODE=/tmp/before python bench/incremental_duplicates_bench.py ...` (same
DIR, so the same practice).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("OPRECON_BENCH_CODE")
                or str(Path(__file__).resolve().parent.parent))

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SEED = 20260301


def _csv_rows(path: Path) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        yield from csv.DictReader(fh)


def _changes(rows: list[dict[str, str]], rng: random.Random, at: datetime, deleted: int
             ) -> tuple[list[str], list[dict[str, str]], list[dict[str, str]], set[int]]:
    """Change 10 contacts (`deleted` of them deleted, 2 re-registrations of existing
    parents, the rest edited: email, phone or last name): what each change was (kinds,
    no names), the edited rows (changed in `rows`), the new rows, the deleted rows."""
    stamp = at.isoformat()
    picked = rng.sample(range(len(rows)), 10)
    edited = 8 - deleted
    kinds, changed = [], []
    for n, k in enumerate(picked[:edited]):
        row = rows[k]
        if n % 3 == 0:
            row["email"] = f"changed{k}@example.net"
        elif n % 3 == 1:
            row["phone"] = f"207-555-{k % 10000:04d}"
        else:
            row["last_name"] = row["last_name"] + "-Doe"
        row["updated_at"] = stamp
        kinds.append(["email", "phone", "last name"][n % 3])
        changed.append(row)
    new = [dict(rows[k], contact_id=f"CBENCH{k}", first_name=rows[k]["first_name"].upper(),
                phone="", updated_at=stamp) for k in picked[edited:edited + 2]]
    kinds += ["re-registration"] * len(new)
    gone = set(picked[edited + 2:])
    kinds += ["deleted"] * len(gone)
    return kinds, changed, new, gone


def _change_contacts(work: Path, op_url: str | None, at: datetime, deleted: int) -> list[str]:
    path = work / "op" / "contacts.csv"
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or ())
        rows = list(reader)
    kinds, changed, new, gone = _changes(rows, random.Random(SEED), at, deleted)
    if op_url is not None:
        import sqlalchemy as sa

        from worker.sources.sql_source import load_table_sql

        engine = sa.create_engine(op_url)
        with engine.begin() as conn:
            for row in changed:
                conn.execute(sa.text("UPDATE contacts SET email = :email, phone = :phone, "
                                     "last_name = :last_name, updated_at = :updated_at "
                                     "WHERE contact_id = :contact_id"), row)
            for k in gone:
                conn.execute(sa.text("DELETE FROM contacts WHERE contact_id = :c"),
                             {"c": rows[k]["contact_id"]})
        load_table_sql(engine, "contacts", new)
        engine.dispose()
        return kinds
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fields, lineterminator="\n")
        writer.writeheader()
        for k, row in enumerate(rows + new):
            if k in gone:
                fh.write("\n")  # a deleted row; later lines keep their numbers
            else:
                writer.writerow(row)
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=197_000)
    ap.add_argument("--dir", type=Path, default=None, help="generated practice (kept)")
    ap.add_argument("--op", choices=("csv", "sqlite"), default="csv",
                    help="OP as CSV exports, or loaded into SQLite (the portal stays CSV)")
    ap.add_argument("--deleted", type=int, default=2, choices=range(9),
                    help="how many of the 10 changed contacts are deleted (a deletion "
                         "makes the scan read the OP id columns: worker.scan.deletions)")
    args = ap.parse_args()

    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    import worker
    from config.settings import load_settings
    from worker.devtools.generator import generate_practice
    from worker.scan.engine import Deps
    from worker.scan.incremental import full_reconcile, incremental_reconcile
    from worker.sources.csv_source import CsvOPSource, CsvPortalSource
    from worker.state.db import make_engine, migrate, session_factory

    root = args.dir or Path(tempfile.mkdtemp(prefix="oprecon-incdup-"))
    if not (root / "op" / "contacts.csv").exists():
        generate_practice(root, args.patients, seed=SEED, now=NOW)
    work = Path(tempfile.mkdtemp(prefix="oprecon-incdup-run-"))
    try:
        for sub in ("op", "portal"):
            shutil.copytree(root / sub, work / sub)
        state = f"sqlite:///{work / 'state.sqlite'}"
        migrate(state)
        settings = load_settings(state_db_url=state, practice="bench")
        op_url = f"sqlite:///{work / 'op.sqlite'}" if args.op == "sqlite" else None
        op: Any = CsvOPSource(work / "op")
        if op_url is not None:
            from worker.sources.sql_source import SqlOPSource, load_op_sql
            from worker.sources.sql_source import make_engine as op_engine

            engine = op_engine(op_url)
            load_op_sql(engine, *(_csv_rows(work / "op" / f"{t}.csv")
                                  for t in ("patients", "contacts", "family_contacts")))
            engine.dispose()
            op = SqlOPSource(op_url)
        deps = Deps(settings, session_factory(make_engine(state)), op,
                    CsvPortalSource(work / "portal"))
        t0 = time.perf_counter()
        full = full_reconcile(deps, NOW)
        full_seconds = time.perf_counter() - t0
        incremental_reconcile(deps, NOW + timedelta(minutes=20))
        incremental_reconcile(deps, NOW + timedelta(minutes=40))
        kinds = _change_contacts(work, op_url, NOW + timedelta(minutes=41), args.deleted)
        t0 = time.perf_counter()
        result = incremental_reconcile(deps, NOW + timedelta(minutes=70))
        seconds = time.perf_counter() - t0
        print(json.dumps({
            "code": str(Path(worker.__file__).resolve().parent.parent),
            "op": args.op, "patients": args.patients,
            "contacts": full.counts.get("contacts"),
            "full_seconds": round(full_seconds, 2), "changes": kinds,
            "incremental_seconds": round(seconds, 2),
            "incremental_read_seconds": round(result.read_seconds, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "trace": [line for line in result.trace
                      if line.startswith(("incremental:", "contact_duplicate:"))],
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
