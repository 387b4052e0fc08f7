"""Online learning under an abrupt interest shift: progressive NE recovers; a frozen model does not.

The simulator (``SimConfig.interest_shift_at_s``) draws every user's interests
anew at time T, halfway through the stream. Events go through the embedded
broker and the real stream worker (shards + labelled examples); then, in this
process, the trainer's own step (:class:`opengem.model.trainer.OnlineLearner`,
predict-then-train on point-in-time batches from the shards) runs over the
examples in impression-time order. At T a copy of the model is frozen and
scores every later batch without training.

Figures (click task; NE = log loss / entropy of the window's CTR, windows of
``--window`` examples):

* ``pre_drift_ne``: progressive NE of the last window before T;
* ``online_ne_after`` / ``frozen_ne_after``: per window after T;
* ``recovered_after_examples``: examples after T until a window's progressive
  NE is within 2 % of ``pre_drift_ne`` (None: not within the run);
* ``frozen_within_2pct``: whether any frozen window got there;
* ``oracle_ne_*``: NE of the simulator's true probabilities on the same
  windows (the attainable floor; the shift changes it too).

The frozen model also misses the ads created after T (the simulator keeps
creating ads), so part of its gap is cold start, not the interest shift alone.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _pipeline import Pipeline, produce  # noqa: E402


def main() -> None:
    ap = _common.parser("drift", __doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--window", type=int, default=0, help="examples per NE window (default 5k quick / 10k full)")
    args = ap.parse_args()
    import torch

    from opengem.features.sharded import ShardedReader
    from opengem.model.data import examples_batch
    from opengem.model.distributed import init_distributed
    from opengem.model.metrics import ne
    from opengem.model.train_config import TrainConfig
    from opengem.model.trainer import OnlineLearner, model_config, quiet_torchrec
    from opengem.stream.simulator import SimConfig, Simulator

    quiet_torchrec()
    n_events = 300_000 if args.quick else 900_000
    window = args.window or (5_000 if args.quick else 10_000)
    eps = 100.0
    shift_s = n_events / eps / 2
    sim_cfg = SimConfig(n_users=5_000, events_per_second=eps, interest_shift_at_s=shift_s)
    tcfg = TrainConfig(preset=args.preset)
    torch.set_num_threads(tcfg.threads)
    work = Path(tempfile.mkdtemp(prefix="opengem-bench-drift-"))
    pipe = Pipeline(work / "data", click_window_s=60, conversion_window_s=600).start()
    try:
        sim = Simulator(sim_cfg)
        t0 = time.monotonic()
        produce(pipe.bootstrap, sim, n_events)
        pipe.wait_settled()
        examples = sorted(pipe.read_examples(), key=lambda e: e.ts)
        # The stream's last conversion window (600 s) holds only the impressions that closed without
        # a click (clicked ones still wait): drop it, or the last windows have no positives.
        examples = [e for e in examples if e.ts <= examples[-1].ts - 600_000]
        print(f"{n_events:,} events -> {len(examples):,} examples ({time.monotonic() - t0:.0f}s); "
              f"interests shifted at event time +{(sim.shifted_at_ms - sim_cfg.start_ts_ms) / 1000:.0f}s", flush=True)
        T = sim.shifted_at_ms
        info = init_distributed("cpu")
        mcfg = model_config(tcfg, pipe.cfg.surfaces)
        online = OnlineLearner("gem", mcfg, tcfg, info)
        frozen = None
        reader = ShardedReader(pipe.data_dir, pipe.partitions, secondary_root=work / "reader")
        reader.catch_up()
        B = tcfg.batch_size
        p_on, p_fr, ys, truth = [], [], [], []
        before = [e for e in examples if e.ts < T]
        after = [e for e in examples if e.ts >= T]
        t1 = time.monotonic()
        for phase in (before, after):
            if phase is after:  # freeze a copy at T: it scores everything later, never trains
                frozen = OnlineLearner("gem", mcfg, tcfg, info)
                frozen.load_state(online.state())
            for i in range(0, len(phase), B):
                chunk = phase[i:i + B]
                batch = examples_batch(chunk, reader, mcfg)
                if frozen is not None:
                    p_fr.append(frozen.predict(batch)[:, 0].numpy())
                p_on.append(online.step(batch, torch.ones(len(chunk)))[:, 0].numpy())
                ys.append(batch.labels[:, 0].numpy())
                truth.append(np.array([e.p_click for e in chunk], np.float64))
                done = sum(len(x) for x in ys)
                if (done // B) % 50 == 0:
                    print(f"  {done:,}/{len(examples):,} examples ({done / (time.monotonic() - t1):,.0f}/s)",
                          flush=True)
        reader.close()
    finally:
        pipe.stop()
        shutil.rmtree(work, ignore_errors=True)
    p_on_a, y, tr = map(np.concatenate, (p_on, ys, truth))
    n_pre = len(before)
    pre_ne = ne(p_on_a[:n_pre][-window:], y[:n_pre][-window:])
    oracle_pre = ne(tr[:n_pre][-window:], y[:n_pre][-window:])
    p_fr_a = np.concatenate(p_fr)
    post_on, post_y, post_tr = p_on_a[n_pre:], y[n_pre:], tr[n_pre:]
    rows, online_after, frozen_after, oracle_after = [], [], [], []
    recovered = None
    frozen_ok = False
    for k in range(0, len(post_y) - window + 1, window):
        s = slice(k, k + window)
        a, f, o = ne(post_on[s], post_y[s]), ne(p_fr_a[s], post_y[s]), ne(post_tr[s], post_y[s])
        online_after.append(a)
        frozen_after.append(f)
        oracle_after.append(o)
        if recovered is None and a <= 1.02 * pre_ne:
            recovered = k + window
        frozen_ok = frozen_ok or f <= 1.02 * pre_ne
        rows.append([f"after T: examples {k:,}-{k + window:,}", a, f, o])
    table = [["before T (last window)", pre_ne, pre_ne, oracle_pre]] + rows
    print(_common.table(table, ["window", "online NE", "frozen NE", "oracle NE"]))
    print(f"online recovered to within 2% of pre-drift NE after {recovered} examples; frozen within 2%: {frozen_ok}")
    _common.write(args.out, "drift", {"preset": args.preset, "events": n_events, "window": window,
                                      "sim": {"n_users": sim_cfg.n_users, "events_per_second": eps,
                                              "interest_shift_at_s": shift_s},
                                      "batch_size": tcfg.batch_size, "threads": tcfg.threads},
                  {"pre_drift_ne": pre_ne, "oracle_ne_pre": oracle_pre, "online_ne_after": online_after,
                   "frozen_ne_after": frozen_after, "oracle_ne_after": oracle_after,
                   "recovered_after_examples": recovered, "frozen_within_2pct": frozen_ok,
                   "examples_before": n_pre, "examples_after": int(len(post_y))})


if __name__ == "__main__":
    main()
