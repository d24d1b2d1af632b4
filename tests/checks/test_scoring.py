"""The checks scored against the generator's manifest: every planted defect is found
with the right check id, and nothing is raised on a clean record."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.checks import CheckContext, run_checks
from worker.checks.catalog import CHECK_IDS
from worker.devtools.generator import generate_practice
from worker.scan.engine import read_snapshot
from worker.sources.csv_source import CsvOPSource, CsvPortalSource

NOW = datetime(2026, 11, 2, 14, 0, tzinfo=UTC)


def score(found: set[str], expected: dict[str, str], checks: dict[str, str]) -> dict[str, tuple]:
    out = {}
    for cid in CHECK_IDS:
        exp = {fp for fp, c in expected.items() if c == cid}
        got = {fp for fp, c in checks.items() if c == cid}
        tp = len(exp & got)
        out[cid] = (tp / len(got) if got else 1.0, tp / len(exp) if exp else 1.0, len(exp))
    return out


@pytest.mark.parametrize("seed", [11, 12])
def test_every_planted_defect_found_and_nothing_else(tmp_path: Path, seed: int) -> None:
    generate_practice(tmp_path, patients=1500, seed=seed, now=NOW)
    expected = {}
    for line in (tmp_path / "manifest.jsonl").read_text().splitlines():
        obj = json.loads(line)
        expected[obj["fingerprint"]] = obj["check"]
    snap = read_snapshot(CsvOPSource(tmp_path / "op"), CsvPortalSource(tmp_path / "portal"))
    findings = run_checks(CheckContext(snap, NOW))
    got = {f.fingerprint: f.check for f in findings}
    per_check = score(set(got), expected, got)
    report = {cid: f"precision {p:.3f} recall {r:.3f} of {n}" for cid, (p, r, n) in
              per_check.items()}
    assert all(p == 1.0 and r == 1.0 for p, r, _ in per_check.values()), report
    assert all(n > 0 for _, _, n in per_check.values()), "every check must be exercised"
    assert Counter(got.values()) == Counter(expected.values())
