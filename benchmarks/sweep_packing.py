"""Runs per hour on one GPU: one `quick` run alone against 4 and 8 packed on it by sweep.py.

    python benchmarks/sweep_packing.py --data-dir ../shared/data [--packs 1,4,8] [WITH WORDS ...]

For each pack size n, `python sweep.py OUT --seeds n --gpus-per-run 1/n with quick device=cuda ...`: Ray
starts all n runs at once on the one GPU, each a dpsom.py process of its own. Reports each pack's wall time
(Ray's start and every run's start-up included), its runs per hour and the speed-up over running them one at
a time, and that every run finished. A stage of benchmarks/gpu_check.sh; needs a GPU and Ray.
The last line of stdout is one JSON object.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--packs", default="1,4,8", help="how many runs share the GPU, one sweep each")
    ap.add_argument("--out", help="keep the sweeps here (default: a temporary folder)")
    ap.add_argument("words", nargs="*", help="more `with` words for every run (default: quick)")
    args = ap.parse_args()
    words = ["quick", "device=cuda", f"data_dir={os.path.abspath(args.data_dir)}", *args.words]
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.packs.split(",")):
            out = os.path.join(args.out or tmp, f"pack{n}")
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "sweep.py", out, "--seeds", str(n), "--gpus-per-run", str(1 / n),
                                   "--cpus-per-run", str(max(1, (os.cpu_count() or 1) // n)), "with", *words],
                                  cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            with open(os.path.join(out, "results.csv")) as f:
                statuses = [row["status"] for row in csv.DictReader(f)]
            result[n] = {"seconds": seconds, "runs_per_hour": n * 3600 / seconds, "exit": done.returncode,
                         "completed": statuses.count("COMPLETED")}
            alone = result[min(result)]["seconds"] / min(result)
            print(f"{n} run(s) on one GPU: {seconds:.0f} s, {result[n]['runs_per_hour']:.1f} runs/h, "
                  f"{alone * n / seconds:.2f} x one at a time; {result[n]['completed']} of {n} completed",
                  flush=True)
    print(json.dumps({"packs": result, "words": words}))


if __name__ == "__main__":
    main()
