"""Streaming check: read a million-row OP export into a Snapshot, report speed and memory.

Run by hand (`.venv/bin/python bench/load_million.py [--rows N]`), not in the test suite:
it shows that CsvOPSource streams (peak memory is the snapshot's records, not the files)
and how long the read floor of a large practice takes.
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from worker.model.snapshot import Snapshot
from worker.sources.csv_source import CsvOPSource
from worker.sources.layout import OP_LAYOUT

ROLES = ("Mother", "Father", "Guardian", "Other Relative", "Self")
AUTHORITIES = ("Joint", "Exclusive", "None", "")
CITIES = ("Springfield", "Riverside", "Franklin", "Greenville", "Fairview")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_files(out: Path, rows: int) -> None:
    """Plain synthetic rows written straight with csv.writer: fast, no records built."""
    base = datetime(2024, 1, 1, tzinfo=UTC)
    stamps = [(base + timedelta(minutes=m)).isoformat() for m in range(1440)]
    with open(out / "patients.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(OP_LAYOUT["patients"])
        for i in range(rows):
            w.writerow((f"P{i}", f"First{i % 997}", f"Last{i % 7919}",
                        f"{2000 + i % 24}-{1 + i % 12:02d}-{1 + i % 28:02d}",
                        "" if i % 3 else "N/A", "Active" if i % 50 else "Inactive",
                        stamps[i % 1440]))
    with open(out / "contacts.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(OP_LAYOUT["contacts"])
        for i in range(rows):
            w.writerow((f"C{i}", f"First{i % 991}", f"Last{i % 7919}", f"user{i}@example.com",
                        "" if i % 2 else f"{1970 + i % 30}-{1 + i % 12:02d}-{1 + i % 28:02d}",
                        f"555-{i % 10000:04d}", f"{i % 500} Main St", CITIES[i % 5],
                        f"{10000 + i % 90000}", "true" if i % 40 else "false",
                        f"P{i}" if i % 25 == 0 else "", stamps[(i * 7) % 1440]))
    with open(out / "family_contacts.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(OP_LAYOUT["family_contacts"])
        for i in range(rows):
            w.writerow((f"P{i}", f"C{i}", ROLES[i % 5], AUTHORITIES[i % 4],
                        stamps[(i * 13) % 1440]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="oprecon-bench-") as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        write_files(out, args.rows)
        wrote = time.perf_counter() - started
        size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        rss_before = peak_rss_mib()

        source = CsvOPSource(out)
        started = time.perf_counter()
        snap = Snapshot.build(source.patients(), source.contacts(), source.family_contacts())
        took = time.perf_counter() - started
        total = 3 * args.rows

    counts = snap.counts()
    print(f"wrote 3 x {args.rows:,} rows ({size:,.0f} MiB) in {wrote:.1f}s")
    print(f"read {total:,} rows into a Snapshot in {took:.1f}s: {total / took:,.0f} rows/s")
    print(f"counts: patients={counts['patients']:,} contacts={counts['contacts']:,} "
          f"family_contacts={counts['family_contacts']:,} invalid={counts['invalid']:,}")
    print(f"peak RSS: {rss_before:,.0f} MiB before reading, {peak_rss_mib():,.0f} MiB after")
    return 0 if counts["invalid"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
