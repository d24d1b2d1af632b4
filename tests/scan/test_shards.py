"""Sharded full scans (worker.scan.shards) leave exactly the findings a single full scan does.

One generated practice, OP in SQLite (so the shards use targeted reads), portal as CSV
exports: state DB A gets ordinary full scans, state DB B 3-shard scans whose shards run
in a shuffled order; every finding and its state must match, after the first scan and
after random changes (so ownership also decides resolutions). Then: a shard run again
changes nothing, and a real Celery worker runs a sharded scan enqueued by the task.
"""

from __future__ import annotations

import random
import subprocess
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from tests.conftest import BROKER_URL, REDIS_URL
from tests.procs import BIN, _stop, base_env, wait_for
from tests.scan.test_incremental import NOW, Store, change, read_tables, state_deps
from worker.devtools.generator import generate_practice
from worker.fixes.staging import release_staged
from worker.scan import shards
from worker.scan.engine import Deps
from worker.scan.incremental import WATERMARK, full_reconcile
from worker.sources.csv_source import CsvPortalSource
from worker.state.db import kv_get, make_engine, migrate, session_factory
from worker.state.models import ActionRow, FindingEvent, FindingRow, Run

PATIENTS = 1000
COUNT = 3


@pytest.fixture(scope="module")
def practice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("practice")
    generate_practice(out, PATIENTS, seed=11, now=NOW)
    return out


def all_findings(deps: Deps) -> set[tuple[str, str]]:
    with deps.sessions() as session:
        return {(r.fingerprint, r.state) for r in session.scalars(select(FindingRow))}


def sharded_scan(deps: Deps, now: Any, seed: int) -> int:
    parent = shards.start(deps, COUNT, now=now)
    order = list(range(COUNT))
    random.Random(seed).shuffle(order)
    for index in order:
        shards.run_shard(deps, parent, index, COUNT, now=now)
    return parent


def parent_row(deps: Deps, parent_id: int) -> Run:
    with deps.sessions() as session:
        run = session.get(Run, parent_id)
        assert run is not None
        return run


@pytest.mark.services
def test_sharded_scan_matches_a_full_scan(
    practice: Path, tmp_path: Path, make_settings: Any
) -> None:
    from datetime import timedelta

    tables = read_tables(practice)
    store = Store("sqlite", tmp_path / "src", None)
    store.write(tables)
    op, _ = store.readers()
    portal = CsvPortalSource(practice / "portal")
    settings = make_settings()
    a = state_deps(tmp_path / "a.sqlite", settings, op, portal)
    b = state_deps(tmp_path / "b.sqlite", settings, op, portal)

    full_reconcile(a, NOW)
    parent = sharded_scan(b, NOW, seed=1)
    found = all_findings(a)
    assert found and all_findings(b) == found
    run = parent_row(b, parent)
    assert run.status == "succeeded", run.error
    assert run.summary is not None and run.summary["done"] == list(range(COUNT))
    with b.sessions() as session:
        assert kv_get(session, "test", WATERMARK)["run_id"] == parent
        assert kv_get(session, "test", "last_success")["run_id"] == parent
        kinds = [r.kind for r in session.scalars(select(Run).order_by(Run.id))]
    assert kinds == ["full"] + ["shard"] * COUNT
    with b.sessions() as session:  # the checks only shard 0 can decide came out too
        checks = set(session.scalars(select(FindingRow.check)))
    assert {"contact_duplicate", "invalid_record", "portal_orphan_user"} <= checks

    # Random changes (fixes and new defects), then scans 20 minutes later: pending
    # findings are confirmed and fixed ones resolved, by their owners only.
    rng = random.Random("shards")
    kinds = [change(tables, rng) for _ in range(25)]
    store.write(tables)
    later = NOW + timedelta(minutes=20)
    full_reconcile(a, later)
    parent = sharded_scan(b, later, seed=2)
    assert all_findings(b) == all_findings(a), kinds
    assert parent_row(b, parent).status == "succeeded"
    op.close()
    store.close()


@pytest.mark.services
def test_a_shard_run_twice_changes_nothing(
    practice: Path, tmp_path: Path, make_settings: Any
) -> None:
    store = Store("sqlite", tmp_path / "src", None)
    store.write(read_tables(practice))
    op, _ = store.readers()
    deps = state_deps(tmp_path / "s.sqlite", make_settings(), op,
                      CsvPortalSource(practice / "portal"))
    parent = sharded_scan(deps, NOW, seed=3)
    before = all_findings(deps)
    with deps.sessions() as session:
        events = session.scalar(select(func.count()).select_from(FindingEvent))
    summary = parent_row(deps, parent).summary

    shards.run_shard(deps, parent, 1, COUNT, now=NOW)
    assert all_findings(deps) == before
    with deps.sessions() as session:
        assert session.scalar(select(func.count()).select_from(FindingEvent)) == events
    again = parent_row(deps, parent)
    assert again.status == "succeeded"
    assert again.summary is not None and summary is not None
    assert again.summary["done"] == summary["done"] and again.summary["runs"]["1"] != summary[
        "runs"]["1"]
    # A new sharded scan is refused while one runs, and a failed shard fails its scan.
    second = shards.start(deps, COUNT, now=NOW)
    with pytest.raises(shards.ShardedScanRunning):
        shards.start(deps, COUNT, now=NOW)
    shards.mark_shard(deps, second, 2, error="OperationalError: gone", now=NOW)
    failed = parent_row(deps, second)
    assert failed.status == "failed" and "shard 2" in (failed.error or "")
    op.close()
    store.close()


