"""`oprecon bench`: what a full scan costs against merely reading the data, and the rest.

Why each choice:

- a generated practice (worker.devtools.generator, fixed seed and time), OP loaded into a fresh
  PostgreSQL database (as a practice's EHR would be read), the portal kept as CSV exports
  (a portal read is a stream of pages, like a file);
- every measured phase runs in a fresh *spawned* child process, so its peak RSS
  (`ru_maxrss`) is that phase's alone, not the generator's or an earlier phase's;
- the read floor is the adapters' own cost (iterate every row, count, drop): a reconcile
  cannot be faster, so `ratio` = reconcile / read floor says what checking and recording
  add on top of reading;
- the incremental scan is timed after the full scan's pending findings were confirmed
  and 100 OP rows changed, which is what one runs into every few minutes; once with the
  portal as CSV (each targeted read is a pass over a file) and once with a copy of the
  portal in the same PostgreSQL database (targeted reads are indexed queries); each
  time in a fresh process (cold) and then the next scan in the same process, as a
  worker's long-lived pool process runs it (warm: the CSV exports' indexes are cached).

Targets (docs/benchmarks.md): full reconcile of 100,000 patients <= 30 s, <= 2x the read
floor, peak <= 1 GB; incremental <= 1 s; 10,000 findings written well under a second.
The test suite never runs this.
"""

from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SEED = 20260301
PRACTICE = "bench"
CHANGES = 100
FINDINGS_WRITTEN = 10_000
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _quiet() -> None:
    """Benchmark children log warnings only: a line per run would be noise."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _deps(op_url: str, portal_dir: str, state_url: str) -> Any:
    """`portal_dir` "sql" reads the portal's copy in the OP database instead of files."""
    from config.settings import load_settings
    from worker.scan.engine import Deps
    from worker.sources.csv_source import CsvPortalSource
    from worker.sources.sql_source import SqlOPSource, SqlPortalSource
    from worker.state.db import make_engine, migrate, session_factory

    migrate(state_url)
    settings = load_settings(state_db_url=state_url, practice=PRACTICE)
    portal = SqlPortalSource(op_url) if portal_dir == "sql" else CsvPortalSource(Path(portal_dir))
    return Deps(settings, session_factory(make_engine(state_url)), SqlOPSource(op_url), portal)


# -- phases (each in its own spawned process) ----------------------------------------------


def phase_read(op_url: str, portal_dir: str) -> dict[str, Any]:
    """The read floor: every row through the adapters, counted and dropped."""
    _quiet()
    from worker.sources.csv_source import CsvPortalSource
    from worker.sources.sql_source import SqlOPSource

    op, portal = SqlOPSource(op_url), CsvPortalSource(Path(portal_dir))
    t0 = time.perf_counter()
    rows = 0
    for stream in (op.patients(), op.contacts(), op.family_contacts(), portal.users(),
                   portal.links(), portal.sources(), portal.audit()):
        for _ in stream:
            rows += 1
    return {"seconds": time.perf_counter() - t0, "rows": rows, "peak_mb": _peak_mb()}


def phase_full(op_url: str, portal_dir: str, state_url: str) -> dict[str, Any]:
    """A full reconcile into a fresh state database (schema created before the clock)."""
    _quiet()
    from worker.scan.incremental import full_reconcile

    deps = _deps(op_url, portal_dir, state_url)
    profile = os.environ.get("OPRECON_BENCH_PROFILE")
    t0 = time.perf_counter()
    if profile:
        import cProfile

        with cProfile.Profile() as prof:
            result = full_reconcile(deps, NOW)
        prof.dump_stats(profile)
    else:
        result = full_reconcile(deps, NOW)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds, "peak_mb": _peak_mb(), "records": result.summary()["records"],
        "findings": len(result.plan.items), "read_seconds": result.read_seconds,
        "check_seconds": result.check_seconds,
        "state_seconds": seconds - result.read_seconds - result.check_seconds,
    }


