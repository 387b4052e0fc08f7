"""`opengem train --student SURFACE`: the trainer daemon in student mode.

::

    opengem.examples ──► ExampleSource (this surface only) ──► examples_batch (student's read)
                                                                   │
    <models>/LATEST ──► teacher (newest *published* GEM, ──► teacher probs ──► Student Adapter
                        reloaded when a newer one appears)       (predict-then-update on labels)
                                   │                                   │
                                   ├─► user representations ──► RepresentationStore (every
                                   │   (refresh interval)         refresh_every_s of event time)
                                   ▼                                   ▼
                 StudentLearner: serving head on labels, distillation head on adapted targets
                                   │
          checkpoints (student + optimizers + adapter + refresh state + cursors) ──►
          versions of kind "student" in <data>/students/<surface>

Everything around the step is :class:`~opengem.model.trainer.Trainer`'s: the
source and its cursors, the dedup window, checkpoints bound to the examples
topic, publication through the registry, progressive validation (of the
student's serving head, on its surface), reports and metrics. This module
replaces only what differs -- the learner, its read, the step, the facts a
checkpoint is bound to and a version records -- through the Trainer's hooks
(``_make_learner``, ``_source_weigh``, ``_learn``, ``_facts``,
``_publish_meta``, ``_readers_dir``).

The teacher is whatever the GEM trainer last *published* (it lags the stream
by up to its publication interval, more when the GEM trainer is behind), read
from the registry like the server reads it (``weights_only``), checked every
``teacher_poll_s``. A version whose features (or representation width, when
the student reads representations) differ from the student's is refused and
the old teacher stays. Examples of other surfaces are dropped by the source
(their cursors advance, nothing is read for them; they count in
``sampled_out`` / ``opengem_train_sampled_out``).

Two reads per batch when the teacher reads a longer history than the student
is served with (base GEM: 1,024 events; the server reads 256 for a student):
the student trains on exactly what the server featurizes for it (the dense
history counters are counted over the read history), the teacher predicts on
its own read.

Hierarchical transfer: ``[train.student] teacher_dir`` may name another
student's versions (a per-domain intermediate trained by this daemon from
GEM); it then teaches through distillation and the adapter (representations
and shared tables need a GEM teacher; an intermediate that itself reads
representations is refused).

Single process (students are small); under torchrun it refuses to start.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from opengem.config import Config
from opengem.model import registry
from opengem.model.data import examples_batch, history_len
from opengem.model.distributed import DistInfo
from opengem.model.student import (
    StudentAdapter, StudentConfig, StudentLearner, refresh_representations, representation_dim, student_inputs,
)
from opengem.model.train_config import TrainConfig
from opengem.model.trainer import Trainer, _Unit
from opengem.stream.joiner import Example


class StudentModeError(ValueError):
    """A student mode that cannot run as configured (a clear message, no traceback needed)."""


def student_paths(cfg: Config, tcfg: TrainConfig, surface: str) -> dict[str, Path]:
    """Where the student of ``surface`` reads its teacher and writes everything else."""
    st, root = tcfg.student, Path(cfg.data_dir)
    return {
        "teacher": Path(st.teacher_dir or tcfg.models_dir or root / "models"),
        "models": Path(st.models_dir or root / "students" / surface),
        "representations": Path(st.representations_dir or root / "representations" / surface),
        "checkpoints": Path(st.checkpoint_dir or root / "train" / "students" / surface / "checkpoints"),
    }


# --------------------------------------------------------------------------- teacher


class TeacherWatch:
    """The newest published version of a models directory, loaded once and reloaded when a newer one
    appears (checked at most every ``poll_s``). A version that fails to load or does not fit
    ``check`` is remembered as rejected and the current teacher stays."""

    def __init__(self, models_dir: Path, poll_s: float, echo: Callable[[str], None]):
        self.models_dir, self.poll_s, self.echo = Path(models_dir), poll_s, echo
        self.current: registry.LoadedModel | None = None
        self.check: Callable[[registry.LoadedModel], None] = lambda lm: None
        self.rejected: dict[str, str] = {}
        self.reloads = 0  # teachers loaded after the first
        self._last_poll = -float("inf")

    @property
    def model(self) -> torch.nn.Module:
        assert self.current is not None
        return self.current.model

    @property
    def version(self) -> str:
        return self.current.version if self.current is not None else ""

    def poll(self, force: bool = False) -> bool:
        """Load the newest version if it is newer than the current one; True when the teacher changed."""
        now = time.monotonic()
        if not force and now - self._last_poll < self.poll_s:
            return False
        self._last_poll = now
        latest = registry.latest_version(self.models_dir)
        if latest is None or latest in self.rejected or (self.current is not None and latest <= self.version):
            return False
        try:
            lm = registry.load(self.models_dir, latest)
            self.check(lm)
        except (registry.ModelLoadError, StudentModeError) as e:
            self.rejected[latest] = str(e)
            self.echo(f"teacher version {latest} refused, keeping {self.version or 'none'}: {e}")
            return False
        for p in lm.model.parameters():
            p.requires_grad_(False)
        first = self.current is None
        self.current = lm
        if not first:
            self.reloads += 1
        self.echo(f"teacher: {lm.kind} version {lm.version} from {self.models_dir}"
                  + ("" if first else f" (reload {self.reloads})"))
        return True

    def wait(self, timeout_s: float, stop: Callable[[], bool]) -> registry.LoadedModel:
        deadline = time.monotonic() + timeout_s
        while not self.poll(force=True):
            if self.current is not None:
                break
            if stop() or time.monotonic() >= deadline:
                raise StudentModeError(
                    f"no usable published teacher in {self.models_dir} after {timeout_s:g}s"
                    + (f" (refused: {self.rejected})" if self.rejected else "")
                    + ": run `opengem train` (GEM) first, or point [train.student] teacher_dir at its versions")
            time.sleep(min(0.5, max(self.poll_s, 0.05)))
        assert self.current is not None
        return self.current


# --------------------------------------------------------------------------- representation refresh


class RepresentationRefresher:
    """Every ``every_ms`` of event time, GEM's user representation of every user seen since the
    last refresh (their latest example gives the request context), as of the newest example's
    time + 1 ms, into ``store`` (:func:`~opengem.model.student.refresh_representations`)."""

    def __init__(self, store: Any, every_ms: int):
        self.store, self.every_ms = store, every_ms
        self.recent: dict[int, Example] = {}
        self.last_ts: int | None = None  # as-of time of the last refresh (the first example's time before one)
        self.refreshes = 0
        self.users_written = 0

    def observe(self, examples: list[Example], teacher: torch.nn.Module, version: str, reader: Any) -> int:
        """Remember ``examples``' users; refresh if due. Returns the users written (0: no refresh)."""
        if not examples:
            return 0
        for e in examples:
            cur = self.recent.get(e.user_id)
            if cur is None or e.ts >= cur.ts:
                self.recent[e.user_id] = e
        hi = max(e.ts for e in examples)
        if self.last_ts is None:
            self.last_ts = min(e.ts for e in examples)
        if hi - self.last_ts < self.every_ms:
            return 0
        now_ms = hi + 1
        n = refresh_representations(teacher, list(self.recent.values()), reader, self.store, now_ms,
                                    int(version) if version.isdigit() else 0)
        self.recent.clear()
        self.last_ts = now_ms
        self.refreshes += 1
        self.users_written += n
        return n

    def state(self) -> dict[str, Any]:
        return {"last_ts": self.last_ts, "refreshes": self.refreshes, "users_written": self.users_written,
                "recent": [dataclasses.asdict(e) for e in self.recent.values()]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.last_ts = state["last_ts"]
        self.refreshes, self.users_written = int(state["refreshes"]), int(state["users_written"])
        self.recent = {d["user_id"]: Example(**d) for d in state["recent"]}


class StudentDaemonLearner:
    """What the Trainer checkpoints as its learner: the student (model, optimizers, adapter) and
    the refresh bookkeeping; ``unsharded()`` is the student model the registry publishes."""

    def __init__(self, student: StudentLearner, refresher: RepresentationRefresher | None):
        self.student, self.refresher = student, refresher

    def state(self) -> dict[str, Any]:
        return {"student": self.student.state(),
                "refresh": self.refresher.state() if self.refresher is not None else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.student.load_state(state["student"])
        if self.refresher is not None and state.get("refresh") is not None:
            self.refresher.load_state(state["refresh"])

    def unsharded(self) -> torch.nn.Module:
        return self.student.unsharded()


# --------------------------------------------------------------------------- the daemon


class StudentTrainer(Trainer):
    """:class:`Trainer` with a student learner: same loop, checkpoints, publication and metrics."""

    def __init__(self, cfg: Config, tcfg: TrainConfig, surface: str, bootstrap: str, info: DistInfo, *,
                 fresh: bool = False, echo: Callable[[str], None] = print, stop: Callable[[], bool] = lambda: False):
        if surface not in cfg.surfaces:
            raise StudentModeError(f"unknown surface {surface!r}; the deployment has {list(cfg.surfaces)}")
        if info.world_size > 1:
            raise StudentModeError("the student daemon runs in one process (students are small): not under torchrun")
        self.paths = student_paths(cfg, tcfg, surface)
        if self.paths["models"].resolve() == self.paths["teacher"].resolve():
            raise StudentModeError(f"the student's models dir is the teacher's ({self.paths['models']}): "
                                   "students publish elsewhere ([train.student] models_dir)")
        self.surface, self._stop = surface, stop
        self.teacher = TeacherWatch(self.paths["teacher"], tcfg.student.teacher_poll_s, echo)
        self.store: Any = None
        self.teacher_seconds = 0.0
        self.teacher_ahead = 0  # batches distilled from a teacher that had trained past them
        own = dataclasses.replace(tcfg, checkpoint_dir=str(self.paths["checkpoints"]),
                                  models_dir=str(self.paths["models"]),
                                  group_id=f"{tcfg.group_id}-student-{surface}")
        # No read thread: the teacher's read and the representation refresh use the same store
        # reader on this thread.
        try:
            super().__init__(cfg, own, bootstrap, info, fresh=fresh, echo=echo, prefetch=False)
        except BaseException:
            if self.store is not None:  # opened by _make_learner: free the RocksDB lock
                self.store.close()
            raise
        self._batch_start = dict(self.source.cursors)

    # -- hooks -----------------------------------------------------------------------------
    def _make_learner(self) -> StudentDaemonLearner:
        from opengem.features.representations import RepresentationStore

        st = self.tcfg.student
        t = self.teacher.wait(st.teacher_wait_s, self._stop)
        tcfg_t = t.model.cfg
        if (st.representations or st.share_tables != "none") and t.kind != "gem":
            raise StudentModeError(f"teacher {t.version} is a {t.kind!r} model: representations and shared "
                                   "tables need a GEM teacher")
        reps = representation_dim(t.model) if st.representations else 0
        if tuple(tcfg_t.features.surfaces) != tuple(self.cfg.surfaces):
            raise StudentModeError(f"teacher {t.version} serves surfaces {list(tcfg_t.features.surfaces)}, "
                                   f"the deployment {list(self.cfg.surfaces)}")
        self.student_cfg = StudentConfig(features=tcfg_t.features, surface=self.surface,
                                         d=tcfg_t.d if st.share_tables != "none" else StudentConfig.d,
                                         history=st.history, hidden=tuple(st.hidden), distill=st.distill,
                                         distill_weight=st.distill_weight, repr_dim=reps,
                                         soft_mix=st.soft_mix,  # [train.student] (0: labels only)
                                         share_tables=st.share_tables)

        def fits(lm: registry.LoadedModel) -> None:
            if getattr(lm.model.cfg, "repr_dim", 0):
                raise StudentModeError("a teacher that reads GEM representations itself (a student with "
                                       "repr_dim) cannot be fed here; use an intermediate without them")
            if lm.model.cfg.features != self.student_cfg.features:
                raise StudentModeError("its FeatureConfig differs from the student's (tables, hashing, surfaces)")
            if reps and (lm.kind != "gem" or representation_dim(lm.model) != reps):
                raise StudentModeError(f"its user representation is not {reps} wide like the student's input")

        fits(t)
        self.teacher.check = fits
        self.model_cfg = self.student_cfg  # the batch read: what the server featurizes for a student
        self.surfaces = tuple(self.student_cfg.features.surfaces)
        self.tasks = tuple(self.student_cfg.features.tasks)
        adapter = (StudentAdapter(len(self.tasks), window=st.adapter_window, refit_every=st.adapter_refit_every)
                   if st.adapter and self._uses_teacher else None)
        student = StudentLearner(self.student_cfg, teacher=t.model if st.share_tables != "none" else None,
                                 adapter=adapter, lr=self.tcfg.lr, emb_lr=self.tcfg.emb_lr)
        refresher = None
        if reps:
            self.store = RepresentationStore(self.paths["representations"], reps, keep=st.refresh_keep)
            refresher = RepresentationRefresher(self.store, int(st.refresh_every_s * 1000))
        return StudentDaemonLearner(student, refresher)

    @property
    def _uses_teacher(self) -> bool:
        """The teacher's probabilities are needed: a distillation head or a soft-target mix on the served head."""
        return self.student_cfg.distill or self.student_cfg.soft_mix > 0

    def _model_name(self) -> str:
        st = self.tcfg.student
        mix = st.soft_mix
        parts = [p for p, on in (("distill", st.distill), (f"soft targets {mix:g} on the served head", mix > 0),
                                 ("adapter", st.adapter and (st.distill or mix > 0)),
                                 ("representations", st.representations),
                                 (f"{st.share_tables} tables", st.share_tables != "none")) if on]
        return (f"student for {self.surface} ({', '.join(parts) or 'labels only'}; teacher {self.teacher.version} "
                f"from {self.paths['teacher']})")

    def _readers_dir(self) -> Path:
        return Path(self.cfg.data_dir) / "train" / "readers" / f"student-{self.surface}"

    def _source_weigh(self) -> Callable[[Example], float]:
        surface, down = self.surface, self.tcfg.downsampling

        def weigh(ex: Example) -> float:
            if ex.surface != surface:
                return 0.0
            return self._weigh(ex) if down else 1.0

        return weigh

    def _facts(self) -> dict[str, Any]:
        return {"topic_id": self.topic_id, "model": "student", "surface": self.surface,
                "config": dataclasses.asdict(self.student_cfg)}

    def _publish_meta(self) -> dict[str, Any]:
        r = self.learner.refresher
        a = self.learner.student.adapter
        return {"surface": self.surface, "teacher_version": self.teacher.version,
                "teacher_kind": self.teacher.current.kind if self.teacher.current else None,
                "teacher_dir": str(self.paths["teacher"]),
                "teacher_reloads": self.teacher.reloads,
                "student": dataclasses.asdict(self.tcfg.student),
                "adapter": a.state() if a is not None else None,
                "representations_dir": str(self.paths["representations"]) if r is not None else None,
                "representation_refreshes": r.refreshes if r is not None else 0,
                "teacher_ahead_batches": self.teacher_ahead, "teacher_forward_s": round(self.teacher_seconds, 3)}

    def _teacher_is_ahead(self, unit: _Unit) -> bool:
        """Whether the teacher's version may have trained on this batch: its cursors (same topic)
        are past where this batch began on one of the batch's partitions."""
        meta = self.teacher.current.meta if self.teacher.current is not None else {}
        if meta.get("topic_id") != self.topic_id or not isinstance(meta.get("cursors"), dict):
            return False
        from opengem.model.source import Cursor

        cursors = {int(p): Cursor(*c) for p, c in meta["cursors"].items()}
        return any(cursors.get(p, Cursor(0, 0)) > self._batch_start.get(p, Cursor(0, 0))
                   for p in {it.partition for it in unit.items})

    def _learn(self, unit: _Unit) -> torch.Tensor:
        """Teacher (reloaded if a newer version is published) -> adapted targets + representations ->
        the student's predict-then-train step; then the representation refresh if due."""
        self.teacher.poll()
        if self._uses_teacher and self._teacher_is_ahead(unit):
            if not self.teacher_ahead:
                self.echo(f"note: teacher {self.teacher.version} has trained past the examples being distilled "
                          "(the student runs behind the GEM trainer); counted as teacher_ahead_batches")
            self.teacher_ahead += 1
        examples = [it.example for it in unit.items]
        t0 = time.monotonic()
        teacher = self.teacher.model
        tp = None
        if self._uses_teacher:
            tb = unit.batch
            if max(history_len(teacher.cfg), 256) != max(history_len(self.student_cfg), 256):
                tb = examples_batch(examples, self.reader, teacher.cfg)  # the teacher's own (longer) read
            with torch.no_grad():
                teacher.eval()
                tp = teacher.predict(tb).numpy()
        self.teacher_seconds += time.monotonic() - t0
        x: Any = unit.batch
        if self.store is not None:
            x = student_inputs(unit.batch, np.fromiter((e.user_id for e in examples), np.int64, len(examples)),
                               np.fromiter((e.ts for e in examples), np.int64, len(examples)), self.store)
        probs = self.learner.student.step(x, unit.weight, tp)
        self._batch_start = dict(self.source.cursors)  # where the next batch begins (at the latest)
        if self.learner.refresher is not None:
            n = self.learner.refresher.observe(examples, teacher, self.teacher.version, self.reader)
            if n:
                self.echo(f"representations: {n:,} users as of {self.learner.refresher.last_ts} "
                          f"(teacher {self.teacher.version}) -> {self.paths['representations']}")
        return probs

    def close(self) -> None:
        super().close()
        if self.store is not None:
            self.store.close()
            self.store = None


def run_student(cfg: Config, tcfg: TrainConfig, surface: str, bootstrap: str, info: DistInfo, *,
                stop: Callable[[], bool] = lambda: False, fresh: bool = False, max_examples: int | None = None,
                idle_exit_s: float | None = None) -> Any:
    trainer = StudentTrainer(cfg, tcfg, surface, bootstrap, info, fresh=fresh, echo=lambda s: print(s, flush=True),
                             stop=stop)
    return trainer.run(stop, max_examples=max_examples, idle_exit_s=idle_exit_s)


__all__ = ["StudentTrainer", "StudentModeError", "TeacherWatch", "RepresentationRefresher", "run_student",
           "student_paths"]