def journaled(deps: Deps) -> dict[str, tuple[str, int | None]]:
    """idempotency key → (status, run id) of every journaled fix."""
    with deps.sessions() as session:
        return {a.idempotency_key: (a.status, a.run_id)
                for a in session.scalars(select(ActionRow).order_by(ActionRow.id))}


def calls_per_user(deps: Deps) -> dict[str, tuple[frozenset[str], int]]:
    """coalesce key (portal user and kind) → (its fixes' idempotency keys, how many of
    them call the portal)."""
    groups: dict[str, tuple[set[str], list[str]]] = {}
    with deps.sessions() as session:
        for a in session.scalars(select(ActionRow)):
            keys, statuses = groups.setdefault(a.coalesce_key or a.idempotency_key,
                                               (set(), []))
            keys.add(a.idempotency_key)
            statuses.append(a.status)
    return {k: (frozenset(keys), statuses.count("intent"))
            for k, (keys, statuses) in groups.items()}


def writable_pair(practice: Path, tmp_path: Path, settings: Any) -> tuple[Deps, Deps, Any]:
    """State DBs a (single full scans) and b (sharded), over a portal that takes fixes."""
    store = Store("sqlite", tmp_path / "src", None)
    store.write(read_tables(practice))
    op, _ = store.readers()
    portal = CsvPortalSource(practice / "portal")
    a = replace(state_deps(tmp_path / "a.sqlite", settings, op, portal), portal_writable=True)
    b = replace(state_deps(tmp_path / "b.sqlite", settings, op, portal), portal_writable=True)
    # Cross-system mismatches are acted on when seen again after the propagation delay:
    # first sightings now, the fixes at LATER.
    full_reconcile(a, NOW)
    full_reconcile(b, NOW)
    return a, b, store


LATER = NOW + timedelta(minutes=20)


@pytest.mark.services
def test_the_guard_counts_a_sharded_run_as_a_whole(
    practice: Path, tmp_path: Path, make_settings: Any
) -> None:
    """Shards defer their fixes; the last one counts them all against the guard: a run
    exactly at the limit is released in full, one fix over it is staged in full under
    the parent run, as one single full scan would be."""
    a, b, store = writable_pair(practice, tmp_path, make_settings(
        mass_change_max_fixes=100_000, mass_change_max_percent=0))
    full_reconcile(a, LATER)
    single = journaled(a)
    total = len(single)
    # One refresh per portal user: a user's other stale links ride on it (coalesced).
    assert total > COUNT * 3 and {s for s, _ in single.values()} == {"intent", "coalesced"}

    # Within the guard (exactly at it): nothing is queued until the last shard has
    # planned; then every fix is, and the same fixes as the single full scan.
    exact = replace(b, settings=b.settings.model_copy(update={"mass_change_max_fixes": total}))
    parent = shards.start(exact, COUNT, now=LATER)
    for index in range(COUNT - 1):
        assert shards.run_shard(exact, parent, index, COUNT, now=LATER).action_ids == []
    assert {s for s, _ in journaled(exact).values()} == {"deferred"}
    last = shards.run_shard(exact, parent, COUNT - 1, COUNT, now=LATER)
    after = journaled(exact)
    with exact.sessions() as session:
        ids = sorted(session.scalars(select(ActionRow.id)))
    with exact.sessions() as session:
        ids = sorted(session.scalars(select(ActionRow.id).where(ActionRow.status == "intent")))
    assert sorted(last.action_ids) == ids  # every one with a call, for the task to enqueue
    assert after.keys() == single.keys()
    # The same fixes call the portal, one per portal user and kind; which of a user's
    # findings carries the call depends on the order shards finish, not on the plan.
    assert calls_per_user(exact) == calls_per_user(a)
    assert all(calls == 1 for _, calls in calls_per_user(exact).values())
    assert all_findings(exact) == all_findings(a)
    with exact.sessions() as session:
        assert kv_get(session, "test", "guard") is None
    store.close()


