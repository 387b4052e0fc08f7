"""The served model version: watch the model directory, load, validate, swap.

:class:`ModelManager` polls ``latest_version(models_dir)`` (the trainer's
atomic publication, :mod:`opengem.model.registry`). A new version is loaded
in the manager's own thread while the old one keeps serving, validated on a
canary request (:func:`~opengem.serving.scoring.canary_check`: finite
probabilities of the right shape), and then made current by one reference
assignment. A request takes the current :class:`Scorer` once, at its start,
and uses it to the end, so in-flight requests finish on the version they
began with and every response names the version that scored it. A version
that fails to load or validate is skipped (logged, counted) and the old one
stays.

A surface served by a student (``[serve] models = {reels = "student"}``) has a
manager of its own on ``<students_dir>/<surface>`` (what ``opengem train
--student`` publishes), with the same load → canary → swap; it accepts only
versions of kind ``student`` for that surface (:func:`student_manager`).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from opengem.model.registry import ModelLoadError, latest_version, list_versions, load, publish
from opengem.model.registry import LoadedModel
from opengem.serving.scoring import Scorer, StudentScorer, canary_check

log = logging.getLogger(__name__)


class ModelManager:
    """``current``: the Scorer of the served version (None until one is published).

    ``on_change(event, scorer_or_version, detail)`` is called with
    ``("loaded", scorer, seconds)`` or ``("rejected", version, reason)``.
    """

    def __init__(self, models_dir: str | Path, poll_s: float = 1.0,
                 on_change: Callable[[str, Any, Any], None] | None = None,
                 scorer: Callable[[LoadedModel], Scorer] = Scorer, name: str = "gem"):
        self.models_dir = Path(models_dir)
        self.make_scorer, self.name = scorer, name  # name: what this manager serves ("gem", "student:reels")
        self.poll_s = poll_s
        self.on_change = on_change
        self._current: Scorer | None = None
        self.rejected: dict[str, str] = {}
        self.swaps = 0  # versions made current after the first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()
        self.on_stop: list[Callable[[], Any]] = []  # run by stop(), after the watcher ended

    @property
    def current(self) -> Scorer | None:
        return self._current

    def refresh(self) -> bool:
        """Serve the newest good version if it is newer than the current one; True on a swap.

        Tried newest first (the ``LATEST`` pointer, then by name): a version that
        fails to load or validate is remembered and skipped, so a broken
        publication falls back to the previous good one instead of blocking.
        """
        with self._refresh_lock:
            cur = self._current
            latest = latest_version(self.models_dir)
            if latest is None or (cur is not None and cur.loaded.version == latest):
                return False
            order = [latest] + [v for v in reversed(list_versions(self.models_dir)) if v != latest]
            for version in order:
                if cur is not None and version <= cur.loaded.version:
                    return False
                if version not in self.rejected and self._try(version, cur):
                    return True
            return False

    def _try(self, version: str, cur: Scorer | None) -> bool:
        t0 = time.monotonic()
        try:
            scorer = self.make_scorer(load(self.models_dir, version))
            canary_check(scorer)
        except Exception as e:  # noqa: BLE001 - any failure of a candidate version rejects it, never the server
            self.rejected[version] = str(e)
            log.error("model %s rejected, still serving %s: %s", version,
                      cur.loaded.version if cur else "nothing", e)
            if self.on_change:
                self.on_change("rejected", version, str(e))
            return False
        self._current = scorer  # the swap: one reference assignment
        if cur is not None:
            self.swaps += 1
        err = getattr(scorer, "precision_error", None)
        log.info("serving model %s (%s, %s%s) after %.2fs", version, scorer.loaded.kind,
                 getattr(scorer, "precision", "fp32"), "" if err is None else f", canary scores within {err:.1e}",
                 time.monotonic() - t0)
        if self.on_change:
            self.on_change("loaded", scorer, time.monotonic() - t0)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive one bad poll
                log.exception("model refresh failed")

    def start(self) -> "ModelManager":
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="model-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for f in self.on_stop:
            f()

    def wait(self, timeout_s: float) -> Scorer | None:
        """Block until some version is served (or the timeout)."""
        deadline = time.monotonic() + timeout_s
        while self._current is None and time.monotonic() < deadline:
            self.refresh()
            time.sleep(min(0.1, self.poll_s))
        return self._current


def ensure_model(models_dir: str | Path, preset_name: str = "base", seed: int = 0) -> str | None:
    """Publish an initial, untrained GEM version if none exists, so serving always has one.

    Returns the version published, or None when one was already there.
    """
    if latest_version(models_dir) is not None:
        return None
    import torch

    from opengem.model.config import preset
    from opengem.model.gem import GemModel

    torch.manual_seed(seed)
    path = publish(models_dir, GemModel(preset(preset_name)),
                   {"untrained": True, "note": f"initial {preset_name} GEM published by the server side "
                                               "so that serving has a version before the trainer's first"})
    return path.name


def student_manager(students_dir: str | Path, surface: str, *, poll_s: float = 1.0, catch_up_s: float = 0.5,
                    representations_dir: str | Path | None = None, secondary_root: str | Path,
                    on_change: Callable[[str, Any, Any], None] | None = None) -> ModelManager:
    """The manager of ``surface``'s student versions (``<students_dir>/<surface>``).

    A version must be of kind ``student`` and trained for ``surface``. One that reads GEM's
    representations gets a secondary reader of its representation store: ``representations_dir``
    (the ``[serve]`` setting) or else the directory its metadata names (the daemon's), opened
    under ``secondary_root`` once and shared by the versions that follow.
    """
    from opengem.features.representations import RepresentationStore

    stores: dict[tuple[str, int], RepresentationStore] = {}
    lock = threading.Lock()

    def make(loaded: LoadedModel) -> Scorer:
        if loaded.kind != "student":
            raise ValueError(f"version {loaded.version} is a {loaded.kind!r} model, not a student")
        cfg = loaded.model.cfg
        if cfg.surface != surface:
            raise ValueError(f"version {loaded.version} is the student of {cfg.surface!r}, not of {surface!r}")
        reps = None
        if cfg.repr_dim:
            path = representations_dir or loaded.meta.get("representations_dir")
            if not path:
                raise ValueError(f"version {loaded.version} reads representations but names no store "
                                 "(set [serve] representations_dir)")
            key = (str(Path(path).resolve()), int(cfg.repr_dim))
            with lock:
                if key not in stores:
                    sec = Path(secondary_root) / f"reps-{surface}-{len(stores)}"
                    stores[key] = RepresentationStore(key[0], key[1], secondary_dir=sec)
                reps = stores[key]
        return StudentScorer(loaded, reps, catch_up_s=catch_up_s)

    m = ModelManager(Path(students_dir) / surface, poll_s, on_change=on_change, scorer=make,
                     name=f"student:{surface}")
    m.on_stop.append(lambda: [s.close() for s in stores.values()])
    return m