def phase_incremental(
    op_url: str, portal_dir: str, state_url: str, at: str, then: str | None = None
) -> dict[str, Any]:
    """One incremental scan in a fresh process (cold: no CSV index cached yet); with
    `then`, the next one in the same process, as a worker's pool process runs it."""
    _quiet()
    from worker.scan.incremental import incremental_reconcile

    deps = _deps(op_url, portal_dir, state_url)
    t0 = time.perf_counter()
    result = incremental_reconcile(deps, datetime.fromisoformat(at))
    out = {
        "seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(),
        "scope": result.scope.label, "snapshot_records": sum(
            v for k, v in result.counts.items() if k != "invalid"),
        "findings": len(result.plan.items), "read_seconds": result.read_seconds,
    }
    if then is not None:
        t0 = time.perf_counter()
        incremental_reconcile(deps, datetime.fromisoformat(then))
        out["next_seconds"] = time.perf_counter() - t0
        out["peak_mb"] = _peak_mb()
    return out


def phase_duplicates(op_url: str, manifest: str) -> dict[str, Any]:
    """Duplicate detection alone on the practice's contacts, scored pair by pair."""
    _quiet()
    from worker.matching.duplicates import find_duplicate_groups
    from worker.model.records import Contact
    from worker.sources.sql_source import SqlOPSource

    contacts = [c for c in SqlOPSource(op_url).contacts() if isinstance(c, Contact)]
    t0 = time.perf_counter()
    groups = list(find_duplicate_groups(contacts))
    seconds = time.perf_counter() - t0
    found = {pair for g in groups for pair in itertools.combinations(sorted(g.contact_ids), 2)}
    truth: set[tuple[str, str]] = set()
    with open(manifest, encoding="utf-8") as handle:
        for line in handle:
            item = json.loads(line)
            if item.get("check") == "contact_duplicate":
                truth.update(itertools.combinations(sorted(item["contact_ids"]), 2))
    hit = len(found & truth)
    return {
        "seconds": seconds, "contacts": len(contacts), "groups": len(groups),
        "precision": hit / len(found) if found else 1.0,
        "recall": hit / len(truth) if truth else 1.0, "peak_mb": _peak_mb(),
    }


def phase_write(state_url: str, n: int) -> dict[str, Any]:
    """`n` new findings folded into a fresh state database: lifecycle.sync + commit."""
    _quiet()
    from config.settings import load_settings
    from worker.model.findings import Action, Finding, Severity
    from worker.model.scope import ALL
    from worker.scan.engine import time_rules
    from worker.scan.lifecycle import sync
    from worker.state.db import make_engine, migrate, session_factory

    migrate(state_url)
    sessions = session_factory(make_engine(state_url))
    settings = load_settings(state_db_url=state_url, practice=PRACTICE)
    findings = [
        Finding(check="caregiver_link_missing" if i % 2 else "authority_invalid",
                severity=Severity.WARNING, action=Action.ALERT,
                detail=f"benchmark finding {i}", patient_id=f"P{i:07d}",
                contact_id=f"C{i:07d}", cross_system=bool(i % 2))
        for i in range(n)
    ]
    t0 = time.perf_counter()
    with sessions() as session:
        sync(session, PRACTICE, findings, ALL, NOW, time_rules(settings), None)
        session.commit()
    first = time.perf_counter() - t0
    t1 = time.perf_counter()  # the next scan: every one of them seen again
    with sessions() as session:
        sync(session, PRACTICE, findings, ALL, NOW + timedelta(minutes=20),
             time_rules(settings), None)
        session.commit()
    return {"seconds": first, "again_seconds": time.perf_counter() - t1, "peak_mb": _peak_mb()}


def _in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one phase in a fresh spawned interpreter: its peak RSS is its own."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


# -- the practice in PostgreSQL -----------------------------------------------------------------


def _csv_rows(path: Path) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle)


def _load_op(url: str, op_dir: Path, portal_dir: Path | None = None) -> None:
    """OP (and, for the all-SQL incremental figure, a copy of the portal) via COPY."""
    from worker.sources.sql_source import load_op_sql, load_portal_sql, make_engine

    engine = make_engine(url)
    try:
        load_op_sql(engine, _csv_rows(op_dir / "patients.csv"),
                    _csv_rows(op_dir / "contacts.csv"), _csv_rows(op_dir / "family_contacts.csv"))
        if portal_dir is not None:
            load_portal_sql(engine, *(_csv_rows(portal_dir / f"{t}.csv") for t in (
                "portal_users", "portal_links", "portal_sources", "portal_audit")))
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()


