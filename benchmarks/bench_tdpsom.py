"""Speed of T-DPSOM's phases at the reference's eICU size, and the time of a whole default run.

    python benchmarks/bench_tdpsom.py                   # B = 300 stays of 72 steps x 98 features, a 16x16 map
    python benchmarks/bench_tdpsom.py --stays 10000 --rounds 3

Each op of the plan (pretrain, som_init, joint, prediction: one optimiser step each, as plan_runner.train_step
runs it) is timed beside a bare step, the VAE's forward + backward + Adam on its Gaussian likelihood alone (no SOM,
no KL, no LSTM), and reported as a ratio to it: on a shared machine seconds drift, ratios of adjacent timings much
less. The target distribution over the training stays (once per joint epoch) and the evaluation pass with its
forecast are reported per stay, as a share of one joint epoch.

The full-run estimate: the reference's defaults (50 pretraining, 48 SOM, 100 joint epochs of two ops, 50 fine-tuning
epochs) on an eICU-sized file of --stays stays, split as TempDPSOM.py splits (68 % training stays), times the
measured rates. The paper's cohort size is not in the reference code; its hard-coded forecast slice (1,500 test
stays, batches of 300) needs a test set of 1,500 to 1,799 stays, i.e. 9,994 to 11,993 stays in all, so 10,000 is
the default here (docs/tdpsom-design.md §4). The last line of stdout is one JSON object.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import tdpsom
from decay_scheduler import decayed_lr
from plan_runner import make_optimizer, train_step
from tdpsom_model import gaussian_nll
from tdpsom_training import build_model, epoch_plan, infer, phase_loss, target_distribution

OPS = ("pretrain", "som_init", "joint", "prediction")


def config(args) -> dict:
    c = dict(tdpsom.ex.configurations[0]())
    c.update(input_dim=args.features, batch_size=args.batch)
    return c


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> float:
    """Seconds per call of fn, over n calls after one warm-up call."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stays", type=int, default=10000, help="stays of the eICU-sized file of the full-run estimate")
    ap.add_argument("--steps", type=int, default=72, help="steps per stay (the reference's 72 hours)")
    ap.add_argument("--features", type=int, default=98, help="features per step (the reference's 98)")
    ap.add_argument("--batch", type=int, default=300, help="stays per batch (the reference's 300)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each times every op beside a bare step")
    ap.add_argument("--calls", type=int, default=2, help="steps per timing")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    c = config(args)
    torch.manual_seed(0)
    model = build_model(c).to(device)
    opt = make_optimizer(model, c)
    B, T, D = args.batch, args.steps, args.features
    x = torch.randn(B, T, D, device=device)
    p = torch.softmax(torch.randn(B * T, c["som_dim"][0] * c["som_dim"][1], device=device), 1)

    def bare():   # the VAE alone: Gaussian likelihood of x, no SOM, no KL, no LSTM
        loc, scale = model.encode(x.reshape(B * T, D))
        dec_loc, dec_scale = model.decode(model.sample(loc, scale))
        loss = gaussian_nll(x.reshape(B * T, D), dec_loc, dec_scale).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def op_step(op):
        lr = decayed_lr(c["learning_rate"], 0, c["decay_factor"], c["decay_steps"])
        return lambda: train_step(model, opt, op, x, p, lr, phase_loss)

    ratios, seconds = {op: [] for op in OPS}, {op: [] for op in OPS + ("bare",)}
    for _ in range(args.rounds):
        for op in OPS:
            b = timed(bare, args.calls, device)
            s = timed(op_step(op), args.calls, device)
            ratios[op].append(s / b)
            seconds[op].append(s)
            seconds["bare"].append(b)
    eval_stays = max(B, 2 * B)
    xs = torch.randn(eval_stays, T, D, device=device)
    b = timed(bare, args.calls, device)
    tp = timed(lambda: target_distribution(model, xs, B, True), 1, device) / eval_stays    # s per stay
    ev = timed(lambda: infer(model, xs, B, False, c["forecast_steps"]), 1, device) / eval_stays
    step = {op: statistics.median(seconds[op]) for op in seconds}
    n_train = int(int(args.stays * 0.85) * 0.8)
    n_eval = args.stays - int(args.stays * 0.85)
    batches = n_train // B
    plan = epoch_plan(c)
    op_runs = {op: sum(e.ops.count(op) for e in plan) * batches for op in OPS}
    joint_epochs = sum(e.targets for e in plan)
    estimate = (sum(op_runs[op] * step[op] for op in OPS)
                + joint_epochs * (n_train + n_eval) * tp + n_eval * ev)
    result = {
        "device": str(device), "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "shape": [B, T, D], "som_dim": c["som_dim"],
        "bare_step_s": step["bare"], "bare_rows_per_s": B * T / step["bare"],
        **{f"{op}_ratio": statistics.median(ratios[op]) for op in OPS},
        "joint_epoch_ratio_target_distribution": tp * (n_train + n_eval) / (batches * (step["joint"] + step["prediction"])),
        "eval_per_stay_ratio": ev * B / b,
        "full_run_stays": args.stays, "full_run_op_runs": op_runs, "full_run_estimate_h": estimate / 3600,
    }
    print(f"{device}, {result['threads']} threads; batch {B} stays x {T} steps x {D} features, "
          f"{c['som_dim'][0]}x{c['som_dim'][1]} map")
    print(f"bare VAE step {step['bare']:.3f} s ({result['bare_rows_per_s']:.0f} steps of stays/s)")
    for op in OPS:
        print(f"  {op:<11} step {step[op]:.3f} s = {result[f'{op}_ratio']:.2f} bare steps")
    print(f"  P over the training and evaluation stays: {result['joint_epoch_ratio_target_distribution']:.2f} "
          f"of a joint epoch's steps")
    print(f"full default run on {args.stays} stays ({n_train} training, {batches} batches an epoch, "
          f"{sum(op_runs.values())} op runs): {estimate / 3600:.1f} h")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
