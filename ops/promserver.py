"""Run a real Prometheus server with the shipped configuration (tests, ``opengem demo --prometheus``).

The shipped ``ops/prometheus/prometheus.yml`` discovers the daemons through
``file_sd_configs`` (``targets/<job>.json``, relative to the config file), so
the same file serves a machine with the default ports, the compose
deployment (other target files) and a run on free ports: :func:`prepare`
copies the config and its rules next to freshly written target files.
Prometheus listens on 127.0.0.1 (a free port) with its storage in a scratch
directory.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "prometheus"
JOBS = ("opengem-stream", "opengem-train", "opengem-serve", "opengem-monitor")


def binary(name: str = "prometheus") -> str | None:
    return shutil.which(name)


def prepare(dest: str | Path, targets: dict[str, list[str]], scrape_interval_s: float | None = None) -> Path:
    """Copy the shipped config and rules into ``dest`` with ``targets`` (job -> host:port list).

    ``scrape_interval_s``: replaces the global scrape and evaluation interval
    (tests scrape every second; the shipped 15 s is for real deployments).
    Returns the config file's path.
    """
    unknown = set(targets) - set(JOBS)
    if unknown:
        raise ValueError(f"unknown job(s) {sorted(unknown)}; the shipped config has {list(JOBS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(CONFIG_DIR / "rules", dest / "rules", dirs_exist_ok=True)
    text = (CONFIG_DIR / "prometheus.yml").read_text()
    if scrape_interval_s is not None:
        for key in ("scrape_interval", "evaluation_interval"):
            old = f"  {key}: 15s"
            if old not in text:
                raise ValueError(f"shipped prometheus.yml has no '{old}' line to replace")
            text = text.replace(old, f"  {key}: {scrape_interval_s:g}s")
    (dest / "prometheus.yml").write_text(text)
    tdir = dest / "targets"
    tdir.mkdir(exist_ok=True)
    for job in JOBS:
        (tdir / f"{job.removeprefix('opengem-')}.json").write_text(
            json.dumps([{"targets": list(targets.get(job, ()))}] if targets.get(job) else []))
    return dest / "prometheus.yml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """``prometheus`` on 127.0.0.1:<free port> with ``config``; a context manager."""

    def __init__(self, config: str | Path, storage: str | Path, *, port: int = 0, log_path: str | Path | None = None):
        exe = binary()
        if exe is None:
            raise FileNotFoundError("prometheus not found on PATH (Debian/Ubuntu: apt-get install prometheus)")
        self.exe, self.config, self.storage = exe, Path(config), Path(storage)
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else self.storage.parent / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "PrometheusServer":
        self.storage.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.exe, f"--config.file={self.config}", f"--storage.tsdb.path={self.storage}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout_s:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()
        self.proc = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