def _change_rows(url: str, n: int, at: datetime) -> None:
    """`n` OP rows edited the way staff edit them, each with a new `updated_at`."""
    from worker.sources.sql_source import make_engine

    engine = make_engine(url)
    rng = random.Random(SEED)
    try:
        with engine.begin() as conn:
            pids = [r[0] for r in conn.exec_driver_sql(
                "SELECT patient_id FROM patients ORDER BY patient_id")]
            cids = [r[0] for r in conn.exec_driver_sql(
                "SELECT contact_id FROM contacts ORDER BY contact_id")]
            keys = [tuple(r) for r in conn.exec_driver_sql(
                "SELECT patient_id, contact_id FROM family_contacts ORDER BY 1, 2")]
            third = n // 3
            for pid in rng.sample(pids, third):
                conn.exec_driver_sql(
                    "UPDATE patients SET updated_at = %(at)s, status = CASE status WHEN "
                    "'Active' THEN 'Inactive' ELSE 'Active' END WHERE patient_id = %(id)s",
                    {"at": at, "id": pid})
            for cid in rng.sample(cids, third):
                conn.exec_driver_sql(
                    "UPDATE contacts SET updated_at = %(at)s, email = 'changed.' || "
                    "contact_id || '@example.org' WHERE contact_id = %(id)s",
                    {"at": at, "id": cid})
            for pid, cid in rng.sample(keys, n - 2 * third):
                conn.exec_driver_sql(
                    "UPDATE family_contacts SET updated_at = %(at)s, authority = CASE "
                    "authority WHEN 'Joint' THEN 'None' ELSE 'Joint' END "
                    "WHERE patient_id = %(p)s AND contact_id = %(c)s",
                    {"at": at, "p": pid, "c": cid})
    finally:
        engine.dispose()


# -- the whole run -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"nproc": os.cpu_count(), "memory_gb": round(pages / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


