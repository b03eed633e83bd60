"""What sweep.py costs over running the same dpsom.py runs one after another, as a shell loop would.

    python benchmarks/sweep_overhead.py --data-dir ../shared/data [--runs 4] [--samples 6000] [--epochs 2]

Both arms run the same runs (seeds 2020, 2021, ...), one at a time with every core: the loop as plain
`python dpsom.py` processes, the sweep with --cpus-per-run set to the core count, so that Ray runs them one
after another too. The arms alternate (loop, sweep, sweep, loop) so that a drift of the machine's speed
falls on both. Reports each arm's wall time and the ratio sweep / loop (goal: at most 1.05), Ray's start
included. The last line of stdout is one JSON object. Ray here must stay on 127.0.0.1: run it with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 where that applies.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--runs", type=int, default=4, help="runs per arm")
    ap.add_argument("--samples", type=int, default=6000, help="training images per run (max_train_samples)")
    ap.add_argument("--epochs", type=int, default=2, help="joint epochs per run (1 pretraining, 2 SOM epochs)")
    args = ap.parse_args()
    cores = os.cpu_count()
    words = [f"max_train_samples={args.samples}", "epochs_pretrain=1", "som_epochs=1", "som_learning_rates=[0.9,0.1]",
             f"num_epochs={args.epochs}", "validation=True", f"data_dir={os.path.abspath(args.data_dir)}", "device=cpu"]
    seeds = list(range(2020, 2020 + args.runs))
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}
    times = {"loop": [], "sweep": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, arm in enumerate(["loop", "sweep", "sweep", "loop"]):
            out = os.path.join(tmp, f"{arm}{i}")
            start = time.perf_counter()
            if arm == "loop":
                for seed in seeds:
                    subprocess.run([sys.executable, "dpsom.py", "with", *words, f"seed={seed}",
                                    f"logdir={os.path.join(out, str(seed))}"], cwd=ROOT, env=env, check=True,
                                   capture_output=True)
            else:
                subprocess.run([sys.executable, "sweep.py", out, "--seeds", str(args.runs),
                                "--cpus-per-run", str(cores), "with", *words], cwd=ROOT, env=env, check=True,
                               capture_output=True)
            times[arm].append(time.perf_counter() - start)
            print(f"{arm}: {times[arm][-1]:.1f} s for {args.runs} runs", file=sys.stderr)
    loop, sweep = sum(times["loop"]) / 2, sum(times["sweep"]) / 2
    print(f"{args.runs} runs of {args.samples} images, {cores} cores: loop {loop:.1f} s, sweep {sweep:.1f} s, "
          f"ratio {sweep / loop:.3f} (goal <= 1.05)")
    print(json.dumps({"runs": args.runs, "cores": cores, "loop_s": loop, "sweep_s": sweep, "ratio": sweep / loop,
                      "load_avg": os.getloadavg()[:2]}))


if __name__ == "__main__":
    main()
