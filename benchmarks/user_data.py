"""Your own data at size: the memory of loading a large .npz, and the joint step on vectors against a bare step.

    python benchmarks/user_data.py [--rows 1000000] [--width 100]

1. A child process writes a float32 .npz of rows x width uniform values (400 MB at the defaults), then loads it
   as a run does (user_data.load_user_data: split 85/15, normalize="minmax", validation split) and puts both
   splits into tensors. Its peak RSS above the interpreter's, as a multiple of the array's size (goal: at most
   2.5, the model aside).
2. bench.bench_arch on 51,000 synthetic vectors of that width, dense model, default config: each phase's step
   as a ratio to a bare encoder/decoder step of the same networks (goal for the joint step: at most 1.15, as for
   MNIST).
The last line of stdout is one JSON object.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

import bench
import dpsom
from user_data import load_user_data

RSS_RATIO_TARGET = 2.5
JOINT_TARGET = bench.CPU_TARGETS["joint"]


def load_child(path: str) -> None:
    """Peak RSS of loading `path` as a run does, above what the interpreter held before."""
    before = bench.peak_rss_mb(reset=True)
    data = load_user_data(path, True, "bernoulli", "minmax")
    tensors = [torch.as_tensor(data[k]) for k in ("x_train", "x_eval")]    # what train() makes of them
    assert all(t.data_ptr() == data[k].ctypes.data for t, k in zip(tensors, ("x_train", "x_eval")))  # no copy
    print(json.dumps({"baseline_mb": before, "peak_rss_mb": bench.peak_rss_mb(),
                      "rows": len(data["x_train"]) + len(data["x_eval"])}))


def load_memory(rows: int, width: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "big.npz")
        x = np.random.default_rng(0).random((rows, width), dtype=np.float32)
        np.savez(path, x=x)
        array_mb = x.nbytes / 2 ** 20
        del x
        t = time.perf_counter()
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--load-child", path], check=True,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t
    r = json.loads(done.stdout.splitlines()[-1])
    ratio = (r["peak_rss_mb"] - r["baseline_mb"]) / array_mb
    return {**r, "array_mb": array_mb, "ratio_to_array": ratio, "target": RSS_RATIO_TARGET,
            "ok": ratio <= RSS_RATIO_TARGET, "child_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--load-child", metavar="NPZ", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_child:
        return load_child(args.load_child)
    memory = load_memory(args.rows, args.width)
    print(f"loading a {args.rows} x {args.width} float32 .npz ({memory['array_mb']:.0f} MB): peak RSS "
          f"{memory['peak_rss_mb']:.0f} MB, {memory['peak_rss_mb'] - memory['baseline_mb']:.0f} MB above the "
          f"interpreter's {memory['baseline_mb']:.0f} MB = {memory['ratio_to_array']:.2f} x the array "
          f"(target {RSS_RATIO_TARGET}: {'yes' if memory['ok'] else 'NO'})", flush=True)
    device = dpsom.pick_device(args.device)
    rng = np.random.default_rng(0)
    data = {"x_train": rng.random((bench.N_TRAIN, args.width), dtype=np.float32),
            "y_train": rng.integers(0, 10, bench.N_TRAIN),
            "x_eval": rng.random((bench.N_EVAL, args.width), dtype=np.float32), "y_eval": rng.integers(0, 10, bench.N_EVAL)}
    steps = bench.bench_arch(False, data, device, 20, budget_s=30, input_shape=(args.width,))
    for name in bench.PHASES:
        print(f"vectors of {args.width}: {name:9} {steps[name]['samples_per_s']:8.0f} samples/s, "
              f"{steps[name]['ratio_to_bare']:.3f} x a bare step"
              + (f" (target {JOINT_TARGET}: {'yes' if steps[name]['ratio_to_bare'] <= JOINT_TARGET else 'NO'})"
                 if name == "joint" else ""))
    print(json.dumps({"load": memory, "vectors": steps, "device": str(device), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
