"""MonitorConfig: the ``[monitor]`` table of the opengem TOML file.

Kept free of torch / Kafka imports so that ``opengem.config`` can compose it
without loading the monitor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MonitorConfig:
    # Prometheus metrics on 127.0.0.1:metrics_port/metrics; -1: off
    # (9101 stream worker, 9102 trainer, 9103 server, 9104 monitor).
    metrics_port: int = 9104
    # Consumer group of the monitor on opengem.examples (its committed offsets are where a
    # restarted monitor resumes, and what the lag collector reports for it).
    group_id: str = "opengem-monitor"
    # Where a monitor without committed offsets starts: "latest" (a live system: score what
    # comes from now on) or "earliest" (a fresh topic, e.g. the embedded broker of the demo).
    start: str = "latest"
    # Examples per (surface, task) in the sliding window of the quality figures. 50k
    # impressions hold ~1k clicks at a 2% CTR: NE and AUC move by about a percent between
    # windows, which is what the alert thresholds are built for.
    window: int = 50_000
    # A newly served version replaces the previous one's figures once its own window holds
    # this many examples; until then the previous version's figures stay exported.
    min_examples: int = 2_000
    # Fraction of the examples scored (a hash of the request id decides, so the same examples
    # are picked on every replica and re-send). The funnel counters count every example;
    # scoring costs one forward pass per example, which a busy machine may not afford.
    score_fraction: float = 1.0
    # Examples per scoring batch (one store read + one forward pass).
    batch_size: int = 512
    # Seconds between recomputations of the windowed figures (O(window log window) each).
    report_interval_s: float = 5.0
    # Seconds between consumer-lag collections (high watermarks + committed offsets).
    lag_interval_s: float = 10.0
    # Consumer groups whose lag is exported; empty: every group with offsets committed on
    # the opengem topics.
    lag_groups: tuple[str, ...] = ()
    # Recent example ids kept to drop the stream worker's re-sends (at-least-once delivery).
    dedup_window: int = 500_000

    def __post_init__(self) -> None:
        problems = []
        if self.start not in ("latest", "earliest"):
            problems.append(f"start={self.start!r} (latest | earliest)")
        if not 0.0 < self.score_fraction <= 1.0:
            problems.append(f"score_fraction={self.score_fraction} (0 < f <= 1)")
        if self.window < 1 or self.min_examples < 1 or self.batch_size < 1 or self.dedup_window < 0:
            problems.append("window, min_examples and batch_size must be >= 1, dedup_window >= 0")
        if self.report_interval_s <= 0 or self.lag_interval_s <= 0:
            problems.append("report_interval_s and lag_interval_s must be > 0")
        if problems:
            raise ValueError("bad [monitor] config: " + ", ".join(problems))
