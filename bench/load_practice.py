"""Load a generated practice's exports into a Snapshot and print time and peak memory.

    python bench/load_practice.py --patients 1000000 [--dir DIR] [--seed 1]

Generates the practice into DIR first unless it is already there. This is the
"a 1,000,000-patient export loads within the machine" figure of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from worker.devtools.generator import generate_practice
from worker.scan.engine import read_snapshot
from worker.sources.csv_source import CsvOPSource, CsvPortalSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="oprecon-load-"))
    if not (root / "manifest.jsonl").exists():
        t = time.perf_counter()
        generate_practice(root, patients=args.patients, seed=args.seed,
                          now=datetime(2026, 11, 2, 14, tzinfo=UTC))
        print(f"generated {args.patients} patients in {time.perf_counter() - t:.1f}s -> {root}")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    snap = read_snapshot(CsvOPSource(root / "op"), CsvPortalSource(root / "portal"))
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = sum(p.stat().st_size for p in root.rglob("*.csv")) / 2**20
    print(json.dumps({
        "patients": args.patients, "records": snap.records, "invalid": len(snap.invalid),
        "csv_mb": round(size), "load_seconds": round(seconds, 1),
        "records_per_second": round(snap.records / seconds),
        "peak_rss_mb": round(peak), "rss_before_load_mb": round(before),
    }))


if __name__ == "__main__":
    main()
