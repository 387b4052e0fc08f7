"""Trainer checkpoints: model, optimizer state and the Kafka cursors they cover, per rank, atomically.

Layout under the checkpoint directory::

    <step, 12 digits>/manifest.json     format, step, world size, time, facts
    <step>/rank0000.pt ... rankNNNN.pt  each rank's local state (torch.save, tensors + plain data)
    LATEST                              name of the newest complete checkpoint
    .tmp-<step>/                        a checkpoint being written (ignored, removed at start)

Writing is a collective (:func:`save`): every rank writes and fsyncs its file
into ``.tmp-<step>``, a barrier, then rank 0 writes the manifest, fsyncs the
directory and renames it into place, then moves ``LATEST`` by rename. A crash
at any point leaves either the previous checkpoint or the complete new one
visible; a half-written one stays a hidden temporary. Loading uses
``torch.load(..., weights_only=True)``: a checkpoint holds tensors, numbers,
strings, lists and dicts, never code.

All ranks must see one filesystem (one machine, or a shared mount).

Failpoints (crash tests): ``OPENGEM_FAILPOINT=<name>[:<n>]`` kills the
process with SIGKILL at the n-th (default first) pass through
:func:`failpoint` ``(name)``. Names used: ``checkpoint.rank_file`` (half a
rank file written), ``checkpoint.before_rename`` (all files written, not yet
renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

FORMAT = 1
MANIFEST = "manifest.json"
POINTER = "LATEST"
_hits: dict[str, int] = {}


def failpoint(name: str, before: Callable[[], None] | None = None) -> None:
    """SIGKILL this process here if ``OPENGEM_FAILPOINT`` names this point (tests only).

    ``before`` runs first: it leaves behind what a crash at this point would.
    """
    spec = os.environ.get("OPENGEM_FAILPOINT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or written by another world size."""


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank_file(rank: int) -> str:
    return f"rank{rank:04d}.pt"


def _name(step: int) -> str:
    return f"{step:012d}"


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def save(root: str | Path, step: int, state: dict[str, Any], *, rank: int, world_size: int,
         facts: dict[str, Any] | None = None, keep: int = 3) -> Path:
    """Write this rank's ``state`` as part of checkpoint ``step``; collective over all ranks."""
    root = Path(root)
    tmp = root / f".tmp-{_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(world_size)
    part = tmp / (_rank_file(rank) + ".part")
    with open(part, "wb") as f:
        torch.save(state, f)
        f.flush()
        failpoint("checkpoint.rank_file", lambda: f.truncate(max(1, f.tell() // 2)))  # half a file on disk
        os.fsync(f.fileno())
    os.rename(part, tmp / _rank_file(rank))
    _barrier(world_size)
    final = root / _name(step)
    if rank == 0:
        manifest = {"format": FORMAT, "step": step, "world_size": world_size, "created_at": time.time(),
                    **(facts or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _fsync(tmp / MANIFEST)
        _fsync(tmp, directory=True)
        failpoint("checkpoint.before_rename")
        if final.exists():  # a checkpoint of the same step from before a crash: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root, directory=True)
        ptr = root / f".{POINTER}.tmp"
        ptr.write_text(final.name + "\n")
        _fsync(ptr)
        os.replace(ptr, root / POINTER)
        _fsync(root, directory=True)
        for old in complete(root)[:-keep]:
            if old != final.name:
                shutil.rmtree(root / old, ignore_errors=True)
    _barrier(world_size)
    return final


def complete(root: str | Path) -> list[str]:
    """Names of complete checkpoints (a manifest exists), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())


def latest(root: str | Path) -> Path | None:
    """The checkpoint ``LATEST`` names if complete, else the newest complete one, else None."""
    root = Path(root)
    try:
        name = (root / POINTER).read_text().strip()
        if name and (root / name / MANIFEST).is_file():
            return root / name
    except OSError:
        pass
    names = complete(root)
    return root / names[-1] if names else None


def remove_partial(root: str | Path) -> list[str]:
    """Delete half-written temporaries left by a crash; returns their names (rank 0 calls this)."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


def manifest(path: str | Path) -> dict[str, Any]:
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the manifest of {path}: {e}") from e
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {m.get('format')!r}")
    return m


def load(path: str | Path, *, rank: int, world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this rank's state, the manifest) of the checkpoint at ``path``."""
    path = Path(path)
    m = manifest(path)
    if m["world_size"] != world_size:
        raise CheckpointError(f"{path} was written by {m['world_size']} rank(s), this run has {world_size}: "
                              "restart with the same --nproc_per_node (resharding is not supported)")
    try:
        state = torch.load(path / _rank_file(rank), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error to the caller
        raise CheckpointError(f"{path / _rank_file(rank)}: {e}") from e
    return state, m
