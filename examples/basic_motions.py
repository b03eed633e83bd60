"""BasicMotions sessions for T-DPSOM's demonstration, and a k-means baseline on the same steps.

BasicMotions (UEA archive; Bagnall et al. 2018, "The UEA multivariate time series classification archive")
ships inside the `aeon` wheel: 40 + 40 smartwatch recordings of 100 steps at 10 Hz, 6 channels (3-D
accelerometer and gyroscope), one activity each (standing, walking, running, badminton). One recording has
one label, so nothing would move on the map; a session here joins three 25-step pieces (2.5 s) of recordings
of three different activities, so the activity changes twice within a session and its trajectory crosses the
map. Sessions from aeon's TRAIN recordings come first and those from its TEST recordings last, so the
reference split (first 85 % of the stays for training) tests on recordings never seen in training.

    pip install aeon
    python examples/basic_motions.py motions.npz            # writes x (800, 75, 6), y (800, 75), label_names
    python examples/basic_motions.py motions.npz --kmeans 8x8  # baselines: k-means (k = 64) per step, naive forecasts
"""
import argparse
import os
import sys
import warnings

import numpy as np
from sklearn.cluster import KMeans

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository's modules
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")   # raised inside Sacred 0.8.7
from sequence_data import split_rows  # noqa: E402
from utils import clustering_metrics  # noqa: E402

PIECES, PIECE_STEPS = 3, 25          # a session: 3 pieces of 2.5 s, each of another activity
TRAIN_SESSIONS, TEST_SESSIONS = 680, 120   # 85 % / 15 %: the reference split's test part is exactly the TEST ones
SEED = 2020


def recordings() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """aeon's BasicMotions as (N, T, D) float32 arrays with integer activities."""
    from aeon.datasets import load_basic_motions   # imported here: only building the file needs aeon
    x_train, y_train = load_basic_motions(split="train")   # (40, 6, 100)
    x_test, y_test = load_basic_motions(split="test")
    classes = sorted(str(v) for v in set(y_train))
    code = {name: i for i, name in enumerate(classes)}
    as_steps = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1), dtype=np.float32)   # (N, 100, 6)
    return (as_steps(x_train), np.array([code[v] for v in y_train]), as_steps(x_test),
            np.array([code[v] for v in y_test]), classes)


def sessions(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """n sessions, each PIECES pieces of PIECE_STEPS steps from recordings of PIECES different activities."""
    xs, ys = [], []
    for _ in range(n):
        activities = rng.choice(np.unique(y), PIECES, replace=False)
        parts = []
        for a in activities:
            r = rng.choice(np.flatnonzero(y == a))
            start = rng.randint(0, x.shape[1] - PIECE_STEPS + 1)
            parts.append(x[r, start:start + PIECE_STEPS])           # (25, 6)
        xs.append(np.concatenate(parts))                            # (75, 6)
        ys.append(np.repeat(activities, PIECE_STEPS))               # (75,)
    return np.stack(xs), np.stack(ys)


def build(path: str) -> None:
    x_train, y_train, x_test, y_test, classes = recordings()
    rng = np.random.RandomState(SEED)
    xa, ya = sessions(x_train, y_train, TRAIN_SESSIONS, rng)
    xb, yb = sessions(x_test, y_test, TEST_SESSIONS, rng)
    x, y = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    np.savez(path, x=x, y=y, label_names=np.array(["activity"]), classes=np.array(classes))
    print(f"{path}: x {x.shape}, y {y.shape}, activities {classes}; the last {TEST_SESSIONS} sessions are from "
          f"recordings no training session uses")


def kmeans_baseline(path: str, som_dim: tuple[int, int]) -> dict:
    """k-means with k = H*W on the steps' standardised features, fitted on the training sessions, scored per
    step on the test sessions (the last 15 %), with the metrics T-DPSOM reports."""
    data = np.load(path)
    x, y = data["x"], data["y"]
    n_train = int(0.85 * len(x))
    steps_train = x[:n_train].reshape(-1, x.shape[2])
    mean, std = steps_train.mean(0), steps_train.std(0)
    k = som_dim[0] * som_dim[1]
    km = KMeans(n_clusters=k, n_init=10, random_state=SEED).fit((steps_train - mean) / std)
    clusters = km.predict((x[n_train:].reshape(-1, x.shape[2]) - mean) / std)
    metrics = clustering_metrics(clusters, y[n_train:].reshape(-1), n_clusters=k)
    print(f"k-means, k = {k}, on {len(clusters)} test steps: "
          + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return metrics


def forecast_baselines(path: str, steps: int = 6) -> dict:
    """MSE of naive forecasts of the test sessions' last `steps` steps, in tdpsom.py's units (standardised with
    the training sessions' statistics, as its default normalize="standard"), to read its pred_xhat beside:
    persistence (the last step seen, repeated), the mean of the steps seen, and the training mean (0)."""
    data = np.load(path)
    x = data["x"].astype(np.float64)
    train, test = split_rows(len(x), validation=False)
    steps_train = x[train].reshape(-1, x.shape[2])
    x = (x[test] - steps_train.mean(0)) / steps_train.std(0)                 # (n, T, D)
    seen, future = x[:, :-steps], x[:, -steps:]
    metrics = {"persistence": float(((future - seen[:, -1:]) ** 2).mean()),
               "stay_mean": float(((future - seen.mean(1, keepdims=True)) ** 2).mean()),
               "training_mean": float((future ** 2).mean())}
    print(f"forecast of the last {steps} steps of {len(x)} test sessions, MSE: "
          + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the .npz to write (or, with --kmeans, to read)")
    parser.add_argument("--kmeans", metavar="HxW", help="score the baselines instead: k-means with k = H*W, naive "
                        "forecasts")
    args = parser.parse_args()
    if args.kmeans:
        kmeans_baseline(args.path, tuple(int(v) for v in args.kmeans.lower().split("x")))
        forecast_baselines(args.path)
    else:
        build(args.path)
