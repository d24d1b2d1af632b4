"""The practice on disk: the seven CSV files, `manifest.jsonl`, `generator.json`, and the CLI.

Why apart: one generation pass feeds all seven files at once, each through its own
writer thread in small batches, so a million patients never sit in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from worker.devtools.generator.builder import TABLES, DefectRates
from worker.devtools.generator.practice import _Builder, _resolve_now, _run, _stats
from worker.sources.layout import OP_LAYOUT


@dataclass
class GenerateResult:
    out_dir: Path
    seed: int
    now: datetime
    patients: int
    counts: dict[str, int]
    findings: dict[str, int]
    suppressed_recent: dict[str, int]
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"{self.patients} patients, {sum(self.counts.values())} rows, "
                f"{sum(self.findings.values())} expected findings, "
                f"{sum(self.suppressed_recent.values())} suppressed as recent, "
                f"{self.seconds:.1f}s")


class _Spool:
    """Feeds one file's writer thread in batches (the writer takes a plain iterable)."""

    def __init__(self, path: Path, table: str) -> None:
        from worker.sources.csv_source import write_table_csv

        self.q: queue.Queue[list[Any] | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.count = 0

        def rows() -> Iterator[Any]:
            while True:
                batch = self.q.get()
                if batch is None:
                    return
                yield from batch

        def work() -> None:
            try:
                self.count = write_table_csv(path, table, rows())
            except BaseException as err:  # handed to the producer, which re-raises
                self.error = err
                while self.q.get() is not None:  # drain so the producer never blocks
                    pass

        self.thread = threading.Thread(target=work, name=f"gen-{table}", daemon=True)
        self.thread.start()

    def put(self, batch: list[Any] | None) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(batch, timeout=1.0)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise RuntimeError("CSV writer thread died") from self.error

    def close(self) -> int:
        if self.error is None:
            self.put(None)
        else:
            with contextlib.suppress(queue.Full):
                self.q.put_nowait(None)
        self.thread.join(timeout=60)
        if self.error is not None:
            raise self.error
        return self.count


def generate_practice(out_dir: Path, patients: int, seed: int = 0, now: datetime | None = None,
                      rates: DefectRates | None = None) -> GenerateResult:
    """Write `op/`, `portal/`, `manifest.jsonl` and `generator.json` under `out_dir`."""
    import time

    started = time.perf_counter()
    out_dir = Path(out_dir)
    now = _resolve_now(now)
    rates = rates or DefectRates()
    (out_dir / "op").mkdir(parents=True, exist_ok=True)
    (out_dir / "portal").mkdir(parents=True, exist_ok=True)
    builder = _Builder(seed, now, rates)
    spools = {t: _Spool(out_dir / ("op" if t in OP_LAYOUT else "portal") / f"{t}.csv", t)
              for t in TABLES}
    manifest = open(out_dir / "manifest.jsonl", "w", encoding="utf-8", newline="\n")  # noqa: SIM115

    def flush() -> None:
        for table, rows in builder.out.items():
            if rows:
                spools[table].put(rows)
                builder.out[table] = []
        if builder.findings:
            manifest.writelines(f.json_line() + "\n" for f in builder.findings)
            builder.findings = []

    try:
        _run(builder, patients, flush)
        flush()
    finally:
        manifest.close()
        counts = {t: s.close() for t, s in spools.items()}
    stats = _stats(builder, patients)
    info = {
        "seed": seed,
        "now": now.isoformat(),
        "patients": patients,
        "counts": counts,
        "rates": asdict(rates),
        **{k: v for k, v in stats.items() if k != "patients"},
    }
    (out_dir / "generator.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return GenerateResult(out_dir, seed, now, patients, counts, stats["findings"],
                          stats["suppressed_recent"], time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.devtools.generator",
                                     description="Write a synthetic practice and its manifest.")
    parser.add_argument("--patients", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--now", type=datetime.fromisoformat, default=None,
                        help="ISO time the practice is generated at (default: now, UTC)")
    args = parser.parse_args(argv)
    result = generate_practice(args.out, args.patients, args.seed, args.now)
    print(json.dumps({"out": str(result.out_dir), "patients": result.patients,
                      "rows": result.counts, "findings": sum(result.findings.values()),
                      "seconds": round(result.seconds, 1)}))
    return 0
