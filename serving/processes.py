"""`opengem serve` with ``[serve] processes = N``: N server processes on one port.

A model forward holds its process's GIL between torch ops, so one server process
uses about one core however many requests wait (``inference_slots = 2`` on 2
cores, GEM base, 500 candidates: 1.14-1.26x the throughput for 1.15-1.25x the CPU
per request, measured). N processes bound
to the same ports with ``SO_REUSEPORT`` run N requests at once; the kernel
hands each new *connection* to one of them (a gRPC channel is one HTTP/2
connection, so one channel stays on one process: callers use several).

The supervisor (this module, the process ``opengem serve`` started):

* holds the ports: a port asked as 0 is chosen here, by binding a socket with
  ``SO_REUSEPORT`` that never listens (it takes no connections) and stays bound
  while the supervisor runs, so nothing else can take the port between restarts;
* starts each child as ``opengem serve`` with the same arguments followed by the
  chosen ports and ``--processes 1`` (argparse keeps an option's last value),
  relays its output prefixed ``[serve i]`` and
  restarts a child that exits (the others keep serving meanwhile); a child that
  dies again within ``FAST_EXIT_S`` of its start ``MAX_FAST_EXITS`` times in a
  row stops everything (a bad config fails every child the same way);
* serves the children's Prometheus metrics summed on the metrics port
  (``prometheus_client`` multiprocess mode: each child writes its values to
  files in a private directory; gauges are per process, with a ``pid`` label);
* on SIGINT / SIGTERM stops the children (each finishes its in-flight requests)
  and removes its scratch directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

# The environment that tells `opengem serve` it is one of the supervisor's children.
CHILD_ENV = "OPENGEM_SERVE_CHILD"
READY_MARK = "opengem serve: gRPC"  # the line a child prints once it serves
FAST_EXIT_S = 10.0
MAX_FAST_EXITS = 3


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT that never listens: it holds the
    port (0: a free one) for processes that bind it with SO_REUSEPORT too, and takes no
    connections itself (the kernel hands connections to listening sockets only)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise OSError(f"cannot hold port {port} on {host} for the server processes: {e}") from e
    return s


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen
    started: float
    ready: threading.Event = field(default_factory=threading.Event)
    fast_exits: int = 0


class Supervisor:
    """Runs ``n`` children ``argv`` (``opengem serve`` arguments, without ports / process
    count: :meth:`child_argv` adds them) until :meth:`stop`."""

    def __init__(self, argv: list[str], n: int, host: str, port: int, http_port: int, metrics_port: int,
                 echo: Callable[[str], None] = print):
        if sys.platform != "linux":
            raise RuntimeError("[serve] processes > 1 needs Linux (SO_REUSEPORT load balancing)")
        self.argv, self.n, self.host, self.echo = argv, n, host, echo
        self._held: list[socket.socket] = []
        self._scratch = tempfile.mkdtemp(prefix="opengem-serve-")
        self.metrics_dir = os.path.join(self._scratch, "metrics")
        self.metrics_port: int | None = None
        self.children: list[_Child] = []
        self._lock = threading.Lock()
        self._stopping = False
        try:
            self._held.append(reserve_port(host, port))
            self.port = self._held[0].getsockname()[1]
            self.http_port = -1
            if http_port >= 0:
                self._held.append(reserve_port(host, http_port))
                self.http_port = self._held[-1].getsockname()[1]
            os.mkdir(self.metrics_dir)
            if metrics_port >= 0:
                from prometheus_client import CollectorRegistry
                from prometheus_client.multiprocess import MultiProcessCollector

                from opengem.ops import metrics

                registry = CollectorRegistry()
                MultiProcessCollector(registry, path=self.metrics_dir)
                self.metrics_port = metrics.serve(metrics_port, host, registry=registry)
        except BaseException:
            self._release()
            raise

    def child_argv(self) -> list[str]:
        """The children's command: the supervisor's own arguments, then what they must use instead
        (argparse keeps the last value of an option, abbreviated or not)."""
        return [sys.executable, "-m", "opengem.cli", "serve", *self.argv, "--processes", "1",
                "--port", str(self.port), "--http-port", str(self.http_port), "--metrics-port", "-1"]

    def _spawn(self, index: int, fast_exits: int = 0) -> _Child:
        env = {**os.environ, CHILD_ENV: "1", "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir, "PYTHONUNBUFFERED": "1"}
        # Its own session: a terminal's Ctrl-C reaches the supervisor only, which then stops each child
        # once (a second signal would make a child leave without finishing its requests).
        proc = subprocess.Popen(self.child_argv(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        child = _Child(index, proc, time.monotonic(), fast_exits=fast_exits)
        threading.Thread(target=self._relay, args=(child,), name=f"serve-{index}-out", daemon=True).start()
        return child

    def _relay(self, child: _Child) -> None:
        for line in child.proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip("\n")
            if line.startswith(READY_MARK):
                child.ready.set()
            self.echo(f"[serve {child.index}] {line}")

    def start(self, timeout_s: float = 300.0) -> None:
        """Start the children and wait until every one serves (or raise)."""
        self.children = [self._spawn(i) for i in range(self.n)]
        deadline = time.monotonic() + timeout_s
        for c in self.children:
            while not c.ready.wait(0.2):
                if c.proc.poll() is not None:
                    raise RuntimeError(f"server process {c.index} exited with code {c.proc.returncode} "
                                       "before serving (its output is above)")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server process {c.index} did not start serving in {timeout_s:.0f} s")

    def check(self) -> None:
        """Restart children that exited (call periodically). Raises after MAX_FAST_EXITS
        fast exits of one child in a row."""
        from prometheus_client import multiprocess

        with self._lock:
            if self._stopping:
                return
            for i, c in enumerate(self.children):
                code = c.proc.poll()
                if code is None:
                    continue
                multiprocess.mark_process_dead(c.proc.pid, self.metrics_dir)  # its per-process gauges go
                fast = c.fast_exits + 1 if time.monotonic() - c.started < FAST_EXIT_S else 0
                if fast >= MAX_FAST_EXITS:
                    raise RuntimeError(f"server process {c.index} exited {fast} times within {FAST_EXIT_S:.0f} s "
                                       f"of starting (last code {code}): giving up")
                self.echo(f"opengem serve: process {c.index} (pid {c.proc.pid}) exited with code {code}; restarting it")
                self.children[i] = self._spawn(c.index, fast)

    def stop(self, grace_s: float = 20.0) -> None:
        from prometheus_client import multiprocess

        with self._lock:
            self._stopping = True
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.terminate()  # SIGTERM: the child stops taking requests, finishes the in-flight ones
        deadline = time.monotonic() + grace_s
        for c in self.children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
            multiprocess.mark_process_dead(c.proc.pid, self.metrics_dir)
        self._release()

    def _release(self) -> None:
        """The metrics endpoint, the held ports, the scratch directory."""
        if self.metrics_port is not None:
            from opengem.ops import metrics

            metrics.stop_serving(self.metrics_port, self.host)
            self.metrics_port = None
        for s in self._held:
            s.close()
        self._held = []
        shutil.rmtree(self._scratch, ignore_errors=True)
