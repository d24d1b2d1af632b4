"""Benchmark of sharded full scans (`worker.scan.shards`): wall time with N shards run at once.

Run: .venv/bin/python bench/shards_bench.py --patients 100000 --shards 2 [--json]

A generated practice (the main benchmark's seed and clock) is loaded into PostgreSQL,
OP and a copy of the portal (sharding pays only with indexed sources: with CSV exports
every shard streams every file). Then, each in fresh spawned processes:

- one full reconcile into state database A (the single-scan reference);
- one sharded full scan into state database B, its N shards run at the same time in N
  processes, as N workers would run them (state B in PostgreSQL: concurrent shards on
  SQLite serialize on its write lock);

and the findings of A and B are compared (they must be the same). Printed: the wall time
of each, each shard's time, rows read and peak RSS. On a machine with fewer cores than
shards the shards share the cores, so the figure there is a floor for the overhead, not
the speed-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.devtools import bench  # noqa: E402


def _full(op_url: str, state_url: str) -> dict[str, Any]:
    from worker.scan.incremental import full_reconcile

    bench._quiet()
    deps = bench._deps(op_url, "sql", state_url)
    t0 = time.perf_counter()
    result = full_reconcile(deps, bench.NOW)
    return {"seconds": time.perf_counter() - t0, "peak_mb": bench._peak_mb(),
            "findings": len(result.plan.items)}


def _shard(op_url: str, state_url: str, parent: int, index: int, count: int) -> dict[str, Any]:
    from worker.scan import shards

    bench._quiet()
    deps = bench._deps(op_url, "sql", state_url)
    started = time.time()
    result = shards.run_shard(deps, parent, index, count, now=bench.NOW)
    ended = time.time()
    return {"index": index, "seconds": round(ended - started, 2), "started": started,
            "ended": ended, "peak_mb": round(bench._peak_mb()),
            "records": result.summary()["records"]}


def _findings(state_url: str) -> set[tuple[str, str]]:
    from sqlalchemy import select

    from worker.state.db import make_engine, session_factory
    from worker.state.models import FindingRow

    engine = make_engine(state_url)
    try:
        with session_factory(engine)() as session:
            return {(r.fingerprint, r.state) for r in session.scalars(select(FindingRow))}
    finally:
        engine.dispose()


def measure(patients: int, count: int, pg_url: str = bench.DEFAULT_PG_URL) -> dict[str, Any]:
    import sqlalchemy as sa

    from worker.devtools.generator import generate_practice
    from worker.scan import shards
    from worker.state.models import Run

    work = Path(tempfile.mkdtemp(prefix="oprecon-shards-"))
    names = {k: f"oprecon_shards_{k}_{uuid.uuid4().hex[:8]}" for k in ("op", "a", "b")}
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    url = {k: sa.engine.make_url(pg_url).set(database=v).render_as_string(False)
           for k, v in names.items()}
    try:
        with admin.connect() as conn:
            for name in names.values():
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        generate_practice(work / "practice", patients, seed=bench.SEED, now=bench.NOW)
        bench._load_op(url["op"], work / "practice" / "op", work / "practice" / "portal")

        full = bench._in_child(_full, url["op"], url["a"])

        deps = bench._deps(url["op"], "sql", url["b"])  # migrates B before the clock
        parent = shards.start(deps, count, now=bench.NOW)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(count, maxtasksperchild=1) as pool:
            parts = pool.starmap(_shard, [(url["op"], url["b"], parent, i, count)
                                          for i in range(count)])
        # From the first shard's start to the last one's end: process start-up is not
        # part of a scan (a worker's pool is already running).
        wall = max(p.pop("ended") for p in parts) - min(p.pop("started") for p in parts)
        with deps.sessions() as session:
            status = session.get(Run, parent).status
        same = _findings(url["a"]) == _findings(url["b"])
        return {
            "patients": patients, "shards": count, "machine": bench.machine(),
            "full_seconds": round(full["seconds"], 2), "full_peak_rss_mb": round(full["peak_mb"]),
            "sharded_seconds": round(wall, 2), "speedup": round(full["seconds"] / wall, 2),
            "shard_runs": parts, "parent_status": status, "same_findings": same,
            "findings": full["findings"],
        }
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.patients, args.shards)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['patients']:,} patients, {result['findings']:,} findings, "
          f"same findings: {result['same_findings']}")
    print(f"single full scan      {result['full_seconds']} s, peak "
          f"{result['full_peak_rss_mb']} MB")
    print(f"{result['shards']} shards at once      {result['sharded_seconds']} s wall "
          f"(x{result['speedup']})")
    for part in result["shard_runs"]:
        print(f"  shard {part['index']}: {part['seconds']} s, {part['records']:,} records, "
              f"peak {part['peak_mb']} MB")


if __name__ == "__main__":
    main()
