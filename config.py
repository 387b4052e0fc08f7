"""Configuration: frozen dataclasses, one per part, composed by :class:`Config`.

Loaded from one TOML file whose unknown keys are errors (a typo must not be
silently ignored), then overridden by environment variables and CLI flags:

    [kafka]
    bootstrap = "broker1:9092,broker2:9092"   # empty: start the embedded broker
    partitions = 4

    [sim]
    seed = 7
    n_users = 20000

No ``exec``, no gin: a config is data. ``dataclasses.replace`` derives variants.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from opengem.model.train_config import TrainConfig
from opengem.ops.config import MonitorConfig
from opengem.serving.config import ServeConfig
from opengem.stream.events import DEFAULT_SURFACES

T = TypeVar("T")


@dataclass(frozen=True)
class KafkaConfig:
    # Empty: start the embedded Tansu broker on 127.0.0.1. Otherwise a Kafka
    # cluster's bootstrap servers ("host:port,host:port"); OPENGEM_BOOTSTRAP
    # overrides the file, --bootstrap overrides both.
    bootstrap: str = ""
    # Partitions of every opengem topic. 4 lets up to four stream workers share
    # the load on one machine; a real cluster would use many more.
    partitions: int = 4
    # Replication factor used when opengem creates topics on a real cluster.
    replication: int = 1
    events_topic: str = "opengem.events"
    examples_topic: str = "opengem.examples"
    dlq_topic: str = "opengem.events.dlq"
    # Port of the embedded broker; 0 picks a free one.
    embedded_port: int = 0
    # Consumer-group timing. The embedded broker holds every JoinGroup reply
    # for half the session timeout, so short timeouts make joins fast there;
    # real clusters keep Kafka's usual defaults (None = client default).
    session_timeout_ms: int | None = None
    heartbeat_interval_ms: int | None = None


@dataclass(frozen=True)
class Config:
    surfaces: tuple[str, ...] = DEFAULT_SURFACES
    # Where runs keep their state (stores, checkpoints, models, logs).
    data_dir: str = "data"
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    sim: Any = None  # opengem.stream.simulator.SimConfig, filled in by load()

    def __post_init__(self) -> None:
        if self.sim is None:
            from opengem.stream.simulator import SimConfig

            object.__setattr__(self, "sim", SimConfig(surfaces=self.surfaces))


class ConfigError(ValueError):
    pass


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where or cls.__name__}] must be a table")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in [{where or 'root'}]; known: {sorted(names)}")
    hints = _hints(cls)
    kw = {}
    for k, v in data.items():
        kw[k] = _coerce(hints[k], v, f"{where}.{k}" if where else k)
    return cls(**kw)


def _coerce(tp: Any, v: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, where)
    if tp is Any:
        return v
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {v!r} does not fit {tp}")
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(v).__name__}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        return tuple(_coerce(elem, x, f"{where}[]") for x in v)
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if tp in (int, float, str, bool):
        if type(v) is not tp:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(v).__name__} {v!r}")
        return v
    return v


def load(path: str | os.PathLike | None = None, **overrides: Any) -> Config:
    """Read the TOML file (if any), apply OPENGEM_* environment overrides, then ``overrides``.

    ``overrides`` are dotted keys: ``load(None, **{"kafka.bootstrap": "h:9092"})``.
    """
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    env = {
        "OPENGEM_BOOTSTRAP": "kafka.bootstrap",
        "OPENGEM_DATA_DIR": "data_dir",
    }
    for var, key in env.items():
        if os.environ.get(var):
            _set(data, key, os.environ[var])
    for key, v in overrides.items():
        if v is not None:
            _set(data, key, v)
    if "sim" in data:
        from opengem.stream.simulator import SimConfig

        sim_data = dict(data.pop("sim"))
        sim_data.setdefault("surfaces", list(data.get("surfaces", DEFAULT_SURFACES)))
        cfg = from_dict(Config, data)
        return dataclasses.replace(cfg, sim=from_dict(SimConfig, sim_data, "sim"))
    return from_dict(Config, data)


def _set(data: dict[str, Any], dotted: str, v: Any) -> None:
    *parents, last = dotted.split(".")
    d = data
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = v


def run_dir(cfg: Config, *parts: str) -> Path:
    p = Path(cfg.data_dir, *parts)
    p.mkdir(parents=True, exist_ok=True)
    return p
