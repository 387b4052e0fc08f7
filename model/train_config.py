"""TrainConfig: the ``[train]`` table of the TOML config (no torch import, so any command can load it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from opengem.runtime import MAX_KEEP_MB

SHARE_MODES = ("none", "frozen", "finetune")  # as opengem.model.student (kept here: no torch import)
# What the server reads for a student (examples_batch's floor): a longer student history would be
# trained on more events than it is served with.
MAX_STUDENT_HISTORY = 256


@dataclass(frozen=True)
class StudentTrainConfig:
    """``[train.student]``: how ``opengem train --student SURFACE`` trains a student. The surface
    is the command line's only, so one file configures the GEM trainer and all its students."""

    # Last events read (mean-pooled + the most recent one); bench/transfer.py's size.
    history: int = 32
    hidden: tuple[int, ...] = (128, 64)
    # Auxiliary distillation head on the teacher's targets (never served), and its loss weight.
    distill: bool = True
    distill_weight: float = 1.0
    # Standard KD on the *served* head: its target is (1 - soft_mix) * label + soft_mix * the
    # (adapted) teacher probability. 0: labels only (the default until a full bench/transfer.py
    # run supports more; the medium run in docs/transfer-results.md used 0.6 with the adapter).
    soft_mix: float = 0.0
    # Student Adapter: teacher probabilities recalibrated on the freshest labels before they
    # become targets (window / refit interval in examples).
    adapter: bool = True
    adapter_window: int = 20_000
    adapter_refit_every: int = 1024
    # GEM's user representations as inputs: the daemon computes them with the current teacher
    # every ``refresh_every_s`` of *event time* (deterministic on a replay) for the users of
    # the examples since the last refresh, into the RepresentationStore that it alone writes
    # and the server reads (secondary); ``refresh_keep`` entries per user.
    representations: bool = False
    refresh_every_s: float = 300.0
    refresh_keep: int = 4
    # Start from GEM's tables: "none" | "frozen" | "finetune" (needs the same embedding dim).
    share_tables: str = "none"
    # Teacher: the newest GEM version published here (empty: the GEM trainer's models dir),
    # checked every ``teacher_poll_s``; at start the daemon waits ``teacher_wait_s`` for one.
    teacher_dir: str = ""
    teacher_poll_s: float = 5.0
    teacher_wait_s: float = 300.0
    # Empty: <data_dir>/students/<surface>, <data_dir>/representations/<surface>,
    # <data_dir>/train/students/<surface>/checkpoints (what `opengem serve` reads by default).
    models_dir: str = ""
    representations_dir: str = ""
    checkpoint_dir: str = ""

    def __post_init__(self) -> None:
        checks = {
            "history": 0 <= self.history <= MAX_STUDENT_HISTORY,
            "hidden": len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
            "distill_weight": self.distill_weight >= 0,
            "soft_mix": 0.0 <= self.soft_mix <= 1.0,
            "adapter_window": self.adapter_window >= 1,
            "adapter_refit_every": self.adapter_refit_every >= 1,
            "refresh_every_s": self.refresh_every_s > 0,
            "refresh_keep": 1 <= self.refresh_keep <= 255,
            "share_tables": self.share_tables in SHARE_MODES,
            "teacher_poll_s": self.teacher_poll_s >= 0,
            "teacher_wait_s": self.teacher_wait_s >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"[train.student]: invalid value(s) for {bad} (history <= {MAX_STUDENT_HISTORY}, "
                             f"share_tables one of {SHARE_MODES})")


