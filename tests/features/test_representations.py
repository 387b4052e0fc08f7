"""The representation store: point-in-time reads, keep-K, idempotent refreshes, a secondary reader,
and the refresher writing GEM's user-side representations read back by a student."""

from __future__ import annotations

import numpy as np
import pytest

from opengem.features.representations import RepresentationStore


def test_reads_are_point_in_time_and_keep_the_last_k(tmp_path):
    with RepresentationStore(tmp_path / "r", dim=3, keep=2) as st:
        st.put([1, 2], np.array([[1, 1, 1], [2, 2, 2]]), ts_ms=100, version=1)
        st.put([1], np.array([[5, 5, 5]]), ts_ms=200, version=2)
        st.put([1], np.array([[7, 7, 7]]), ts_ms=300, version=3)
        v, p = st.get([1, 1, 1, 1, 2, 2, 3], [101, 200, 201, 301, 100, 101, 10**12])
        assert p.tolist() == [False, False, True, True, False, True, False]
        # 101: entry 100 was dropped (keep=2) -> absent, never a newer vector; 200: strictly before
        assert v[2].tolist() == [5, 5, 5] and v[3].tolist() == [7, 7, 7] and v[5].tolist() == [2, 2, 2]
        assert not v[[0, 1, 4, 6]].any()
        # a replayed refresh replaces, never duplicates
        st.put([1], np.array([[9, 9, 9]]), ts_ms=300, version=4)
        v, p = st.get([1, 1], [301, 250])
        assert v[0].tolist() == [9, 9, 9] and v[1].tolist() == [5, 5, 5]


def test_dim_is_checked_and_bad_vectors_refused(tmp_path):
    RepresentationStore(tmp_path / "r", dim=4).close()
    with pytest.raises(ValueError, match="4-wide"):
        RepresentationStore(tmp_path / "r", dim=5)
    with RepresentationStore(tmp_path / "r", dim=4) as st:
        with pytest.raises(ValueError, match="expected"):
            st.put([1], np.zeros((1, 3)), 1, 1)
        with pytest.raises(ValueError, match="finite"):
            st.put([1], np.full((1, 4), np.nan), 1, 1)
        with pytest.raises(ValueError, match="one per user"):
            st.get([1, 2, 3], [5, 6])


def test_a_secondary_reader_catches_up(tmp_path):
    w = RepresentationStore(tmp_path / "r", dim=2)
    w.put([7], np.array([[0.5, -0.25]]), ts_ms=10, version=1)
    r = RepresentationStore(tmp_path / "r", dim=2, secondary_dir=tmp_path / "sec")
    try:
        assert r.get([7], 11)[1].tolist() == [True]
        w.put([8], np.array([[1.0, 2.0]]), ts_ms=20, version=2)
        assert r.get([8], 21)[1].tolist() == [False]
        assert r.catch_up()
        v, p = r.get([8], 21)
        assert p.tolist() == [True] and v[0].tolist() == [1.0, 2.0]
        assert not r.catch_up()  # nothing written since: skipped (it would hold the GIL for nothing)
        w.put([8], np.array([[3.0, 4.0]]), ts_ms=30, version=3)
        assert r.catch_up()
        assert r.get([8], 31)[0][0].tolist() == [3.0, 4.0]
        with pytest.raises(PermissionError):
            r.put([1], np.zeros((1, 2)), 1, 1)
    finally:
        r.close()
        w.close()


def test_refresher_writes_gems_user_representation_that_students_read(tmp_path):
    import torch

    from opengem.features.memory import MemorySequenceStore
    from opengem.model.config import preset
    from opengem.model.data import examples_batch
    from opengem.model.gem import GemModel
    from opengem.model.student import (StudentConfig, StudentModel, refresh_representations, representation_dim,
                                       student_inputs, teacher_user_representation)
    from opengem.stream.simulator import SimConfig, Simulator
    from opengem.stream.joiner import Example

    cfg = preset("tiny")
    events = list(Simulator(SimConfig(seed=3, n_users=40)).events(3000))
    store = MemorySequenceStore()
    store.apply(events, (0, 0))
    imps = [e for e in events if e.kind == "impression"][:200]
    exs = [Example(request_id=e.request_id, ts=e.ts, surface=e.surface, user_id=e.user_id, item_id=e.item_id,
                   advertiser_id=e.advertiser_id, ad_format=e.ad_format, category=e.category,
                   age_bucket=e.age_bucket, country=e.country, device=e.device, hour=e.hour, click=0,
                   conversion=0, click_ts=None, conversion_ts=None) for e in imps]
    torch.manual_seed(0)
    teacher = GemModel(cfg)
    R = representation_dim(teacher)
    now = max(e.ts for e in exs) + 1
    with RepresentationStore(tmp_path / "r", dim=R) as rs:
        n = refresh_representations(teacher, exs, store, rs, now_ms=now, version=1)
        assert n == len({e.user_id for e in exs})
        # what was stored is the teacher's representation of the user's history before `now`
        u = exs[-1]
        import dataclasses

        want = teacher_user_representation(teacher, examples_batch([dataclasses.replace(u, ts=now)], store, cfg))
        got, present = rs.get([u.user_id], now + 1)
        assert present.all()
        np.testing.assert_allclose(got[0], want[0].numpy(), rtol=2e-3, atol=2e-3)  # float16
        # impressions before the refresh see nothing (point in time)
        b = examples_batch(exs, store, cfg)
        si = student_inputs(b, [e.user_id for e in exs], [e.ts for e in exs], rs)
        assert not si.has_reps.any()
        si2 = student_inputs(b, [e.user_id for e in exs], [now + 1] * len(exs), rs)
        assert si2.has_reps.all()
        st = StudentModel(StudentConfig(features=cfg.features, d=cfg.d, history=8, hidden=(8,), repr_dim=R))
        assert not torch.equal(st.predict(si), st.predict(si2))  # the student reads them
