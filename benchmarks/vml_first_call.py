"""How often a fresh process's first exp on two threads is computed with a low-accuracy kernel, with and without
fast_ops.resolve_vml_kernels (what importing fast_ops runs).

    python benchmarks/vml_first_call.py [--processes 150] [--threads 2]

Each process computes exp of the posterior's logvar as the diagonal model first meets it: a (300, 100) view
with a row stride of 200 (the head's output split in two), seeded, as its first VML call. The result counts
as wrong where any element is more than 1e-6 relative from float64's exp (float32's accurate kernel is within
1 ulp, 6e-8). The two arms alternate process by process, so that the machine's state falls on both alike.
oneMKL's race (pytorch/pytorch#188792) needs at least two threads. The last line of stdout is one JSON object.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import sys, torch
if sys.argv[1] == "resolved":
    sys.path.insert(0, sys.argv[3])
    import fast_ops  # noqa: F401  (resolves the VML kernels at import)
torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
head = torch.randn(300, 200)
first = torch.exp(head[:, 100:])
exact = torch.exp(head[:, 100:].double())
err = ((first.double() - exact).abs() / exact).max().item()
print(err)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=150, help="fresh processes per arm")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of each process")
    args = ap.parse_args()
    wrong = {"plain": 0, "resolved": 0}
    worst = {"plain": 0.0, "resolved": 0.0}
    for i in range(args.processes):
        for arm in ("plain", "resolved") if i % 2 == 0 else ("resolved", "plain"):
            out = subprocess.run([sys.executable, "-c", CHILD, arm, str(args.threads), ROOT], capture_output=True,
                                 text=True, check=True)
            err = float(out.stdout.split()[-1])
            wrong[arm] += err > 1e-6
            worst[arm] = max(worst[arm], err)
    for arm in wrong:
        print(f"{arm:9s} {wrong[arm]:4d} of {args.processes} first calls wrong, worst relative error {worst[arm]:.2e}")
    print(json.dumps({"processes": args.processes, "threads": args.threads, "wrong": wrong, "worst": worst}))


if __name__ == "__main__":
    main()
