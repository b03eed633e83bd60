"""The demonstration's sessions (examples/basic_motions.py), on stand-in recordings: aeon is not needed here."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import basic_motions as bm  # noqa: E402


def test_each_session_joins_pieces_of_distinct_activities_from_their_own_recordings():
    rng = np.random.RandomState(0)
    y = np.repeat(np.arange(4), 5)                                  # 20 recordings, 4 activities
    # each recording's values encode (recording, step) so a piece can be traced back to where it was cut
    x = (np.arange(20)[:, None, None] * 1000 + np.arange(100)[None, :, None]).astype(np.float32)
    x = np.repeat(x, 6, axis=2)                                     # (20, 100, 6)
    xs, ys = bm.sessions(x, y, 50, rng)
    assert xs.shape == (50, bm.PIECES * bm.PIECE_STEPS, 6) and ys.shape == (50, bm.PIECES * bm.PIECE_STEPS)
    for s in range(50):
        pieces = ys[s].reshape(bm.PIECES, bm.PIECE_STEPS)
        assert (pieces == pieces[:, :1]).all() and len(set(pieces[:, 0])) == bm.PIECES
        for k in range(bm.PIECES):
            part = xs[s, k * bm.PIECE_STEPS:(k + 1) * bm.PIECE_STEPS, 0]
            recording, start = divmod(int(part[0]), 1000)
            assert y[recording] == pieces[k, 0]                     # the label is the recording's activity
            assert np.array_equal(part, recording * 1000 + np.arange(start, start + bm.PIECE_STEPS))


def test_the_split_puts_the_test_recordings_last():
    assert bm.TRAIN_SESSIONS == int(0.85 * (bm.TRAIN_SESSIONS + bm.TEST_SESSIONS))


def test_forecast_baselines_by_hand(tmp_path):
    """Stays of 8 steps whose one feature is its step index: after standardising with the training steps (mean 3.5,
    std sqrt(5.25)), persistence misses the last 6 steps by 1..6 steps."""
    x = np.tile(np.arange(8.0), (20, 1))[..., None]                 # (20, 8, 1)
    np.savez(tmp_path / "s.npz", x=x, y=np.zeros((20, 8)))
    got = bm.forecast_baselines(str(tmp_path / "s.npz"), steps=6)
    var = 5.25
    assert np.isclose(got["persistence"], np.mean(np.arange(1, 7) ** 2) / var)
    assert np.isclose(got["stay_mean"], np.mean((np.arange(2, 8) - 0.5) ** 2) / var)
    assert np.isclose(got["training_mean"], np.mean((np.arange(2, 8) - 3.5) ** 2) / var)
