"""ServeConfig: the ``[serve]`` table of the opengem TOML file.

Kept free of grpc / torch imports so that ``opengem.config`` can compose it
without loading the serving stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from opengem.runtime import MAX_KEEP_MB

# [serve] precision: the FM MLPs in fp32 or bf16 (model.wukong.mlp_precision), or "auto" (by the CPU)
PRECISIONS = ("fp32", "bf16", "auto")

MODEL_KINDS = ("gem", "student")  # what [serve] models may name per surface


@dataclass(frozen=True)
class ServeConfig:
    # Loopback by default: binding anything else needs a bearer token (see `opengem serve --help`).
    host: str = "127.0.0.1"
    # gRPC port; 0 picks a free one (printed at start).
    port: int = 50051
    # Optional JSON/HTTP endpoint (POST /v1/rank) for curl users; -1: off, 0: a free port.
    http_port: int = -1
    # Prometheus metrics on host:metrics_port/metrics; -1: off (9101: stream worker, 9102: trainer).
    metrics_port: int = 9103
    # Where model versions are published; empty: <data_dir>/models (what the trainer writes).
    models_dir: str = ""
    # How often the model directory is checked for a new version (seconds).
    poll_s: float = 1.0
    # How often the store's secondary readers catch up with the stream worker (seconds).
    catch_up_s: float = 0.5
    # Requests with more candidates are refused (INVALID_ARGUMENT): bounds the batch and its latency.
    max_candidates: int = 2000
    # Larger request messages are refused by gRPC itself (RESOURCE_EXHAUSTED); 1 MiB holds ~20k candidates.
    max_request_bytes: int = 1 << 20
    # Server-side budget of one request when the client sets no deadline (or a longer one).
    timeout_s: float = 2.0
    # gRPC handler threads: featurization of one request overlaps the model run of another.
    workers: int = 8
    # Model forward passes at once. Each uses torch's intra-op threads (below), so on a
    # small machine one at a time gives the best tail latency.
    inference_slots: int = 1
    # Torch intra-op threads of the server process (0: torch's default, one per core).
    # 1 by default: the other core featurizes the next request, and on a machine shared with
    # the broker / worker / trainer, OpenMP threads that wait on a preempted peer made a
    # 500-candidate GEM request ~15x slower (in-process, load average ~18 on 2 cores:
    # p50 130 ms with 1 thread, 1980 ms with 2; issue 6).
    threads: int = 1
    # The FM blocks' MLPs (most of a request's matrix work) in "fp32" (the served scores equal
    # the trainer's), "bf16" (bfloat16 matmuls: scores move by bfloat16 rounding; faster on a CPU
    # with AMX, not measured on others) or "auto" (bf16 where the CPU has AMX-BF16, else fp32). docs/serving.md, ninth pass: speed and score deviation measured.
    precision: str = "fp32"
    # Server processes on the one port (SO_REUSEPORT; `opengem serve` supervises them and
    # restarts one that dies). A model forward holds its process's GIL between ops, so one
    # process uses about one core: with N processes, N requests run at once. The kernel
    # spreads *connections*, not calls: a client's channel (one HTTP/2 connection) stays on
    # one process, so a caller needs several channels to use several processes, as many
    # callers do anyway. Metrics of all processes are summed on the supervisor's port.
    processes: int = 1
    # glibc only: keep freed memory in the heap up to this many MiB instead of handing each
    # large tensor back to the kernel (mmap / munmap and a page fault per 4 KiB on every
    # request: ~4k faults per 500-candidate GEM request); 0: the allocator's defaults.
    malloc_keep_mb: int = 256
    # Freeze the objects of start-up (imports, the first model) out of the garbage collector's
    # reach once the server is up (opengem.runtime.freeze_heap): a full collection then takes
    # 0.23-0.7 ms instead of 204-237 ms of stopped threads (measured in process).
    gc_freeze: bool = True
    # The task whose probability a candidate's bid multiplies: value = bid x P(value_task).
    value_task: str = "conversion"
    # Which model serves a surface: {surface = "gem" | "student"}; unnamed surfaces: "gem" (the
    # version in models_dir). A student is the newest version of kind "student" for that surface
    # in <students_dir>/<surface> (what `opengem train --student SURFACE` publishes), hot-swapped
    # and canary-checked like GEM; until one is published that surface answers UNAVAILABLE.
    models: dict[str, str] = field(default_factory=dict)
    # Empty: <data_dir>/students.
    students_dir: str = ""
    # Where students read GEM's user representations; empty: the store the student's version
    # names (the daemon's, <data_dir>/representations/<surface> by default).
    representations_dir: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.models, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in self.models.items()):
            problems.append(f"models={self.models!r} must be a table of surface = \"gem\" | \"student\"")
        else:
            bad = {k: v for k, v in self.models.items() if v not in MODEL_KINDS}
            if bad:
                problems.append(f"models: {bad} (each surface is served by one of {list(MODEL_KINDS)})")
        if not 0 <= self.port < 65536:
            problems.append(f"port={self.port}")
        if self.max_candidates < 1:
            problems.append(f"max_candidates={self.max_candidates}")
        if self.max_request_bytes < 1024:
            problems.append(f"max_request_bytes={self.max_request_bytes} (< 1024)")
        if self.workers < 1 or self.inference_slots < 1:
            problems.append("workers and inference_slots must be >= 1")
        if self.processes < 1:
            problems.append(f"processes={self.processes} (< 1)")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} (one of {', '.join(PRECISIONS)})")
        if self.threads < 0:
            problems.append(f"threads={self.threads} (< 0)")
        if not 0 <= self.malloc_keep_mb <= MAX_KEEP_MB:
            problems.append(f"malloc_keep_mb={self.malloc_keep_mb} (must be in [0, {MAX_KEEP_MB}]: mallopt takes a C int)")
        if self.poll_s <= 0 or self.catch_up_s <= 0 or self.timeout_s <= 0:
            problems.append("poll_s, catch_up_s and timeout_s must be > 0")
        if problems:
            raise ValueError("bad [serve] config: " + ", ".join(problems))

    def models_path(self, data_dir: str | Path) -> Path:
        return Path(self.models_dir) if self.models_dir else Path(data_dir) / "models"

    def students_path(self, data_dir: str | Path) -> Path:
        return Path(self.students_dir) if self.students_dir else Path(data_dir) / "students"

    def student_surfaces(self) -> tuple[str, ...]:
        return tuple(sorted(s for s, kind in self.models.items() if kind == "student"))
