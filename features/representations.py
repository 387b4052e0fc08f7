"""GEM's user representations for students, in RocksDB: written on a refresh interval, read point in time.

One key per user (8-byte big-endian user id) in its own RocksDB directory
(next to the sequence shards, e.g. ``<data>/representations``); the value
holds the user's last ``keep`` representations, newest last::

    b"R1" | dim u16 | n u8 | n × (ts_ms i64 | version u32 | dim × float16)

``ts_ms`` is the event time the representation was computed *as of* (the
teacher read the user's history strictly before it). A read for an impression
at time ``t`` returns the newest entry with ``ts_ms < t``, so a trainer that
reads an example after later refreshes sees what a server saw at the time --
training and serving read the same function (CONVENTIONS.md, "Stores and
stream"). With ``keep`` entries and a refresh interval R, an example can be
read up to ``(keep - 1) · R`` after its impression and still find its entry;
older reads get "absent" (the student has a learned input for that), never a
newer vector.

float16 halves the bytes (a 256-wide vector is 512 B per entry); the
representations feed an MLP input after a LayerNorm, where fp16's ~3
significant digits are plenty. One writer (the refresher); readers in other
processes open a RocksDB secondary (``secondary_dir``) and :meth:`catch_up`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
from rocksdict import AccessType, Options, Rdict, WriteBatch

from opengem.features.store import PrimaryWatch

_MAGIC = b"R1"
_HEAD = struct.Struct(">2sHB")
_ENTRY = struct.Struct(">qI")
_DIM_KEY = b"\x00meta:dim"


def _key(user_id: int) -> bytes:
    return int(user_id).to_bytes(8, "big", signed=True)


class RepresentationStore:
    """user id -> last ``keep`` (ts_ms, version, float16 vector) entries."""

    def __init__(self, path: str | os.PathLike, dim: int, *, keep: int = 4,
                 secondary_dir: str | os.PathLike | None = None):
        if not 1 <= keep <= 255 or not 1 <= dim <= 65535:
            raise ValueError("need 1 <= keep <= 255 and 1 <= dim <= 65535")
        self.path, self.dim, self.keep = str(path), dim, keep
        self.read_only = secondary_dir is not None
        self._watch = PrimaryWatch(self.path)
        opts = Options()
        if self.read_only:
            opts.set_max_open_files(-1)  # required by RocksDB secondary instances
            Path(secondary_dir).mkdir(parents=True, exist_ok=True)
            self._db = Rdict(self.path, opts, access_type=AccessType.secondary(str(secondary_dir)))
        else:
            opts.create_if_missing(True)
            Path(self.path).mkdir(parents=True, exist_ok=True)
            self._db = Rdict(self.path, opts)
            stored = self._db.get(_DIM_KEY)
            if stored is None:
                self._db[_DIM_KEY] = struct.pack(">H", dim)
        stored = self._db.get(_DIM_KEY)
        if stored is not None and struct.unpack(">H", stored)[0] != dim:
            raise ValueError(f"{self.path} holds {struct.unpack('>H', stored)[0]}-wide representations, not {dim}")

    # -- encoding ---------------------------------------------------------------------

    def _decode(self, raw: bytes | None) -> list[tuple[int, int, np.ndarray]]:
        if raw is None:
            return []
        magic, dim, n = _HEAD.unpack_from(raw)
        if magic != _MAGIC or dim != self.dim:
            raise ValueError(f"corrupt representation value (magic {magic!r}, dim {dim})")
        out, off, vb = [], _HEAD.size, 2 * dim
        for _ in range(n):
            ts, ver = _ENTRY.unpack_from(raw, off)
            off += _ENTRY.size
            out.append((ts, ver, np.frombuffer(raw, np.float16, dim, off)))
            off += vb
        return out

    def _encode(self, entries: Sequence[tuple[int, int, np.ndarray]]) -> bytes:
        parts = [_HEAD.pack(_MAGIC, self.dim, len(entries))]
        for ts, ver, vec in entries:
            parts += [_ENTRY.pack(int(ts), int(ver)), np.asarray(vec, np.float16).tobytes()]
        return b"".join(parts)

    # -- write ------------------------------------------------------------------------

    def put(self, user_ids: Sequence[int] | np.ndarray, vectors: np.ndarray, ts_ms: int, version: int) -> None:
        """One refresh: ``vectors`` (B, dim) of ``user_ids`` as of ``ts_ms`` by model ``version``,
        in one WriteBatch. An entry at or after ``ts_ms`` already stored (a replayed refresh)
        is replaced, so a refresh is idempotent."""
        if self.read_only:
            raise PermissionError("a secondary RepresentationStore is read-only")
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (len(user_ids), self.dim):
            raise ValueError(f"vectors: expected ({len(user_ids)}, {self.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("representations must be finite")
        wb = WriteBatch()
        for u, v in zip(np.asarray(user_ids, np.int64).tolist(), vectors):
            k = _key(u)
            entries = [e for e in self._decode(self._db.get(k)) if e[0] < ts_ms]
            entries.append((ts_ms, version, v))
            wb.put(k, self._encode(entries[-self.keep:]))
        self._db.write(wb)

    # -- read -------------------------------------------------------------------------

    def get(self, user_ids: Sequence[int] | np.ndarray, before_ts: Sequence[int] | np.ndarray | int
            ) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (B, dim) float32, present (B,) bool): for each user the newest entry
        with ts_ms < before_ts (zeros and False when there is none)."""
        users = np.asarray(user_ids, np.int64)
        b = np.asarray(before_ts, np.int64)
        if b.ndim and b.shape != users.shape:
            raise ValueError(f"before_ts: one per user ({users.shape[0]}) or one for all, got {b.shape}")
        before = np.broadcast_to(b, users.shape)
        out = np.zeros((len(users), self.dim), np.float32)
        present = np.zeros(len(users), bool)
        raws = self._db.get([_key(u) for u in users.tolist()]) if len(users) else []
        for i, raw in enumerate(raws):
            for ts, _ver, vec in reversed(self._decode(raw)):
                if ts < before[i]:
                    out[i], present[i] = vec, True
                    break
        return out, present

    def catch_up(self, force: bool = False) -> bool:
        """A secondary: replay the writer's new writes; skipped while it wrote nothing
        (:class:`~opengem.features.store.PrimaryWatch`). Returns whether it caught up."""
        if not self.read_only:
            return False
        go, state = self._watch.due(force)
        if not go:
            return False
        self._db.try_catch_up_with_primary()
        self._watch.caught_up(state)
        return True

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "RepresentationStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
