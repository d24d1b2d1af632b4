"""Benchmark of `worker.matching.duplicates`: speed and memory at scale, and the
precision/recall evaluation on FEBRL and on household data, side by side with Splink and
the matcher before issue 15.

    # speed, memory, precision and recall on N household contacts (no extra needed)
    .venv/bin/python bench/duplicates_bench.py --contacts 1000000
    # the evaluation table of docs/benchmarks.md (needs: pip install -e '.[bench]')
    .venv/bin/python bench/duplicates_bench.py --eval

Household data: bench/households.py (re-registrations with typos, nicknames, swapped
names, missing fields, DOB typos and swaps, married names, moves; spouses with similar
names, Jr/Sr, shared family emails and landlines, common-name strangers). FEBRL:
bench/febrl.py (SSN withheld). Splink: bench/splink_runner.py. Old: bench/legacy_duplicates.py.
Figures are pairs: a group of three is three pairs.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import households  # noqa: E402

from worker.matching.duplicates import DuplicateStats, find_duplicate_groups  # noqa: E402
from worker.model.records import Contact  # noqa: E402

Pairs = set[tuple[str, str]]


def pairs(groups: Iterable[Iterable[str]]) -> Pairs:
    return {p for g in groups for p in itertools.combinations(sorted(g), 2)}


def score(found: Pairs, true: Pairs) -> dict[str, float]:
    hits = len(found & true)
    p = hits / len(found) if found else 1.0
    r = hits / len(true) if true else 1.0
    return {"precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0}


def make_contacts(n: int, seed: int = 7) -> tuple[list[Contact], list[tuple[str, ...]]]:
    """`n` household contacts (re-registrations included) and the true groups."""
    data = households.make(n, seed)
    return data.contacts, data.truth


# -- the matchers, each: contacts -> groups of ids ----------------------------------------


def ours(contacts: list[Contact]) -> list[tuple[str, ...]]:
    return [g.contact_ids for g in find_duplicate_groups(contacts)]


def legacy(contacts: list[Contact]) -> list[tuple[str, ...]]:
    from datetime import date

    import legacy_duplicates

    # The old matcher dropped a record whose DOB could not be read; here it only loses
    # the DOB (kinder to it than it was in production).
    clean = [c if c.dob is None or isinstance(c.dob, date) else
             Contact(c.contact_id, c.first_name, c.last_name, c.email, None, c.phone,
                     c.address, c.city, c.postcode, c.active) for c in contacts]
    return [g.contact_ids for g in legacy_duplicates.find_duplicate_groups(clean)]


def splink(contacts: list[Contact]) -> list[tuple[str, ...]]:
    import splink_runner

    return splink_runner.groups(contacts)


MATCHERS: dict[str, Callable[[list[Contact]], list[tuple[str, ...]]]] = {
    "oprecon": ours, "Splink 5": splink, "before (legacy)": legacy,
}


def evaluate(household_n: int, names: list[str]) -> list[dict]:
    import febrl

    sets: list[tuple[str, list[Contact], Pairs]] = [
        (name, contacts, febrl.true_pairs(contacts))
        for name, contacts in febrl.datasets().items()
    ]
    data = households.make(household_n, seed=11)
    sets.append((f"households ({len(data.contacts):,})", data.contacts, pairs(data.truth)))
    rows = []
    for set_name, contacts, true in sets:
        for name in names:
            t0 = time.perf_counter()
            found = pairs(MATCHERS[name](contacts))
            seconds = time.perf_counter() - t0
            row = {"data": set_name, "matcher": name, **score(found, true),
                   "seconds": round(seconds, 2)}
            if set_name.startswith("households"):
                row["false_pairs_by_trap"] = {k: len(v & found) for k, v in data.traps.items()}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| data | matcher | precision | recall | F1 | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['data']} | {r['matcher']} | {r['precision']:.4f} | "
                   f"{r['recall']:.4f} | {r['f1']:.4f} | {r['seconds']} |")
    return "\n".join(out)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale(n: int, seed: int) -> dict:
    t0 = time.perf_counter()
    data = households.make(n, seed)
    gen_seconds = time.perf_counter() - t0
    gc.collect()
    rss_before = _rss_mb()
    stats = DuplicateStats()
    t0, c0 = time.perf_counter(), time.process_time()
    groups = find_duplicate_groups(data.contacts, stats=stats)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    found, true = pairs(g.contact_ids for g in groups), pairs(data.truth)
    by_kind: dict[str, Counter] = {}
    group_of = {cid: g.contact_ids for g in groups for cid in g.contact_ids}
    for orig, dup, kinds in data.copies:
        for kind in kinds.split(", "):
            by_kind.setdefault(kind, Counter())[dup in group_of.get(orig, ())] += 1
    return {
        "contacts": len(data.contacts), "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2), "generate_seconds": round(gen_seconds, 2),
        "rss_before_mb": round(rss_before), "peak_rss_mb": round(_rss_mb()),
        **score(found, true), "true_pairs": len(true), "found_pairs": len(found),
        "comparisons": stats.comparisons, "oversized_blocks": stats.oversized_blocks,
        "placeholder_values": stats.placeholder_values, "vetoed": stats.vetoed,
        "false_pairs_by_trap": {k: len(v & found) for k, v in data.traps.items()},
        "recall_by_kind": {k: round(c[True] / (c[True] + c[False]), 4)
                           for k, c in sorted(by_kind.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--eval", action="store_true",
                        help="FEBRL and household evaluation, markdown table on stdout")
    parser.add_argument("--household", type=int, default=20_000,
                        help="household contacts in the evaluation (Splink: ~1 s per 1,000)")
    parser.add_argument("--matchers", default=",".join(MATCHERS),
                        help=f"comma-separated, of: {', '.join(MATCHERS)}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.eval:
        rows = evaluate(args.household, args.matchers.split(","))
        print(json.dumps(rows) if args.json else table(rows))
        return 0
    result = scale(args.contacts, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<20} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
