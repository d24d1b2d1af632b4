"""Family-scoped runs read only the family's neighbourhood, and decide its findings as a
run that reads the whole practice does (worker.scan.incremental.family_reconcile).

Issue 18: an on-call `--patient` run read every record of the practice (43,904 of 48,565
rows at 5,000 patients) under the practice's single scan lock. Here the same requests
are answered from a few dozen rows — counted at the adapters — on PostgreSQL and CSV
sources, and the findings in each family's scope, duplicates included, are the same as
the full read's.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from scan.test_incremental import Store, pg_databases, pg_url, read_tables, state_deps  # noqa: F401

from config.settings import Settings, load_settings
from worker.devtools.generator import generate_practice
from worker.model.scope import Scope
from worker.scan.engine import ScopeRequest, read_snapshot, reconcile
from worker.scan.incremental import family_reconcile, family_seeds

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PATIENTS = 1500


@pytest.fixture(scope="module")
def practice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("family-practice")
    generate_practice(out, PATIENTS, seed=11, now=NOW)
    return out


def _settings(tmp_path: Path) -> Settings:
    return load_settings(state_db_url=f"sqlite:///{tmp_path / 'unused.sqlite'}",
                         metrics_port=0, practice="family")


def _no_lock(read_at: float, scope: Scope) -> Any:
    return nullcontext()


def _findings(result: Any) -> set[tuple[str, str]]:
    return {(i.finding.check, i.finding.fingerprint) for i in result.plan.items}


@pytest.mark.parametrize("backend", ["postgresql", "csv"])
def test_a_patient_run_reads_its_family_not_the_practice(
    backend: str, practice: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pg = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    store = Store(backend, tmp_path / "src", pg)
    try:
        tables = read_tables(practice)
        store.write(tables)
        total = sum(len(rows) for rows in tables.values())
        op, portal = store.readers()
        deps = state_deps(tmp_path / "state.sqlite", _settings(tmp_path), op, portal)
        rng = random.Random(5)
        # Families with something to find (the generator plants defects) and plain ones.
        patients = rng.sample([r["patient_id"] for r in tables["patients"]], 16)
        contacts = rng.sample([r["contact_id"] for r in tables["contacts"]], 6)
        requests = ([ScopeRequest("patient", p) for p in patients]
                    + [ScopeRequest("contact", c) for c in contacts])
        # What a run of the whole practice reads, once: each request's findings from it
        # are the reference (the sources do not change during the test).
        practice_read = read_snapshot(op, portal)
        assert sum(practice_read.counts().values()) >= total * 0.85
        found = 0
        for req in requests:
            family = family_reconcile(deps, family_seeds(req), req, kind="adhoc",
                                      guard=_no_lock, now=NOW, dry_run=True)
            whole = reconcile(deps, req, kind="adhoc", now=NOW, dry_run=True,
                              snapshot=practice_read)
            assert _findings(family) == _findings(whole), req.label
            found += len(family.plan.items)
            assert family.rows_read is not None
            assert family.rows_read < total * 0.01, (req.label, family.rows_read, total)
        assert found > 0  # the sample holds families with findings
    finally:
        store.close()


def test_a_family_run_finds_a_duplicate_through_its_blocking_keys(
    practice: Path, tmp_path: Path
) -> None:
    """Nearly every duplicate group the full read finds is found, whole, by a run about
    one of its members. The rest are groups linked only through what a family run does
    not read (an address alone, a phone written two ways): those the family run neither
    raises nor resolves (`Scope.keep_unseen`); the nightly full scan decides them."""
    store = Store("csv", tmp_path / "src", None)
    tables = read_tables(practice)
    store.write(tables)
    op, portal = store.readers()
    deps = state_deps(tmp_path / "state.sqlite", _settings(tmp_path), op, portal)
    whole = reconcile(deps, ScopeRequest(), kind="adhoc", now=NOW, dry_run=True)
    groups = [i.finding for i in whole.plan.items if i.finding.check == "contact_duplicate"]
    assert groups
    missed = []
    for group in groups:
        member = group.contact_ids[-1]
        req = ScopeRequest("contact", member)
        family = family_reconcile(deps, family_seeds(req), req, kind="adhoc",
                                  guard=_no_lock, now=NOW, dry_run=True)
        if group.fingerprint not in {i.finding.fingerprint for i in family.plan.items}:
            missed.append(group.contact_ids)
    assert len(missed) <= max(1, len(groups) // 10), (len(groups), missed)


@pytest.mark.parametrize("backend", ["postgresql", "csv"])
def test_the_console_family_page_reads_one_family_and_shows_what_a_full_read_shows(
    backend: str, practice: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from worker.scan.explain import family_facts
    from worker.scan.incremental import Reads, family_view

    pg = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    store = Store(backend, tmp_path / "src", pg)
    try:
        tables = read_tables(practice)
        store.write(tables)
        total = sum(len(rows) for rows in tables.values())
        op, portal = store.readers()
        whole = read_snapshot(op, portal)
        for patient in random.Random(9).sample([r["patient_id"] for r in tables["patients"]], 15):
            reads = Reads(op, portal)
            family = family_view(reads, patient, NOW, Settings().welcome_window)
            assert family_facts(family, patient) == family_facts(whole, patient), patient
            assert reads.rows < total * 0.01, (patient, reads.rows, total)
    finally:
        store.close()
