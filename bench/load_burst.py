"""Load benchmark (issue 18, drill 1): an on-call burst against a busy practice.

    .venv/bin/python bench/load_burst.py [--patients 20000] [--requests 50] [--json]

What it sets up, all real processes on this machine:

- a generated practice (seed 1, clocked now), OP loaded into PostgreSQL (the SQL source,
  its targeted reads `WHERE id = ANY(...)`), the portal served over HTTP by the
  simulator (`python -m worker.devtools.simulator`);
- a private redis-server (broker and locks), a PostgreSQL state database;
- two `celery worker -c 2` processes (four slots) and one beat (its default schedule);
- a first full scan (findings and the watermark in place, as in production).

Then a nightly full scan is sent and, right behind it, `--requests` on-call requests for
distinct patients at once, each as `oprecon reconcile --patient ID --wait` sends and
follows it (`worker.cli.ondemand.enqueue_and_wait`, one thread each: 50 CLI processes
would measure Python start-up on two cores, not the service). Reported: each request's
latency from send to answer (min, median, p90, max), the rows each run read from the
sources (the run's `rows_read`) against the practice's rows, the skipped-run rows and the
full scan's own duration. Target (issue 18): all answered within 15 s, each reading under
1% of the practice's rows.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.devtools import bench  # noqa: E402

BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def _start(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, env=env, cwd=cwd,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(patients: int, requests: int, pg_url: str = bench.DEFAULT_PG_URL,
            keep: Path | None = None, read_rate: float | None = None,
            log_level: str = "WARNING") -> dict[str, Any]:
    import redis
    import sqlalchemy as sa

    from config.settings import load_settings
    from worker.cli.ondemand import enqueue_and_wait
    from worker.devtools.generator import generate_practice
    from worker.scan.engine import ScopeRequest
    from worker.scan.wiring import state_sessions
    from worker.state.db import kv_get
    from worker.state.models import Run

    work = Path(tempfile.mkdtemp(prefix="oprecon-burst-"))
    practice = keep or work / "practice"
    names = {k: f"oprecon_burst_{k}_{uuid.uuid4().hex[:8]}" for k in ("op", "state")}
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    url = {k: sa.engine.make_url(pg_url).set(database=v).render_as_string(False)
           for k, v in names.items()}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if not (practice / "manifest.jsonl").exists():
            generate_practice(practice, patients, seed=1, now=datetime.now(UTC))
        rows_total = sum(
            sum(1 for _ in p.open(encoding="utf-8")) - 1 for p in practice.rglob("*.csv"))
        with admin.connect() as conn:
            for name in names.values():
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        bench._load_op(url["op"], practice / "op")

        redis_port, sim_port, metrics_port = _port(), _port(), _port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPRECON_")}
        env.update({
            "PYTHONPATH": str(ROOT),
            "OPRECON_STATE_DB_URL": url["state"],
            "OPRECON_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "OPRECON_REDIS_URL": f"redis://127.0.0.1:{redis_port}/1",
            "OPRECON_OP_SOURCE": "sql", "OPRECON_OP_DB_URL": url["op"],
            "OPRECON_PORTAL_SOURCE": "http",
            "OPRECON_PORTAL_URL": f"http://127.0.0.1:{sim_port}",
            "OPRECON_PRACTICE": "burst", "OPRECON_LOG_FORMAT": "json",
            "OPRECON_LOG_LEVEL": log_level, "OPRECON_METRICS_PORT": str(metrics_port),
            "OPRECON_INCREMENTAL_SCAN_MINUTES": "1",
        })
        if read_rate is not None:
            env["OPRECON_PORTAL_READ_RATE_PER_SECOND"] = str(read_rate)
        procs.append(_start([str(BIN / "python"), "-m", "worker.devtools.simulator",
                             "--port", str(sim_port), "--portal-dir", str(practice / "portal"),
                             "--op-dir", str(practice / "op")], work / "sim.log", env, work))
        client = redis.Redis(port=redis_port)
        _wait(lambda: _answers(client), 20, "redis-server")
        _wait(lambda: _listening(sim_port), 120, "the simulator")
        migrate = subprocess.run([str(BIN / "oprecon"), "migrate"], env=env, cwd=work,
                                 capture_output=True, text=True)
        if migrate.returncode:
            raise SystemExit(f"migrate failed: {migrate.stderr}")
        for n in (1, 2):
            hb = work / f"hb-w{n}"
            procs.append(_start(
                [str(BIN / "celery"), "-A", "worker.runtime.celery_app", "worker",
                 "-Q", "scan,fix,digest", "-c", "2", "-n", f"burst{n}@%h", "--without-mingle",
                 "--without-gossip", "--loglevel", log_level],
                work / f"worker{n}.log", {**env, "OPRECON_HEARTBEAT_DIR": str(hb),
                                          "OPRECON_METRICS_PORT": str(_port())}, work))
            _wait(lambda hb=hb: (hb / "worker.ready").exists(), 120, f"worker {n}")

        settings = load_settings(**{
            k.removeprefix("OPRECON_").lower(): v for k, v in env.items()
            if k.startswith("OPRECON_") and k not in ("OPRECON_LOG_FORMAT",)
        })
        sessions = state_sessions(settings, migrate_first=False)
        sink = io.StringIO()
        # The first full scan (findings, watermark), then beat's schedule from here on.
        t = time.perf_counter()
        assert enqueue_and_wait(settings, ScopeRequest(), True, False, timeout=900,
                                out=sink, err=sink) == 0, sink.getvalue()
        first_full = time.perf_counter() - t
        procs.append(_start([str(BIN / "celery"), "-A", "worker.runtime.celery_app", "beat",
                             "--loglevel", "WARNING"], work / "beat.log",
                            {**env, "OPRECON_HEARTBEAT_DIR": str(work / "hb-beat")}, work))

        ids = [line.split(",", 1)[0] for line in
               (practice / "op" / "patients.csv").read_text(encoding="utf-8").splitlines()[1:]]
        chosen = random.Random(7).sample(ids, requests)
        from worker.runtime.celery_app import make_celery_app

        app = make_celery_app(settings)
        burst_start = datetime.now(UTC)
        full_task = f"burst-full-{uuid.uuid4().hex[:6]}"
        app.send_task("oprecon.scan.full", task_id=full_task)
        time.sleep(0.5)  # the full scan has the practice lock and is reading
        results: list[dict[str, Any]] = [{} for _ in chosen]

        def one(i: int, pid: str) -> None:
            out, err = io.StringIO(), io.StringIO()
            sent = time.time()
            started = time.perf_counter()
            # The CLI's own poll interval (0.5 s): 50 pollers at 0.1 s load the machine.
            code = enqueue_and_wait(settings, ScopeRequest("patient", pid), True, False,
                                    timeout=120, out=out, err=err)
            results[i] = {"patient": pid, "code": code, "sent": sent,
                          "seconds": time.perf_counter() - started, "out": out.getvalue()}

        threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(chosen)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        burst_seconds = (datetime.now(UTC) - burst_start).total_seconds()

        rows_read: list[int] = []
        queued: list[float] = []
        in_worker: list[float] = []
        with sessions() as s:
            from sqlalchemy import select

            for r in results:
                task = next((line.split("as task ", 1)[1].strip()
                             for line in r["out"].splitlines() if "as task " in line), None)
                rec = kv_get(s, settings.practice, f"adhoc:{task}") if task else None
                summary = (rec or {}).get("summary") or {}
                if summary.get("rows_read") is not None:
                    rows_read.append(int(summary["rows_read"]))
                if summary.get("seconds") is not None:
                    in_worker.append(float(summary["seconds"]))  # the read and the run
                run = s.scalar(select(Run).where(Run.task_id == task)) if task else None
                if run is not None:
                    queued.append(run.started_at.timestamp() - r["sent"])
        full_run = _wait(lambda: _finished(sessions, Run, settings.practice, full_task), 900,
                         "the full scan sent with the burst")
        with sessions() as s:
            from sqlalchemy import select

            skipped = [(r.kind, r.error) for r in s.scalars(
                select(Run).where(Run.status == "skipped", Run.started_at >= burst_start))]

        latencies = [r["seconds"] for r in results if r]
        answered = [r for r in results if r and r["code"] == 0]
        return {
            "patients": patients, "rows_in_practice": rows_total, "requests": requests,
            "machine": bench.machine(), "first_full_scan_seconds": round(first_full, 1),
            "answered_ok": len(answered),
            "latency_seconds": {
                "min": round(min(latencies), 2), "median": round(statistics.median(latencies), 2),
                "p90": round(_pct(latencies, 0.9), 2), "max": round(max(latencies), 2),
            },
            "burst_wall_seconds": round(burst_seconds, 2),
            "queued_seconds": {
                "median": round(statistics.median(queued), 2), "max": round(max(queued), 2),
            } if queued else None,
            "run_seconds_in_worker": {
                "median": round(statistics.median(in_worker), 3),
                "max": round(max(in_worker), 3),
            } if in_worker else None,
            "portal_read_rate_per_second": read_rate or settings.portal_read_rate_per_second,
            "rows_read_per_request": {
                "min": min(rows_read), "median": int(statistics.median(rows_read)),
                "max": max(rows_read),
                "max_percent_of_practice": round(100 * max(rows_read) / rows_total, 3),
            } if rows_read else None,
            "full_scan_during_burst": {
                "status": full_run.status,
                "seconds": round((full_run.finished_at - full_run.started_at).total_seconds(), 1)
                if full_run.finished_at else None,
                "records": full_run.records_read,
            },
            "skipped_runs_during_burst": skipped,
        }
    finally:
        for proc in reversed(procs):
            _stop(proc)
        with admin.connect() as conn:
            for name in names.values():
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _answers(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _finished(sessions: Any, run_cls: Any, practice: str, task_id: str) -> Any:
    from sqlalchemy import select

    with sessions() as s:
        run = s.scalar(select(run_cls).where(run_cls.practice == practice,
                                             run_cls.task_id == task_id,
                                             run_cls.status != "running"))
        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--keep", type=Path, default=None,
                        help="generate the practice here (or reuse it) and keep the logs")
    parser.add_argument("--read-rate", type=float, default=None,
                        help="OPRECON_PORTAL_READ_RATE_PER_SECOND (default: the setting's)")
    parser.add_argument("--log-level", default="WARNING", help="the workers' (INFO to profile)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.patients, args.requests, keep=args.keep, read_rate=args.read_rate,
                     log_level=args.log_level)
    if args.json:
        print(json.dumps(result))
        return
    lat, rows = result["latency_seconds"], result["rows_read_per_request"]
    print(f"{result['patients']:,} patients, {result['rows_in_practice']:,} rows; "
          f"{result['requests']} on-call requests right behind a nightly full scan")
    print(f"answered ok     {result['answered_ok']}/{result['requests']} "
          f"in {result['burst_wall_seconds']} s")
    print(f"latency         min {lat['min']} s · median {lat['median']} s · p90 {lat['p90']} s"
          f" · max {lat['max']} s")
    if rows:
        print(f"rows read       min {rows['min']} · median {rows['median']} · max {rows['max']}"
              f" ({rows['max_percent_of_practice']}% of the practice at most)")
    if result["queued_seconds"]:
        print(f"send to start   median {result['queued_seconds']['median']} s · max "
              f"{result['queued_seconds']['max']} s (in the queue, for a free worker slot)")
    if result["run_seconds_in_worker"]:
        print(f"run in worker   median {result['run_seconds_in_worker']['median']} s · max "
              f"{result['run_seconds_in_worker']['max']} s (portal reads limited to "
              f"{result['portal_read_rate_per_second']:g}/s)")
    full = result["full_scan_during_burst"]
    print(f"full scan       {full['status']} in {full['seconds']} s ({full['records']:,} records)")
    print(f"skipped runs    {len(result['skipped_runs_during_burst'])}")


if __name__ == "__main__":
    main()
