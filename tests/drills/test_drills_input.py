"""Drill: malformed exports through the whole command operators run,
`oprecon reconcile --all --op-dir DIR --portal-dir DIR --json`.

The parsing rules themselves are tested in tests/sources/test_sources_csv.py. Here each defect
is planted in a copy of a generated practice and the command's exit status and output
are compared with those of the clean copy. Bad rows are *appended* (or the change keeps
every line where it was), so each case says exactly which findings it must add.

Shown: a file that cannot be read as the contract (missing columns, empty, missing) stops
the run with one line on stderr and exit 2, recorded as a failed run; anything wrong
inside a row (encoding, impossible date, field count, a 100 MB field, a duplicate id)
becomes an `invalid_record` naming file and line while everything else reconciles
exactly as before (exit 0); format variations (BOM, CRLF, extra columns, quoted
newlines) change nothing at all.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.procs import base_env, oprecon
from worker.devtools.generator import generate_practice

NOW = datetime(2026, 11, 2, 14, 0, tzinfo=UTC)
FILES = ("op/patients.csv", "op/contacts.csv", "op/family_contacts.csv",
         "portal/portal_users.csv", "portal/portal_links.csv", "portal/portal_sources.csv",
         "portal/portal_audit.csv")
PATIENT = "{pid},{first},Lopez,2015-04-01,,Active,2026-01-01T00:00:00+00:00"


@dataclass
class Outcome:
    code: int
    findings: list[dict[str, Any]]
    err: str

    @property
    def prints(self) -> set[str]:
        return {f["fingerprint"] for f in self.findings}

    def invalid(self, baseline: Outcome) -> list[str]:
        """The details of the invalid_record findings this run adds to the baseline."""
        return sorted(f["detail"] for f in self.findings
                      if f["check"] == "invalid_record" and f["fingerprint"] not in baseline.prints)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("input") / "clean"
    generate_practice(root, patients=250, seed=2, now=NOW)
    return root


@pytest.fixture
def run(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Callable[..., Outcome]:
    """Copy the clean practice, let the case change it, run the command in-process."""
    from worker.cli.main import main

    counter = iter(range(100))

    def go(change: Callable[[Path], None] | None = None) -> Outcome:
        case = tmp_path / f"case{next(counter)}"
        shutil.copytree(base, case)
        if change is not None:
            change(case)
        monkeypatch.setenv("OPRECON_STATE_DB_URL", f"sqlite:///{case / 'state.sqlite'}")
        monkeypatch.setenv("OPRECON_LOG_LEVEL", "WARNING")
        monkeypatch.setattr(sys, "argv", [
            "oprecon", "reconcile", "--all", "--op-dir", str(case / "op"),
            "--portal-dir", str(case / "portal"), "--json", "--now", NOW.isoformat()])
        with pytest.raises(SystemExit) as done:
            main()
        out, err = capsys.readouterr()
        code = done.value.code if isinstance(done.value.code, int) else 0
        return Outcome(code, [json.loads(line) for line in out.splitlines()], err)

    return go


@pytest.fixture
def baseline(run: Callable[..., Outcome]) -> Outcome:
    clean = run()
    assert clean.code == 0 and clean.err == ""
    assert len(clean.prints) == len(clean.findings) > 10
    return clean


def _rewrite(path: Path, edit: Callable[[list[list[str]]], list[list[str]]]) -> None:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(edit(rows))


def _append(path: Path, *lines: str, encoding: str = "utf-8") -> int:
    """Append raw lines; returns the physical line number of the first one."""
    existing = path.read_bytes()
    first = existing.count(b"\n") + 1
    with path.open("ab") as fh:
        for line in lines:
            fh.write(line.encode(encoding) + b"\n")
    return first


def _failed_run(case_db: Path) -> str:
    engine = create_engine(f"sqlite:///{case_db}")
    try:
        with engine.connect() as conn:
            (status, error), = conn.execute(text("SELECT status, error FROM runs")).all()
    finally:
        engine.dispose()
    assert status == "failed"
    return str(error)


# -- format variations: nothing changes ----------------------------------------------------


def _bom(case: Path) -> None:
    for name in FILES:
        path = case / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


def _crlf(case: Path) -> None:
    for name in FILES:
        path = case / name
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))


def _extra_columns(case: Path) -> None:
    _rewrite(case / "op/contacts.csv",
             lambda rows: [["export_batch", *rows[0]]] + [["7", *r] for r in rows[1:]])
    _rewrite(case / "op/patients.csv",
             lambda rows: [[*rows[0], "notes"]] + [[*r, "n/a"] for r in rows[1:]])


@pytest.mark.parametrize("change", [_bom, _crlf, _extra_columns], ids=["bom", "crlf", "extra"])
def test_format_variations_change_nothing(
    run: Callable[..., Outcome], baseline: Outcome, change: Callable[[Path], None]
) -> None:
    varied = run(change)
    assert varied.code == 0 and varied.err == ""
    assert varied.prints == baseline.prints


def test_quoted_newlines_keep_lines_physical_and_an_impossible_date_is_a_finding(
    run: Callable[..., Outcome], baseline: Outcome
) -> None:
    where: list[int] = []

    def change(case: Path) -> None:
        # A name with a line break inside quotes (two physical lines), then a bad date.
        where.append(_append(case / "op/patients.csv",
                             PATIENT.format(pid="PX1", first='"Anne\nMarie"'),
                             PATIENT.format(pid="PX2", first="Rose").replace(
                                 "2015-04-01", "2019-02-30")))

    out = run(change)
    assert out.code == 0 and out.err == ""
    line = where[0] + 2
    assert out.invalid(baseline) == [
        f"patients.csv line {line}: bad dob (not a valid YYYY-MM-DD date); patient PX2 is "
        "unknown this run: not compared with the portal"]
    assert out.prints - baseline.prints == {f["fingerprint"] for f in out.findings
                                            if f.get("patient_id") == "PX2"}
    assert baseline.prints <= out.prints


# -- bad rows: one invalid_record each, the rest reconciles ---------------------------------


def test_a_latin1_file_reports_its_undecodable_rows_and_reads_the_rest(
    run: Callable[..., Outcome], baseline: Outcome
) -> None:
    where: list[int] = []

    def change(case: Path) -> None:
        path = case / "op/patients.csv"
        where.append(_append(path, PATIENT.format(pid="PX3", first="José"),
                             PATIENT.format(pid="PX4", first="Zoë"), encoding="latin-1"))

    out = run(change)
    assert out.code == 0
    n = where[0]
    note = "is unknown this run: not compared with the portal"
    assert out.invalid(baseline) == [
        f"patients.csv line {n}: not valid UTF-8; patient PX3 {note}",
        f"patients.csv line {n + 1}: not valid UTF-8; patient PX4 {note}"]
    assert baseline.prints < out.prints  # everything else is still found
    assert "Jos" not in json.dumps(out.findings)  # and the undecodable name is not echoed


def test_a_row_with_a_stray_comma_is_a_finding(
    run: Callable[..., Outcome], baseline: Outcome
) -> None:
    where: list[int] = []

    def change(case: Path) -> None:
        where.append(_append(
            case / "op/contacts.csv",
            "CX1,Ann,Lee,ann.lee@example.org,,555-0100,12 Elm St, Apt 4,Town,12345,true,,"
            "2026-01-01T00:00:00+00:00"))

    out = run(change)
    assert out.code == 0
    assert out.invalid(baseline) == [
        f"contacts.csv line {where[0]}: expected 12 fields, found 13; contact CX1 is unknown "
        "this run: not compared with the portal"]
    assert baseline.prints < out.prints


def test_a_duplicate_id_keeps_the_first_row_and_says_so(
    run: Callable[..., Outcome], baseline: Outcome, base: Path
) -> None:
    with (base / "op/patients.csv").open(newline="", encoding="utf-8") as fh:
        first = next(r for r in csv.DictReader(fh))

    def change(case: Path) -> None:
        _append(case / "op/patients.csv", PATIENT.format(pid=first["patient_id"], first="Other"))

    out = run(change)
    assert out.code == 0
    (detail,) = out.invalid(baseline)
    assert f"duplicate id {first['patient_id']}: the first row was kept" in detail
    assert baseline.prints < out.prints  # the first row's findings are all still there


def test_a_100_mb_field_is_one_finding_and_the_run_goes_on(
    base: Path, tmp_path: Path
) -> None:
    """Through the installed command, as a subprocess: the field is streamed to disk and
    read back without the run failing (or taking all the memory there is)."""
    case = tmp_path / "huge"
    shutil.copytree(base, case)
    path = case / "op/contacts.csv"
    line = path.read_bytes().count(b"\n") + 1  # the line the row will start on
    chunk = b"x" * (1 << 20)
    with path.open("ab") as fh:
        fh.write(b"CX9,Big,Field,big@example.org,,555-0101,")
        for _ in range(100):
            fh.write(chunk)
        fh.write(b",Town,12345,true,,2026-01-01T00:00:00+00:00\n")
    assert path.stat().st_size > 100 * (1 << 20)
    env = base_env(OPRECON_STATE_DB_URL=f"sqlite:///{case / 'state.sqlite'}",
                   OPRECON_LOG_LEVEL="WARNING")
    args = ("reconcile", "--all", "--op-dir", str(case / "op"), "--portal-dir",
            str(case / "portal"), "--json", "--now", NOW.isoformat())
    done = oprecon(*args, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    findings = [json.loads(x) for x in done.stdout.splitlines()]
    assert len(done.stdout) < 100_000  # the field is not echoed anywhere
    shutil.rmtree(case / "op")
    shutil.copytree(base / "op", case / "op")  # the clean copy, for comparison
    (case / "state.sqlite").unlink()
    clean = oprecon(*args, env=env, cwd=tmp_path, timeout=60)
    clean_prints = {json.loads(x)["fingerprint"] for x in clean.stdout.splitlines()}
    added = [f for f in findings if f["fingerprint"] not in clean_prints]
    assert [f["detail"] for f in added] == [
        f"contacts.csv line {line}: line longer than 4194304 characters (csv_max_line_chars); "
        "contact CX9 is unknown this run: not compared with the portal"]
    assert clean_prints < {f["fingerprint"] for f in findings}


# -- unreadable files: one line, exit 2 ----------------------------------------------------


def _drop_column(case: Path) -> None:
    _rewrite(case / "op/family_contacts.csv",
             lambda rows: [[v for i, v in enumerate(r) if i != rows[0].index("authority")]
                           for r in rows])


def _empty(case: Path) -> None:
    (case / "portal/portal_links.csv").write_bytes(b"")


def _missing(case: Path) -> None:
    (case / "portal/portal_sources.csv").unlink()


@pytest.mark.parametrize(("change", "reason"), [
    (_drop_column, "family_contacts.csv lacks required column(s) authority (header line 1)"),
    (_empty, "portal_links.csv is empty (no header row)"),
    (_missing, "has no portal_sources.csv"),
], ids=["missing-column", "empty-file", "missing-file"])
def test_an_unreadable_file_stops_the_run_in_one_line(
    run: Callable[..., Outcome], tmp_path: Path, change: Callable[[Path], None], reason: str
) -> None:
    out = run(change)
    assert out.code == 2 and out.findings == []
    (line,) = out.err.splitlines()
    assert line.startswith("oprecon: ") and line.endswith(reason), line
    (case,) = [p for p in tmp_path.iterdir() if p.name.startswith("case")]
    assert reason in _failed_run(case / "state.sqlite")  # recorded, not just printed


def test_a_header_only_file_is_read_as_empty_not_as_an_error(
    run: Callable[..., Outcome], baseline: Outcome
) -> None:
    """The difference from an empty file: the header says what the export is."""
    def change(case: Path) -> None:
        path = case / "portal/portal_links.csv"
        path.write_text(io.StringIO(path.read_text()).readline())

    out = run(change)
    assert out.code == 0 and out.err == ""
    assert out.prints != baseline.prints  # every caregiver link now reads as missing