@dataclass(frozen=True)
class TrainConfig:
    # Model kind (gem | dlrm | dcn) and preset (tiny | base | large; GEM only).
    model: str = "gem"
    preset: str = "base"
    # Examples per step and rank. 256 keeps a base step near 0.3-0.5 s on 2 CPU cores.
    batch_size: int = 256
    # How long a step waits to fill its batch before training a partial one: bounds
    # the delay a slow stream adds to freshness.
    fill_timeout_s: float = 0.25
    # Dense parts: Adam. Tables: fused row-wise Adagrad (one accumulator per row).
    lr: float = 1e-3
    emb_lr: float = 0.05
    # Checkpoints (model + optimizer + Kafka cursors): whichever comes first; 0 = off.
    checkpoint_every_s: float = 60.0
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 3
    # Serving versions published to the model directory; 0 = off.
    publish_every_s: float = 10.0
    publish_every_steps: int = 0
    keep_versions: int = 5
    # Negative downsampling (model/sampling.py): train every example with a positive label and
    # a fraction r of the others (chosen by a hash of the example id and ``sample_seed``, so a
    # replay keeps the same ones), each kept negative with weight 1/r -- predictions stay
    # calibrated, progressive metrics are weighted the same way. 1.0 = off (exact).
    negative_rate: float = 1.0
    # Adaptive r (0 = off): while the examples being trained are older than this (seconds from
    # their record entering Kafka), r falls (x0.8 a second) down to ``negative_rate_min``; under
    # half of it, r climbs back (x1.1 a second) up to ``negative_rate``. Exported as
    # opengem_train_negative_rate. Replays after a crash may then sample differently.
    max_delay_s: float = 0.0
    negative_rate_min: float = 0.01
    sample_seed: int = 0
    # Progressive-validation window per (surface, task), in examples (trained ones).
    metrics_window: int = 20_000
    # Prometheus on 127.0.0.1:<port> (+ rank); None: off.
    metrics_port: int | None = 9102
    # How often the windowed metrics are recomputed and the progress line printed.
    report_every_s: float = 5.0
    # Kafka consumer group the trainer commits its offsets to (for lag tools); the
    # checkpoint, not the group, decides where a restart resumes.
    group_id: str = "opengem-train"
    # Where a trainer without a checkpoint starts: "earliest" | "latest".
    start: str = "earliest"
    # Recent example ids remembered to drop the stream worker's re-sends after a crash.
    dedup_window: int = 100_000
    # Empty: <data_dir>/train/checkpoints and <data_dir>/models.
    checkpoint_dir: str = ""
    models_dir: str = ""
    # "" = CUDA when available, else CPU.
    device: str = ""
    # CPU intra-op threads (0: torch's default, one per core). 1 by default: the trainer
    # shares the machine with the broker and the stream worker, and OpenMP threads that
    # spin on an oversubscribed CPU made a tiny-preset step ~10x slower here (measured).
    threads: int = 1
    # glibc only, process-wide (opengem.runtime.tune_allocator): allocations come from the heap
    # (no mmap) and up to this many MiB of freed memory stay there, so a step's large tensors
    # (a (256, 1024, 32) history is 32 MiB) reuse pages instead of faulting in fresh ones.
    # Measured on model_quality batches (1k-capped histories): ~150k minor faults per GEM base
    # step before, ~1k after, median step 862 -> 504 ms, peak RSS +90 MB. 0: the allocator's
    # defaults; at most 2047 (mallopt takes a C int).
    malloc_keep_mb: int = 1024
    # GPU only: bf16 autocast of the forward, torch.compile of the dense part
    # (its cache under <data_dir>/train/compile-cache survives restarts).
    bf16: bool = True
    compile: bool = False
    # Student mode (``opengem train --student SURFACE``); unused by the GEM trainer.
    student: StudentTrainConfig = field(default_factory=StudentTrainConfig)

    def __post_init__(self) -> None:
        checks = {
            "model": self.model in ("gem", "dlrm", "dcn"),
            "batch_size": self.batch_size >= 1,
            "fill_timeout_s": self.fill_timeout_s >= 0,
            "lr": self.lr > 0,
            "emb_lr": self.emb_lr > 0,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "keep_versions": self.keep_versions >= 1,
            "metrics_window": self.metrics_window >= 1,
            "start": self.start in ("earliest", "latest"),
            "dedup_window": self.dedup_window >= 0,
            "device": self.device in ("", "cpu", "cuda"),
            "report_every_s": self.report_every_s > 0,
            "threads": self.threads >= 0,
            "malloc_keep_mb": 0 <= self.malloc_keep_mb <= MAX_KEEP_MB,  # mallopt takes a C int
            "negative_rate": 0 < self.negative_rate <= 1,
            "negative_rate_min": 0 < self.negative_rate_min <= 1,
            "max_delay_s": self.max_delay_s >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"[train]: invalid value(s) for {bad}")

    @property
    def downsampling(self) -> bool:
        """Whether negatives may be sampled out (a rate below 1, or an adaptive one)."""
        return self.negative_rate < 1 or self.max_delay_s > 0
