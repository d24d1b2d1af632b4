"""Benchmark: duplicate groups in on-call family runs, with and without the kept index.

    .venv/bin/python bench/family_duplicates_bench.py --patients 1500 [--seed 11]

Generates a practice (CSV exports) in a scratch directory, runs a full scan (it keeps the
duplicate index), then dry-run family runs (`--contact ID`) about every member of every
duplicate group the full scan found, and (`--patient ID`) about `--sample` patients:
first through the kept index, then with the index deleted (the exact-key reads family
runs made before it, now their fallback). One kept key change is added after the full
scan, as an incremental scan leaves it, so each run applies it as in service. Prints one
JSON line per mode: rows read per run (min / median / mean / max), seconds per run
(median / max), and how many group
member runs did not find their group as the full scan did (`missed`: not found;
`differs`: found with another probability) and how many groups a run about one of
their members missed. The defaults are the sizes of
tests/scan/test_family.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("OPRECON_BENCH_CODE")
                or str(Path(__file__).resolve().parent.parent))

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _groups(result: Any) -> dict[tuple[str, ...], str]:
    return {tuple(i.finding.contact_ids or ()): i.finding.detail for i in result.plan.items
            if i.finding.check == "contact_duplicate"}


def _records(path: Path) -> int:
    with open(path, encoding="utf-8", newline="") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--sample", type=int, default=16, help="patients asked about")
    parser.add_argument("--max-groups", type=int, default=0,
                        help="ask about the members of this many groups (0: all)")
    args = parser.parse_args()

    import random

    import sqlalchemy as sa
    import structlog

    from config.settings import load_settings
    from worker.devtools.generator import generate_practice
    from worker.matching.index import contact_keys
    from worker.scan.engine import Deps, ScopeRequest
    from worker.scan.incremental import family_reconcile, family_seeds, full_reconcile
    from worker.sources.csv_source import CsvOPSource, CsvPortalSource
    from worker.state import duplicates as kept
    from worker.state.db import make_engine, migrate, session_factory
    from worker.state.models import DuplicateIndex

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        generate_practice(root, args.patients, seed=args.seed, now=NOW)
        total = sum(_records(f) for f in (*root.glob("op/*.csv"), *root.glob("portal/*.csv")))
        state = f"sqlite:///{root / 'state.sqlite'}"
        migrate(state)
        settings = load_settings(state_db_url=state, practice="bench", metrics_port=0)
        op, portal = CsvOPSource(root / "op"), CsvPortalSource(root / "portal")
        deps = Deps(settings, session_factory(make_engine(state)), op, portal)
        groups = _groups(full_reconcile(deps, NOW))
        # As after an incremental scan that changed a contact: one kept key change, so
        # each run applies the kept changes to the kept keys (as it does in service).
        first = next(c for c in op.contacts() if hasattr(c, "contact_id"))
        ids, keys = contact_keys([first])
        with deps.sessions() as session, session.begin():
            kept.save_key_changes(session, "bench", {ids[0]: keys[0].tolist()}, NOW, NOW)
        asked = dict(random.Random(7).sample(sorted(groups.items()), args.max_groups)
                     if 0 < args.max_groups < len(groups) else groups)
        patients = [p.patient_id for p in op.patients() if hasattr(p, "patient_id")]
        sample = random.Random(5).sample(sorted(set(patients)), min(args.sample,
                                                                     len(patients)))
        for mode in ("kept index", "exact keys (before; the fallback)"):
            if mode.startswith("exact"):
                with deps.sessions() as session, session.begin():
                    session.execute(sa.delete(DuplicateIndex))
            rows, seconds, missed, differs = [], [], 0, 0
            lost: set[tuple[str, ...]] = set()
            asks = [ScopeRequest("contact", m) for g in asked for m in g]
            asks += [ScopeRequest("patient", p) for p in sample]
            for req in asks:
                t0 = time.perf_counter()
                result = family_reconcile(deps, family_seeds(req), req, kind="adhoc",
                                          guard=lambda *_: nullcontext(), now=NOW,
                                          dry_run=True)
                seconds.append(time.perf_counter() - t0)
                rows.append(result.rows_read or 0)
                if req.kind == "contact":
                    found = _groups(result)
                    mine = {g: d for g, d in groups.items() if req.target in g}
                    missed += sum(1 for g in mine if g not in found)
                    lost.update(g for g in mine if g not in found)
                    differs += sum(1 for g, d in mine.items() if g in found and found[g] != d)
            print(json.dumps({
                "mode": mode, "patients": args.patients, "rows": total,
                "groups": len(groups), "groups_asked": len(asked), "runs": len(rows),
                "rows_read": {"min": min(rows), "median": statistics.median(rows),
                              "mean": round(statistics.mean(rows), 1), "max": max(rows)},
                "seconds": {"median": round(statistics.median(seconds), 4),
                            "max": round(max(seconds), 4)},
                "group_member_runs_missed": missed, "group_member_runs_differs": differs,
                "groups_missed_by_a_member_run": len(lost),
            }))


if __name__ == "__main__":
    main()
