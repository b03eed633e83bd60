"""Runs per hour on one GPU: short `quick` runs one at a time against 4 and 8 packed on it by sweep.py.

    python benchmarks/sweep_packing.py --data-dir data [--packs 1,4,8] [--out FOLDER] [WORDS ...]
    python benchmarks/sweep_packing.py --device cpu --packs 1,2 max_train_samples=600 ...   # a rehearsal

For each pack size n, `python sweep.py OUT/pack<n> --seeds n --gpus-per-run 1/n with WORDS`: Ray starts all n
runs at once on the one GPU, each a dpsom.py process of its own (the sweep gives each run its device). Reports
each pack's wall time (Ray's start and every run's start-up included), its runs per hour, the speed-up over
one run at a time, and how many of its runs finished (status `done` in its results.csv). WORDS default to
`quick num_epochs=4`: a run long enough that start-up does not dominate, short enough for a lent GPU.
With --device cpu the packs run on the CPU, one core a run. A pack folder that exists is reused: the sweep
skips its finished runs, so a rerun reports a rerun's time; --out with a fresh folder measures again.
A stage of benchmarks/gpu_check.sh; needs Ray. The last line of stdout is one JSON object; the exit status is
1 when a pack did not finish every run.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--packs", default="1,4,8", help="how many runs share the GPU, one sweep each")
    ap.add_argument("--out", help="keep the sweeps here (default: a temporary folder)")
    ap.add_argument("words", nargs="*", help="`with` words for every run (default: quick num_epochs=4)")
    args = ap.parse_args()
    words = [*(args.words or ["quick", "num_epochs=4"]), f"data_dir={os.path.abspath(args.data_dir)}"]
    result, complete = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.packs.split(",")):
            out = os.path.join(args.out or tmp, f"pack{n}")
            share = (["--gpus-per-run", str(1 / n), "--cpus-per-run", str(max(1, (os.cpu_count() or 1) // n))]
                     if args.device == "cuda" else ["--cpus-per-run", "1"])
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "sweep.py", out, "--seeds", str(n), *share, "with", *words],
                                  cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            table = os.path.join(out, "results.csv")
            statuses = [row["status"] for row in csv.DictReader(open(table))] if os.path.exists(table) else []
            result[n] = {"seconds": seconds, "runs_per_hour": n * 3600 / seconds, "exit": done.returncode,
                         "completed": statuses.count("done")}
            complete &= result[n]["completed"] == n
            if result[n]["completed"] < n:
                print(f"pack of {n}: sweep exit {done.returncode}; its last words:\n{done.stderr[-1500:]}",
                      file=sys.stderr)
            alone = result[min(result)]["seconds"] / min(result)
            print(f"{n} run(s) on one {'GPU' if args.device == 'cuda' else 'CPU'}: {seconds:.0f} s, "
                  f"{result[n]['runs_per_hour']:.1f} runs/h, {alone * n / seconds:.2f} x one at a time; "
                  f"{result[n]['completed']} of {n} completed", flush=True)
    print(json.dumps({"packs": result, "words": words, "device": args.device}))
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
