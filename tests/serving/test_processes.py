"""`opengem serve --processes 2`: children on one port (SO_REUSEPORT), supervised, metrics summed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from opengem.model import registry
from opengem.model.config import preset
from opengem.model.gem import GemModel
from opengem.serving.client import RankClient
from opengem.serving.processes import reserve_port
from opengem.stream.simulator import SimConfig, Simulator

from ingest_testing import ingest_json

P = 2
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing is Linux's")


def _cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _model_pids(text: str) -> set[int]:
    return {int(m) for m in re.findall(r'^opengem_serve_model_info\{[^}]*pid="(\d+)"[^}]*\} 1\.0$', text, re.M)}


def _requests_total(text: str) -> float:
    return sum(float(v) for v in re.findall(r'^opengem_serve_requests_total\{code="OK"[^}]*\} (\S+)$', text, re.M))


class _Server:
    def __init__(self, data: Path, conf: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opengem.cli", "serve", "--config", str(conf), "--data-dir", str(data),
             "--port", "0", "--http-port", "0", "--metrics-port", "0", "--processes", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.header = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.header.wait(240):
            self.proc.kill()
            raise AssertionError("no header line:\n" + "\n".join(self.lines[-30:]))
        m = re.search(r"gRPC on 127\.0\.0\.1:(\d+), JSON on http://127\.0\.0\.1:(\d+)/v1/rank, "
                      r"metrics \(all processes\) on :(\d+)", self.head)
        self.port, self.http_port, self.metrics_port = map(int, m.groups())

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("opengem serve: 2 processes"):
                self.head = line
                self.header.set()

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("processes")
    events = [e for b in Simulator(SimConfig(seed=12, n_users=50)).batches(4_000) for e in b]
    ingest_json(root / "data", events, P)
    torch.manual_seed(2)
    registry.publish(root / "data" / "models", GemModel(preset("tiny")).eval())
    conf = root / "serve.toml"
    conf.write_text(f"[kafka]\npartitions = {P}\n[serve]\npoll_s = 0.2\ncatch_up_s = 0.2\ntimeout_s = 30.0\n")
    srv = _Server(root / "data", conf)
    yield srv, events
    if srv.proc.poll() is None:
        srv.proc.kill()


def _rank_many(port: int, events, clients: int, per_client: int) -> list[str]:
    """Each thread its own client (connection); returns the model versions answered."""
    versions: list[str] = []
    errors: list[BaseException] = []
    users = sorted({e.user_id for e in events})

    def run(k: int) -> None:
        c = RankClient(f"127.0.0.1:{port}", timeout_s=30)
        try:
            c.wait_ready(30)
            for i in range(per_client):
                r = c.rank(users[(k * per_client + i) % len(users)], "feed", [1, 2, 3], context={"hour": 3})
                versions.append(r.model_version)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    return versions


def test_both_processes_serve_and_metrics_are_summed(served) -> None:
    srv, events = served
    text = _scrape(srv.metrics_port)
    pids = _model_pids(text)
    assert len(pids) == 2, text  # each child loaded the model and says so, under its pid
    before = {p: _cpu_s(p) for p in pids}
    ok0 = _requests_total(text)
    # 16 connections: a process gets none with probability 2^-15
    versions = _rank_many(srv.port, events, clients=16, per_client=8)
    assert len(versions) == 128 and len(set(versions)) == 1
    assert _requests_total(_scrape(srv.metrics_port)) - ok0 == 128  # summed over the processes
    grew = {p: _cpu_s(p) - before[p] for p in pids}
    # Both processes worked: one connection's 8 requests took ~0.25 s of CPU here (all 128: ~2.8 s),
    # an idle process ~0.01 s per second (catch-up and model-directory polls).
    assert all(g > 0.15 for g in grew.values()), grew
    body = {"user_id": events[0].user_id, "surface": "feed", "candidates": [{"ad_id": 3}]}
    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/v1/rank", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    assert json.loads(urllib.request.urlopen(req, timeout=30).read())["model_version"] == versions[0]


def test_a_killed_process_is_restarted_and_the_port_keeps_serving(served) -> None:
    srv, events = served
    pids = _model_pids(_scrape(srv.metrics_port))
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = _model_pids(_scrape(srv.metrics_port))
        if victim not in now and len(now) == 2:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"not restarted: {now}\n" + srv.text()[-3000:])
    assert f"(pid {victim}) exited with code -9; restarting it" in srv.text()
    assert len(_rank_many(srv.port, events, clients=8, per_client=2)) == 16


def test_sigterm_stops_every_process(served) -> None:
    srv, _ = served
    pids = _model_pids(_scrape(srv.metrics_port))
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0
    for p in pids:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{p}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{p}").exists()


def test_port_holding() -> None:
    held = reserve_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    try:
        also = reserve_port("127.0.0.1", port)  # SO_REUSEPORT: the children can bind it too
        also.close()
        import socket

        plain = socket.socket()
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # anyone else cannot
        plain.close()
    finally:
        held.close()


def test_children_that_cannot_serve_stop_the_supervisor_with_their_error(tmp_path: Path) -> None:
    """A config every child refuses (a public address without a token): the children's error
    is shown, the supervisor exits with status 2 and names the child, no process is left."""
    proc = subprocess.run(
        [sys.executable, "-m", "opengem.cli", "serve", "--data-dir", str(tmp_path), "--processes", "2",
         "--host", "0.0.0.0", "--port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=240, env={k: v for k, v in os.environ.items()
                                                          if k != "OPENGEM_SERVE_TOKEN"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "refusing to serve on 0.0.0.0 without a bearer token" in out
    assert re.search(r"error: server process \d exited with code 2 before serving", out), out
    left = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(tmp_path).encode() in (d / "cmdline").read_bytes():
                left.append(d.name)
        except OSError:  # exited meanwhile
            pass
    assert not left, left
