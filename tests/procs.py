"""Real processes for the reliability drills: a Celery worker, a private redis-server and
a TCP proxy that can be cut.

Why a private redis-server: the drills restart and kill it, and the machine's Redis on
6379 serves other test modules (and maybe a developer). Why a proxy: "PostgreSQL went
away" must be a real broken socket, without touching the machine's PostgreSQL.

Everything here is stopped by its owner's `stop()`; the fixtures in the drill modules
call it in teardown, whatever happened.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REDIS_SERVER = "redis-server"
# Celery warns on stderr when run as root (CI containers): not a log line.
_QUIET_ROOT = "ignore:You're running the worker with superuser privileges"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             every: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy; fail the test (never hang) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def base_env(**values: str) -> dict[str, str]:
    """The environment of a child process: ours without any OPRECON_* setting, plus
    `values`; the repository on the path so `-A worker.runtime.celery_app` imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPRECON_")}
    env.update(values)
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONWARNINGS"] = _QUIET_ROOT
    return env


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def children_of(pid: int) -> list[int]:
    """Direct children, from /proc (no psutil): the prefork pool processes of a worker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


# -- a private redis-server ---------------------------------------------------------------


class RedisServer:
    """redis-server on a free port, its data in `workdir`, with a password.

    `appendonly` models the production broker (docker-compose.yml): queued messages,
    locks and their expiry survive a restart. `appendfsync always` so that even a
    SIGKILL loses nothing in a drill; production's `everysec` may lose one second.
    """

    def __init__(self, workdir: Path, *, appendonly: bool = True,
                 password: str = "drill-redis-pw") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> Any:
        """A redis-py client (typed Any: its sync methods are annotated as maybe-awaitable)."""
        return redis.Redis.from_url(self.url(db), socket_timeout=5)

    def start(self) -> RedisServer:
        argv = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--requirepass", self.password,
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
            "--save", "", "--maxmemory-policy", "noeviction",
            "--logfile", str(self.dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for(self._answers, 10, f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            tail = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
            pytest.fail(f"redis-server exited with {self.proc.returncode}:\n{tail}")
        client = self.client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): Redis flushes the append-only file first."""
        _stop(self.proc)
        self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL, no chance to write anything."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None

    def restart(self, *, crash: bool = False) -> None:
        self.kill() if crash else self.stop()
        self.start()


def redis_fixture(scope: Literal["session", "module"] = "module") -> Any:
    """A fixture giving a module its own redis-server: `private_redis = redis_fixture()`.

    Why not the machine's 6379 (db 14/15, tests/conftest.py): other test sessions on the
    same machine flush those databases and run workers on them; a drill that counts
    calls or holds locks must not see theirs."""

    @pytest.fixture(scope=scope)
    def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
        server = RedisServer(tmp_path_factory.mktemp("redis")).start()
        try:
            yield server
        finally:
            server.stop()

    return private_redis


# -- a TCP proxy that can be cut ----------------------------------------------------------


class TcpProxy:
    """127.0.0.1:<port> → target, one pair of pump threads per connection.

    `cut()` is an outage: open connections are shut down (the client sees the server
    close them) and new ones are refused. `restore()` listens again on the same port.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.accepted = 0

    @property
    def up(self) -> bool:
        return self._listener is not None

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._stopping.clear()
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()
        return self

    restore = start

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and break every open one."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._open = list(self._open), set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    stop = cut


# -- a real Celery worker -----------------------------------------------------------------


class CeleryWorker:
    """`celery -A worker.runtime.celery_app worker -c 1 -P prefork` as a subprocess.

    The log (JSON lines, our structlog setup) is appended to `<root>/<name>.log` across
    restarts, so a drill can read what every incarnation said.
    """

    def __init__(self, root: Path, env: dict[str, str], name: str = "drill") -> None:
        self.root = root
        self.name = name
        self.hb_dir = root / f"hb-{name}"
        self.env = {**env, "OPRECON_HEARTBEAT_DIR": str(self.hb_dir)}
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, queues: str = "scan,fix,digest") -> CeleryWorker:
        (self.hb_dir / "worker.ready").unlink(missing_ok=True)
        cwd = self.root / self.name
        cwd.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "celery"), "-A", "worker.runtime.celery_app", "worker", "-Q", queues,
                 "-c", "1", "-P", "prefork", "-n", f"{self.name}@%h", "--without-mingle",
                 "--without-gossip", "--loglevel", "INFO"],
                cwd=cwd, env=self.env, stdout=log, stderr=log, start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 40) -> None:
        """Ready = consuming: the readiness file the worker writes on `worker_ready`."""
        def ready() -> bool:
            self.check_alive()
            return (self.hb_dir / "worker.ready").exists()

        wait_for(ready, timeout, f"worker {self.name} to be ready", every=0.1)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            pytest.fail(f"worker {self.name} exited ({code}):\n{self.log()[-3000:]}")

    def pool_children(self) -> list[int]:
        assert self.proc is not None
        return children_of(self.proc.pid)

    def kill_pool_child(self) -> int:
        """SIGKILL the pool process running the task: the OOM killer, in effect."""
        (pid,) = self.pool_children()  # -c 1
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        _stop(self.proc, grace=15)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the main process and its pool at once: no clean shutdown, no requeue."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def events_named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event]


def oprecon(*args: str, env: dict[str, str], cwd: Path,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed `oprecon` command as an operator would."""
    return subprocess.run([str(BIN / "oprecon"), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def send_task(broker_url: str, name: str, *args: Any, task_id: str | None = None) -> str:
    """Queue a task by name on the broker (the way beat and the CLI do), routed by the
    app's own routes; returns the task id."""
    from config.settings import load_settings
    from worker.runtime.celery_app import make_celery_app

    app = make_celery_app(load_settings(broker_url=broker_url, metrics_port=0))
    try:
        return str(app.send_task(name, args=list(args), task_id=task_id).id)
    finally:
        app.close()


def stop_smtp(controller: Any) -> None:
    """Stop an aiosmtpd Controller and collect the connections it leaves open.

    aiosmtpd closes its loop without closing a connection whose QUIT it had not handled
    yet; the transport is then garbage-collected during some later test, and its
    ResourceWarning (an error under filterwarnings=error) fails that unrelated test.
    Collecting here, with that warning ignored, keeps the leak inside the fixture that
    made it. The product's own SMTP client closes its connections (smtplib quit)."""
    controller.stop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()