def measure(patients: int, pg_url: str | None = None, keep: Path | None = None,
            progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every figure of the benchmark as one dict (the `--json` object)."""
    import sqlalchemy as sa

    from worker.devtools.generator import generate_practice

    admin_url = pg_url or os.environ.get("OPRECON_BENCH_PG_URL", DEFAULT_PG_URL)
    work = Path(tempfile.mkdtemp(prefix="oprecon-bench-"))
    name = f"oprecon_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    out: dict[str, Any] = {"patients": patients, "date": datetime.now(UTC).date().isoformat(),
                           "machine": machine(), "op_source": "postgresql",
                           "portal_source": "csv", "state_db": "sqlite"}
    try:
        progress(f"generating {patients} patients")
        t0 = time.perf_counter()
        generate_practice(work / "practice", patients, seed=SEED, now=NOW)
        out["generate_seconds"] = round(time.perf_counter() - t0, 2)

        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        op_url = sa.engine.make_url(admin_url).set(database=name).render_as_string(False)
        progress("loading OP into PostgreSQL")
        t0 = time.perf_counter()
        _load_op(op_url, work / "practice" / "op", work / "practice" / "portal")
        out["load_seconds"] = round(time.perf_counter() - t0, 2)
        portal = str(work / "practice" / "portal")
        state = f"sqlite:///{work / 'state.sqlite'}"

        progress("read floor")
        read = _in_child(phase_read, op_url, portal)
        progress("full reconcile")
        full = _in_child(phase_full, op_url, portal, state)
        progress("duplicates")
        dups = _in_child(phase_duplicates, op_url, str(work / "practice" / "manifest.jsonl"))

        # The pending findings of the full scan are confirmed by the next scans, as in
        # production; then 100 rows change and the incremental scan is timed.
        progress("incremental scans")
        confirm = _in_child(phase_incremental, op_url, portal, state,
                            (NOW + timedelta(minutes=20)).isoformat())
        _in_child(phase_incremental, op_url, portal, state,
                  (NOW + timedelta(minutes=40)).isoformat())
        # The same scans with the portal read from SQL too (targeted reads on both sides).
        shutil.copy(work / "state.sqlite", work / "state-sql.sqlite")
        state_sql = f"sqlite:///{work / 'state-sql.sqlite'}"
        _change_rows(op_url, CHANGES, NOW + timedelta(minutes=45))
        at, next_at = (NOW + timedelta(minutes=65)).isoformat(), (NOW + timedelta(
            minutes=90)).isoformat()
        inc = _in_child(phase_incremental, op_url, portal, state, at, next_at)
        inc_sql = _in_child(phase_incremental, op_url, "sql", state_sql, at, next_at)
        progress("state writes")
        write = _in_child(phase_write, f"sqlite:///{work / 'write.sqlite'}", FINDINGS_WRITTEN)

        out.update({
            "records": read["rows"],
            "read_seconds": round(read["seconds"], 2),
            "read_peak_rss_mb": round(read["peak_mb"]),
            "reconcile_seconds": round(full["seconds"], 2),
            "reconcile_read_seconds": round(full["read_seconds"], 2),
            "reconcile_check_seconds": round(full["check_seconds"], 2),
            "reconcile_state_seconds": round(full["state_seconds"], 2),
            "ratio": round(full["seconds"] / read["seconds"], 2),
            "peak_rss_mb": round(full["peak_mb"]),
            "records_per_second": round(read["rows"] / full["seconds"]),
            "findings": full["findings"],
            "duplicates_seconds": round(dups["seconds"], 2),
            "duplicates_contacts": dups["contacts"],
            "duplicates_precision": round(dups["precision"], 4),
            "duplicates_recall": round(dups["recall"], 4),
            "incremental_seconds": round(inc["seconds"], 3),
            "incremental_changes": CHANGES,
            "incremental_snapshot_records": inc["snapshot_records"],
            "incremental_peak_rss_mb": round(inc["peak_mb"]),
            "incremental_next_seconds": round(inc["next_seconds"], 3),
            "incremental_sql_portal_seconds": round(inc_sql["seconds"], 3),
            "incremental_sql_portal_next_seconds": round(inc_sql["next_seconds"], 3),
            "incremental_confirm_seconds": round(confirm["seconds"], 2),
            "write_10k_findings_seconds": round(write["seconds"], 3),
            "rewrite_10k_findings_seconds": round(write["again_seconds"], 3),
        })
        return out
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
        if keep is not None:
            shutil.copytree(work, keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def table(result: dict[str, Any]) -> str:
    rows = [
        ("patients / records", f"{result['patients']:,} / {result['records']:,}"),
        ("read floor", f"{result['read_seconds']} s, peak {result['read_peak_rss_mb']} MB"),
        ("full reconcile", f"{result['reconcile_seconds']} s (read "
                           f"{result['reconcile_read_seconds']} + checks "
                           f"{result['reconcile_check_seconds']} + state "
                           f"{result['reconcile_state_seconds']}), "
                           f"peak {result['peak_rss_mb']} MB"),
        ("ratio to read floor", f"{result['ratio']}x"),
        ("records per second", f"{result['records_per_second']:,}"),
        ("findings", f"{result['findings']:,}"),
        ("duplicates", f"{result['duplicates_seconds']} s on {result['duplicates_contacts']:,} "
                       f"contacts, precision {result['duplicates_precision']}, recall "
                       f"{result['duplicates_recall']}"),
        ("incremental (100 changes)", f"{result['incremental_seconds']} s "
                                      f"({result['incremental_snapshot_records']:,} records); "
                                      f"portal in SQL too: "
                                      f"{result['incremental_sql_portal_seconds']} s"),
        ("next, same process", f"{result['incremental_next_seconds']} s; portal in SQL "
                                    f"too: {result['incremental_sql_portal_next_seconds']} s"),
        ("write 10,000 findings", f"{result['write_10k_findings_seconds']} s (again: "
                                  f"{result['rewrite_10k_findings_seconds']} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def run_bench(patients: int = 10_000, as_json: bool = False, pg_url: str | None = None,
              keep: Path | None = None) -> dict[str, Any]:
    """Measure and print (one JSON object with `as_json`, else a short table)."""
    def progress(msg: str) -> None:
        if not as_json:
            print(f"... {msg}", file=sys.stderr, flush=True)

    result = measure(patients, pg_url=pg_url, keep=keep, progress=progress)
    print(json.dumps(result) if as_json else table(result))
    return result
