"""Simulator → embedded broker throughput, against kafka-python's raw producer.

Baseline (same run, same broker, same producer settings): kafka-python's
KafkaProducer sending pre-built JSON records (values and keys encoded before
the clock starts) — the ceiling of the per-event JSON path, since opengem's
producer is that client plus event generation and encoding. Also reported as
context: the raw producer with kafka-python's default linger/batch settings,
and opengem's columnar (Arrow) path, which is not bounded by per-record cost.

JSON keys: events_per_s, raw_producer_events_per_s, ratio (the issue's), and
raw_default_events_per_s, arrow_events_per_s, arrow_ratio_to_raw (context).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parser, table, write  # noqa: E402

from opengem.stream.broker import EmbeddedBroker, ensure_topics, high_watermarks  # noqa: E402
from opengem.stream.producer import EventProducer, user_key  # noqa: E402
from opengem.stream.simulator import SimConfig, Simulator  # noqa: E402

PARTITIONS = 4


def fresh_topic(b: EmbeddedBroker, name: str) -> str:
    ensure_topics(b.bootstrap, [name], PARTITIONS)
    return name


def raw_producer(b: EmbeddedBroker, records: list[tuple[bytes, bytes]], topic: str, **settings) -> float:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=b.bootstrap, **settings)
    # Metadata warm-up outside the clock.
    p.partitions_for(topic)
    t0 = time.perf_counter()
    send = p.send
    for k, v in records:
        send(topic, key=k, value=v)
    p.flush()
    dt = time.perf_counter() - t0
    p.close()
    return len(records) / dt


def opengem_producer(b: EmbeddedBroker, sim_cfg: SimConfig, n: int, topic: str, fmt: str) -> tuple[float, int]:
    sim = Simulator(sim_cfg)
    prod = EventProducer(b.bootstrap, topic, fmt=fmt)
    prod.partitions()
    t0 = time.perf_counter()
    if fmt == "arrow":
        for batch in sim.record_batches(n, batch_size=4096):
            prod.send_batch(batch)
    else:
        for batch in sim.batches(n, batch_size=4096):
            prod.send(batch)
    prod.flush()
    dt = time.perf_counter() - t0
    prod.close()
    return prod.events_sent / dt, prod.events_sent


def main() -> None:
    ap = parser("produce", __doc__)
    ap.add_argument("--events", type=int, default=0, help="events per measurement (default 300k, quick 60k)")
    ap.add_argument("--repeats", type=int, default=0, help="alternating repeats (default 3, quick 2); best is kept")
    args = ap.parse_args()
    n = args.events or (60_000 if args.quick else 300_000)
    repeats = args.repeats or (2 if args.quick else 3)
    sim_cfg = SimConfig(seed=1)
    tuned = {"linger_ms": 20, "batch_size": 262_144}

    print(f"building {n:,} baseline records from the simulator (outside the clock)…", flush=True)
    records = [(user_key(e.user_id), e.to_json()) for batch in Simulator(sim_cfg).batches(n) for e in batch]
    n = len(records)

    results: dict[str, list[float]] = {"raw": [], "raw_default": [], "opengem_json": [], "opengem_arrow": []}
    with EmbeddedBroker(port=0) as b:
        for r in range(repeats):
            # Alternate the methods so drift on the shared machine hits all of them.
            t = fresh_topic(b, f"bench.raw.{r}")
            results["raw"].append(raw_producer(b, records, t, **tuned))
            t = fresh_topic(b, f"bench.json.{r}")
            eps, sent = opengem_producer(b, sim_cfg, n, t, "json")
            results["opengem_json"].append(eps)
            hw = high_watermarks(b.bootstrap, t)
            assert sum(hw.values()) == sent, f"broker holds {sum(hw.values())} records, sent {sent}"
            t = fresh_topic(b, f"bench.arrow.{r}")
            results["opengem_arrow"].append(opengem_producer(b, sim_cfg, n, t, "arrow")[0])
            t = fresh_topic(b, f"bench.default.{r}")
            results["raw_default"].append(raw_producer(b, records, t))
            print(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items()),
                  flush=True)

    best = {k: max(v) for k, v in results.items()}
    figures = {
        "events_per_s": best["opengem_json"],
        "raw_producer_events_per_s": best["raw"],
        "ratio": best["opengem_json"] / best["raw"],
        "raw_default_events_per_s": best["raw_default"],
        "arrow_events_per_s": best["opengem_arrow"],
        "arrow_ratio_to_raw": best["opengem_arrow"] / best["raw"],
        "runs": results,
    }
    rows = [
        ("kafka-python raw, pre-built JSON (baseline)", best["raw"], 1.0),
        ("kafka-python raw, client defaults", best["raw_default"], best["raw_default"] / best["raw"]),
        ("opengem simulate → JSON per event", best["opengem_json"], figures["ratio"]),
        ("opengem simulate → Arrow batch per partition", best["opengem_arrow"], figures["arrow_ratio_to_raw"]),
    ]
    print()
    print(table(rows, ["path", "events/s", "ratio to baseline"]))
    write(args.out, "produce", {"events": n, "repeats": repeats, "partitions": PARTITIONS,
                                "producer": tuned, "sim_seed": sim_cfg.seed}, figures)


if __name__ == "__main__":
    main()