@pytest.mark.services
def test_one_fix_over_the_guard_stages_the_whole_sharded_run(
    practice: Path, tmp_path: Path, make_settings: Any
) -> None:
    a, b, store = writable_pair(practice, tmp_path, make_settings(
        mass_change_max_fixes=100_000, mass_change_max_percent=0))
    full_reconcile(a, LATER)
    total = len(journaled(a))
    over = replace(b, settings=b.settings.model_copy(
        update={"mass_change_max_fixes": total - 1}))
    parent = sharded_scan(over, LATER, seed=4)
    staged = journaled(over)
    assert {(s, r) for s, r in staged.values()} == {("staged", parent)}
    with over.sessions() as session:
        guard = kv_get(session, "test", "guard")
        queued = session.scalar(select(func.count()).select_from(FindingRow).where(
            FindingRow.state == "fix_queued"))
    assert guard is not None and guard["run_id"] == parent and guard["staged"] == total
    assert f"{total} fixes" in guard["reason"] and queued == 0
    # Staff approve the parent run they were told about; every fix is released.
    lines: list[str] = []
    local = over.settings.model_copy(update={"portal_dir": practice / "portal"})
    count = release_staged(local, parent, approve=True, by="pm", mode="local",
                           sessions=over.sessions, echo=lines.append, now=LATER)
    assert count == total and lines[0].startswith(f"run {parent}: approved {total}"), lines
    assert "staged" not in {s for s, _ in journaled(over).values()}
    store.close()


@pytest.mark.services
def test_fixes_deferred_by_a_failed_sharded_run_are_adopted_not_doubled(
    practice: Path, tmp_path: Path, make_settings: Any
) -> None:
    _, b, store = writable_pair(practice, tmp_path, make_settings(
        mass_change_max_fixes=100_000, mass_change_max_percent=0))
    parent = shards.start(b, COUNT, now=LATER)
    shards.run_shard(b, parent, 0, COUNT, now=LATER)
    shards.run_shard(b, parent, 1, COUNT, now=LATER)
    shards.mark_shard(b, parent, 2, error="OperationalError: gone", now=LATER)
    left = journaled(b)
    assert left and {s for s, _ in left.values()} == {"deferred"}
    assert parent_row(b, parent).status == "failed"

    # The next sharded scan plans the same fixes: the deferred rows are adopted, so each
    # fix is journaled once and queued once.
    second = sharded_scan(b, LATER, seed=5)
    after = journaled(b)
    assert left.keys() <= after.keys()
    assert {s for s, _ in after.values()} == {"intent", "coalesced"}  # one refresh per user
    assert parent_row(b, second).status == "succeeded"
    store.close()


@pytest.mark.services
def test_celery_worker_runs_a_sharded_full_scan(
    tmp_path: Path, pg_database: str, make_settings: Any, redis_client: redis.Redis
) -> None:
    generate_practice(tmp_path / "p", 300, seed=5)
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    practice = f"shards-{uuid.uuid4().hex[:6]}"
    migrate(pg_database)
    env = base_env(
        OPRECON_STATE_DB_URL=pg_database, OPRECON_BROKER_URL=BROKER_URL,
        OPRECON_REDIS_URL=REDIS_URL, OPRECON_OP_DIR=str(tmp_path / "p" / "op"),
        OPRECON_PORTAL_DIR=str(tmp_path / "p" / "portal"), OPRECON_PRACTICE=practice,
        OPRECON_FULL_SCAN_SHARDS=str(COUNT), OPRECON_METRICS_PORT="0",
        OPRECON_HEARTBEAT_DIR=str(tmp_path / "hb"), OPRECON_LOG_FORMAT="json",
    )
    engine = make_engine(pg_database)
    log = (tmp_path / "worker.log").open("ab")
    proc = subprocess.Popen(
        [str(BIN / "celery"), "-A", "worker.runtime.celery_app", "worker", "-Q", "scan,fix",
         "-c", "2", "-P", "prefork", "-n", f"{practice}@%h", "--without-mingle",
         "--without-gossip", "--loglevel", "INFO"],
        cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True,
    )
    try:
        def alive_and(check: Any) -> Any:
            if proc.poll() is not None:
                tail = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"worker exited ({proc.returncode}):\n{tail}")
            return check()

        wait_for(lambda: alive_and((tmp_path / "hb" / "worker.ready").exists), 40,
                 "the worker to be ready", every=0.1)
        from worker.runtime.celery_app import make_celery_app

        settings = make_settings(state_db_url=pg_database, practice=practice)
        celery = make_celery_app(settings)
        celery.send_task("oprecon.scan.full", queue="scan")
        celery.close()
        sessions = session_factory(engine)

        def parent_done() -> Run | None:
            with sessions() as session:
                run = session.scalar(select(Run).where(Run.practice == practice,
                                                       Run.kind == "full"))
            return run if run is not None and run.status != "running" else None

        run = wait_for(lambda: alive_and(parent_done), 60, "the sharded scan to finish",
                       every=0.2)
        assert run.status == "succeeded", run.error
        assert run.summary["done"] == list(range(COUNT))
        with sessions() as session:
            shard_runs = session.scalars(select(Run).where(
                Run.practice == practice, Run.kind == "shard")).all()
            assert sorted(r.status for r in shard_runs) == ["succeeded"] * COUNT
            assert session.scalar(select(func.count()).select_from(FindingRow).where(
                FindingRow.practice == practice)) > 0
    finally:
        _stop(proc, grace=15)
        log.close()
        engine.dispose()
        broker.flushdb()
        broker.close()
