"""Model versions on disk: what the trainer publishes and the server loads.

A version is a directory ``<models>/<version>/`` holding

* ``model.pt`` -- the ``state_dict`` (tensors only; loaded with
  ``torch.load(..., weights_only=True)``, so a model file can never run code),
* ``meta.json`` -- the model kind (``gem`` | ``dlrm`` | ``dcn`` | ``student``), its config as
  plain JSON, and free-form facts (trained examples, Kafka offsets covered,
  creation time, metrics).

Publication is atomic: the directory is written under a hidden temporary
name, every file and the directory are fsynced, then one ``rename`` makes it
visible and ``LATEST`` (a one-line pointer file, itself replaced by rename)
names it. A reader therefore sees either the previous version or the whole
new one, never half of it, even across a crash or power loss. Older versions
beyond ``keep`` are removed after the pointer moved. Version names sort in
publication order (zero-padded sequence number), so ``latest`` without the
pointer is still well defined.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opengem.config import from_dict
from opengem.model.baselines import BaselineConfig, DCNBaseline, DLRMBaseline
from opengem.model.config import GemConfig
from opengem.model.gem import GemModel
from opengem.model.student import StudentConfig, StudentModel

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
POINTER = "LATEST"
FORMAT = 1

KINDS: dict[str, tuple[type, type[nn.Module]]] = {
    "gem": (GemConfig, GemModel),
    "dlrm": (BaselineConfig, DLRMBaseline),
    "dcn": (BaselineConfig, DCNBaseline),
    # A per-surface student (model/student.py): served through its serving head only.
    "student": (StudentConfig, StudentModel),
}


class ModelLoadError(RuntimeError):
    """A version directory that is missing, incomplete or does not match its config."""


def kind_of(model: nn.Module) -> str:
    for kind, (_, cls) in KINDS.items():
        if type(model) is cls:
            return kind
    raise TypeError(f"no registered kind for {type(model).__name__}; known: {sorted(KINDS)}")


def build_model(kind: str, cfg: Any, device: torch.device | None = None) -> nn.Module:
    """A fresh model of ``kind`` from its config object (or a plain dict of it)."""
    try:
        cfg_cls, model_cls = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}") from None
    if isinstance(cfg, dict):
        cfg = from_dict(cfg_cls, cfg, kind)
    return model_cls(cfg, device=device)


@dataclass(frozen=True)
class LoadedModel:
    version: str
    kind: str
    model: nn.Module
    meta: dict[str, Any]
    path: Path


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_versions(models_dir: str | Path) -> list[str]:
    """Complete versions, oldest first (hidden temporaries excluded)."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).is_file())


def latest_version(models_dir: str | Path) -> str | None:
    """The version ``LATEST`` names, else the newest complete one, else None."""
    root = Path(models_dir)
    try:
        name = (root / POINTER).read_text().strip()
        if name and (root / name / META_FILE).is_file():
            return name
    except OSError:
        pass
    versions = list_versions(root)
    return versions[-1] if versions else None


def next_version_name(models_dir: str | Path) -> str:
    versions = list_versions(models_dir)
    n = int(versions[-1].split("-")[0]) + 1 if versions and versions[-1].split("-")[0].isdigit() else 1
    return f"{n:08d}"


def publish(
    models_dir: str | Path,
    model: nn.Module,
    meta: dict[str, Any] | None = None,
    *,
    version: str | None = None,
    keep: int = 5,
) -> Path:
    """Write ``model`` as a new version atomically, point ``LATEST`` at it, keep the newest ``keep``."""
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    version = version or next_version_name(root)
    if version.startswith(".") or "/" in version:
        raise ValueError(f"bad version name {version!r}")
    final = root / version
    if final.exists():
        raise FileExistsError(f"version {version} already exists in {root}")
    kind = kind_of(model)
    info = {
        "format": FORMAT,
        "version": version,
        "kind": kind,
        "config": dataclasses.asdict(model.cfg),
        "created_at": time.time(),
        **(meta or {}),
    }
    tmp = root / f".tmp-{version}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, tmp / MODEL_FILE)
    (tmp / META_FILE).write_text(json.dumps(info, indent=1, sort_keys=True, default=_json_default))
    for f in (MODEL_FILE, META_FILE):
        _fsync_file(tmp / f)
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer_tmp = root / f".{POINTER}.tmp"
    pointer_tmp.write_text(version + "\n")
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, root / POINTER)
    _fsync_dir(root)
    for old in list_versions(root)[:-keep] if keep > 0 else []:
        if old != version:
            shutil.rmtree(root / old, ignore_errors=True)
    return final


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def read_meta(models_dir: str | Path, version: str) -> dict[str, Any]:
    path = Path(models_dir) / version / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def load(models_dir: str | Path, version: str | None = None, device: torch.device | None = None) -> LoadedModel:
    """Load a version (default: the latest) into a fresh model in eval mode.

    The state dict is loaded with ``weights_only=True`` and ``strict=True``:
    a file that holds anything but tensors, or tensors that do not match the
    config in ``meta.json``, raises :class:`ModelLoadError`.
    """
    root = Path(models_dir)
    version = version or latest_version(root)
    if version is None:
        raise ModelLoadError(f"no published model in {root}")
    meta = read_meta(root, version)
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{root / version}: unsupported format {meta.get('format')!r}")
    try:
        model = build_model(meta["kind"], meta["config"], device=device)
        state = torch.load(root / version / MODEL_FILE, map_location=device or "cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (OSError, KeyError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise ModelLoadError(f"{root / version}: {str(e).splitlines()[0]}") from e
    model.eval()
    return LoadedModel(version=version, kind=meta["kind"], model=model, meta=meta, path=root / version)
