"""Throughput of DPSOM's training phases, measured against a bare encoder/decoder Adam step.

    python benchmarks/bench.py                       # synthetic data, whatever device is present
    python benchmarks/bench.py --data-dir ../shared/data

For the dense and the conv model: samples/s of each phase's optimiser step (pretrain, som_init, joint),
of the target-distribution pass over the train split and of evaluation. Each is also a ratio to a bare
step of the same networks (forward + backward + Adam on a plain BCE: no SOM, no logging) timed right
beside it: on a shared machine the seconds drift by several times, ratios of adjacent timings much less.
A phase step is what plan_runner.run_plan does per batch (learning rate, train_step, StepStats.add) without the
branch taken every log_every steps. The target-distribution pass is reported as a share of one joint
epoch, evaluation as its time per sample over a bare step's. Peak memory per model is this process's
(both networks, the data). A child runs one joint epoch of training.train at full size for a default dense
run's peak RSS and checkpoint size; drift over hundreds of epochs is beyond it. From the rates, the
time of a default run's steps and target passes (full_run_estimate_s).
With --variants (default on a GPU), the joint step under compile=True, amp=True and both, each timed
beside the plain joint step: the speed-up each buys, and its first steps' time (compilation). Where the device
has bf16 arithmetic, amp_speedup is always measured (the amp joint step's rate over the plain one's, the two
interleaved), and for the dense model gemm_fraction: the bare step's multiply-add rate (its layers' products,
forward and backward) over a plain matmul of the posterior head's shape timed beside it, in float32 and, for
the amp bare step, in bf16: how close a step comes to what the cores can do.
The last line of stdout is one JSON object of everything; each model's timings come first as a line of their own
as soon as they are measured, so a run stopped by a time cap keeps them.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")   # sacred's import
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F

import dpsom
import plan_runner
from decay_scheduler import decayed_lr
from fast_ops import has_bf16_arithmetic
from mnist_data import load_data
import training

PHASES = {"pretrain": "pretrain", "som_init": "som_init", "joint": "train"}   # report name -> training's name
CPU_TARGETS = {"pretrain": 1.1, "som_init": 0.3, "joint": 1.15, "target_distribution": 0.35}   # the issue's, dense
RSS_TARGET_MB = 1500
N_TRAIN, N_EVAL = 51000, 10000


def get_data(data_dir: str | None, n_train: int = N_TRAIN) -> dict[str, np.ndarray]:
    """MNIST, or uniform pixels of its shapes (n_train training images and a fifth as many to evaluate)."""
    if data_dir:
        return load_data("MNIST", data_dir, False)
    rng = np.random.default_rng(0)   # uniform pixels: the arithmetic does not depend on the content
    n_eval = min(N_EVAL, max(1, n_train // 5))
    return {"x_train": rng.random((n_train, 784), dtype=np.float32), "y_train": rng.integers(0, 10, n_train),
            "x_eval": rng.random((n_eval, 784), dtype=np.float32), "y_eval": rng.integers(0, 10, n_eval)}


def default_config(conv: bool) -> dict:
    return dict(dpsom.config(fixed={"convolution": conv}))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> float:
    """Seconds per call over n calls, synchronised only before and after (as the training loop is)."""
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n


def bench_arch(conv: bool, data: dict, device: torch.device, max_rounds: int, budget_s: float,
               variants: bool = False, input_shape: tuple = (1, 28, 28)) -> dict:
    """input_shape: one sample of data["x_train"]'s rows (MNIST's images, or vectors (D,) of one's own data)."""
    c = {**default_config(conv), "input_shape": input_shape}
    training.amp_on(c, device)                      # a GPU's float32 as a run's: TF32 off (cuDNN's default is on)
    B, cpu = c["batch_size"], device.type == "cpu"
    # Conv on a CPU is ~10x dense: time single steps and extrapolate the two whole-set passes from a subset.
    n_td = 5 * B if conv and cpu else len(data["x_train"])
    n_eval = 5 * B if conv and cpu else len(data["x_eval"])
    block = 1 if cpu else 10                                        # steps per timing block
    x_train = torch.as_tensor(data["x_train"], device=device)       # resident on the device, batches by slicing
    x_eval, y_eval = torch.as_tensor(data["x_eval"][:n_eval], device=device), data["y_eval"][:n_eval]

    bare = training.build_model(c).to(device).train()
    bare_opt = torch.optim.Adam(bare.parameters(), lr=c["learning_rate"])
    model = training.build_model(c).to(device).train()
    opt = plan_runner.make_optimizer(model, c)                            # one optimiser for all phases, as train()
    base_lr = {"pretrain": c["learning_rate_pretrain"], "som_init": c["som_learning_rates"][0],
               "train": c["learning_rate"]}
    stats = {phase: plan_runner.StepStats() for phase in PHASES.values()}   # one per phase: their parts differ
    s = {"step": 0, "bare_step": 0, "p": None}

    def bare_step():
        b = s["bare_step"] % (n_td // B)
        x = x_train[b * B:(b + 1) * B]
        logits = bare.decode(bare.sample(*bare.encode(x)))
        loss = F.binary_cross_entropy_with_logits(logits, x)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()
        s["bare_step"] += 1

    def phase_step(phase):   # the body of run_plan's step loop, without tqdm and the logging branch
        b = s["step"] % (n_td // B)
        p = None if phase != "train" else s["p"][b * B:(b + 1) * B]
        lr = decayed_lr(base_lr[phase], s["step"], c["decay_factor"], c["decay_steps"])
        s["step"] += 1
        stats[phase].add(plan_runner.train_step(model, opt, phase, x_train[b * B:(b + 1) * B], p, lr, training.phase_loss),
                          s["step"])

    def beside_bare(fn) -> tuple[float, float]:
        """Seconds of one call of fn, and the same in bare steps (bare timed just before and after)."""
        before = timed(bare_step, block, device)
        seconds = timed(fn, 1, device)
        return seconds, seconds / statistics.mean([before, timed(bare_step, block, device)])

    def target_distribution():
        s["p"] = training.target_distribution(model, x_train[:n_td], B, c["target_sample"])

    # Warm-up (allocator, oneDNN primitives, Adam state); the medians below absorb what is left of it.
    bare_step(), phase_step("pretrain"), phase_step("som_init")
    training.target_distribution(model, x_train[:2 * B], B, c["target_sample"])
    td_s, td_bare = beside_bare(target_distribution)                # also the p of the joint steps
    phase_step("train")

    # Interleave: each phase block sits next to its own bare block, their order alternating per round.
    t = {name: [] for name in PHASES}
    ratio = {name: [] for name in PHASES}
    bare_t = []
    deadline = time.perf_counter() + budget_s
    for r in range(max_rounds):
        for name, phase in PHASES.items():
            pair = [("bare", bare_step), (name, lambda: phase_step(phase))]
            got = {k: timed(fn, block, device) for k, fn in (pair[::-1] if r % 2 else pair)}
            t[name].append(got[name])
            ratio[name].append(got[name] / got["bare"])
            bare_t.append(got["bare"])
        if r >= 2 and time.perf_counter() > deadline:
            break
    for phase, st in stats.items():
        st.check(phase, 0, "")

    if device.type == "cuda":   # the step loop must never wait for the device: count the syncs it requests
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for phase in PHASES.values():
                phase_step(phase)
        torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)

    eval_s, eval_bare = beside_bare(lambda: training.evaluate_model(model, x_eval, y_eval, B, c["eval_sample"]))
    med = {name: statistics.median(v) for name, v in ratio.items()}
    bare_s = statistics.median(bare_t)
    steps_per_epoch = len(data["x_train"]) // B
    scale = len(data["x_train"]) / n_td                             # 1 unless timed on a subset
    out = {name: {"samples_per_s": B / statistics.median(t[name]), "ratio_to_bare": med[name]} for name in PHASES}
    epoch_in_bare = steps_per_epoch * med["joint"]                  # one joint epoch, in bare steps
    out["target_distribution"] = {"seconds": td_s * scale, "ratio_to_epoch": td_bare * scale / epoch_in_bare,
                                  "images_timed": n_td}
    out["eval"] = {"samples_per_s": n_eval / eval_s, "ratio_to_bare": eval_bare * B / n_eval, "images_timed": n_eval}
    # A default run's optimiser steps and target-distribution passes at these rates (logging, evaluation and
    # checkpoints left out: they are a few percent at the default log_every).
    epochs = {"pretrain": c["epochs_pretrain"], "som_init": c["som_epochs"] * len(c["som_learning_rates"]),
              "joint": c["num_epochs"]}
    step_s = {name: B / out[name]["samples_per_s"] for name in PHASES}
    out["full_run_estimate_s"] = (sum(n * steps_per_epoch * step_s[name] for name, n in epochs.items())
                                  + c["num_epochs"] * out["target_distribution"]["seconds"])
    out["bare"] = {"samples_per_s": B / bare_s, "batch_size": B, "rounds": len(bare_t) // len(PHASES),
                   "steps_per_block": block}
    if device.type == "cuda":
        out["host_syncs_per_step"] = syncs / len(PHASES)
    amp = has_bf16_arithmetic(device)
    if variants or amp:
        chosen = VARIANTS if variants else {"amp": VARIANTS["amp"]}
        out["variants"] = variant_speedups(c, x_train[:n_td], s["p"], device, max_rounds, budget_s,
                                           plain=lambda: phase_step("train"), block=block, variants=chosen)
    out["amp_speedup"] = out["variants"]["amp"]["speedup"] if amp else None
    if amp and not conv:
        out["gemm_fraction"] = gemm_fractions(c, x_train[:n_td], device, max_rounds, budget_s, block)
    return out


def step_macs(model, x: torch.Tensor) -> int:
    """Multiply-adds of a bare step's layer products: forward, input gradients (but the first layer's, whose
    input needs none) and weight gradients. The sample's L eps (B D^2) is left out, under 0.1 %."""
    macs = []

    def count(m, inputs, output):
        if isinstance(m, torch.nn.Linear):
            macs.append(output.numel() * m.in_features)
        elif isinstance(m, torch.nn.Conv2d):
            macs.append(output.numel() * m.weight[0].numel())
        elif isinstance(m, torch.nn.ConvTranspose2d):
            macs.append(inputs[0].numel() * m.weight[0].numel())
    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model.decode(model.sample(*model.encode(x)))
    for h in hooks:
        h.remove()
    return 3 * sum(macs) - macs[0]


def gemm_fractions(c: dict, x_train: torch.Tensor, device: torch.device, max_rounds: int, budget_s: float,
                   block: int) -> dict:
    """The float32 and the amp bare step's multiply-add rates over those of a plain float32 and bf16 matmul of
    the posterior head's shape (batch x features times features x outputs), the four timed interleaved."""
    B = c["batch_size"]
    steps, products, macs = {}, {}, None
    for name, amp, dtype in (("float32", False, torch.float32), ("bfloat16", True, torch.bfloat16)):
        model = training.build_model({**c, "amp": amp}).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=c["learning_rate"])
        macs = macs or step_macs(model, x_train[:B])   # counted on the float32 model: amp's head is no module call

        def bare_step(model=model, opt=opt, n=[0]):
            b = n[0] % (len(x_train) // B)
            n[0] += 1
            x = x_train[b * B:(b + 1) * B]
            loss = F.binary_cross_entropy_with_logits(model.decode(model.sample(*model.encode(x))), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        a = torch.rand(B, model.head.in_features, device=device, dtype=dtype)
        w = torch.rand(model.head.in_features, model.head.out_features, device=device, dtype=dtype)
        steps[name], products[name] = bare_step, (lambda a=a, w=w: torch.mm(a, w))
        bare_step(), products[name]()                                  # warm-up
    head_macs = B * model.head.in_features * model.head.out_features
    arms = {**{("step", k): f for k, f in steps.items()}, **{("mm", k): f for k, f in products.items()}}
    t = {k: [] for k in arms}
    deadline = time.perf_counter() + budget_s / 2
    for r in range(max_rounds):
        for k in (list(arms)[::-1] if r % 2 else list(arms)):
            t[k].append(timed(arms[k], block, device))
        if r >= 2 and time.perf_counter() > deadline:
            break
    rate = {k: (macs if k[0] == "step" else head_macs) / statistics.median(v) for k, v in t.items()}
    return {name: rate[("step", name)] / rate[("mm", name)] for name in steps} | {
        "step_macs": macs, "matmul_gmacs_per_s": {name: rate[("mm", name)] / 1e9 for name in steps},
        "rounds": len(t[("mm", "float32")])}


VARIANTS = {"compile": (True, False), "amp": (False, True), "compile+amp": (True, True)}   # (compile, amp)


def variant_speedups(c: dict, x_train: torch.Tensor, p: torch.Tensor, device: torch.device, max_rounds: int,
                     budget_s: float, plain, block: int, variants: dict = VARIANTS) -> dict:
    """The joint step under each speed switch, timed in blocks alternating with the plain joint step.

    speedup = plain step time / switched step time (median over rounds); warmup_s is the switch's first two
    steps, compilation included.
    """
    B = c["batch_size"]
    out = {}
    for name, (compiled, amp) in variants.items():
        torch._dynamo.reset()
        model = training.build_model({**c, "amp": amp}).to(device).train()
        opt = plan_runner.make_optimizer(model, c)
        loss_fn = torch.compile(training.phase_loss) if compiled else training.phase_loss
        stats, step = plan_runner.StepStats(), [0]

        def switched():
            b = step[0] % (len(x_train) // B)
            step[0] += 1
            stats.add(plan_runner.train_step(model, opt, "train", x_train[b * B:(b + 1) * B], p[b * B:(b + 1) * B],
                                          c["learning_rate"], loss_fn), step[0])

        warmup = timed(switched, 2, device) * 2
        ratios, times = [], []
        deadline = time.perf_counter() + budget_s / 2   # each variant
        for r in range(max_rounds):
            pair = [("plain", plain), (name, switched)]
            got = {k: timed(fn, block, device) for k, fn in (pair[::-1] if r % 2 else pair)}
            ratios.append(got["plain"] / got[name])
            times.append(got[name])
            if r >= 2 and time.perf_counter() > deadline:
                break
        stats.check("train", 0, "")
        out[name] = {"samples_per_s": B / statistics.median(times), "speedup": statistics.median(ratios),
                     "warmup_s": warmup, "rounds": len(ratios)}
        print(f"bench: variant {name} timed", file=sys.stderr)
    torch._dynamo.reset()
    return out


def peak_rss_mb(reset: bool = False) -> float:
    """High-water RSS of this process since the last reset (Linux's VmHWM; getrusage's maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            mb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")   # restart the high-water mark from the current RSS
        return mb
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_run(data_dir: str | None, device: str) -> dict:
    """Peak RSS and checkpoint size of a default dense run, one joint epoch at full size, in a child."""
    with tempfile.TemporaryDirectory() as logdir:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", logdir, "--device", device]
        cmd += ["--data-dir", data_dir] if data_dir else []
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        ckpt = os.path.getsize(os.path.join(logdir, "checkpoint.pt"))
    # Adam keeps two tensors per parameter; anything beyond model + those + a few bytes is duplication.
    model = training.build_model(default_config(False))
    ideal = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
        2 * p.numel() * p.element_size() for p in model.parameters())
    return {"peak_rss_mb": json.loads(done.stdout.splitlines()[-1])["peak_rss_mb"],
            "checkpoint_mb": ckpt / 2 ** 20, "checkpoint_ideal_mb": ideal / 2 ** 20,
            "data": "MNIST" if data_dir else "synthetic, so without load_data's parsing"}


def child(logdir: str, data_dir: str | None, device: str) -> None:
    # The joint epoch holds every large tensor a run has: data, p over the train split, the full graph.
    # (A child's getrusage would not do: exec carries the parent's high-water mark into its ru_maxrss.)
    c = {**default_config(False), "epochs_pretrain": 0, "som_learning_rates": [], "num_epochs": 1}
    training.train(c, get_data(data_dir), dpsom.pick_device(device), logdir, None)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def print_table(result: dict, n_train: int, cpu: bool) -> None:
    archs = [a for a in ("dense", "conv") if a in result]
    print(f"device {result['device']}, batch {result[archs[0]]['bare']['batch_size']}; each ratio is to a bare "
          f"forward + backward + Adam step timed beside it")
    if max(result["load_avg"]) > os.cpu_count():
        print(f"busy machine (load {max(result['load_avg']):.1f} on {os.cpu_count()} cores): "
              f"the seconds are inflated, the ratios much less so")
    print(f"{'model':6} {'phase':20} {'samples/s':>10} {'ratio':>7} {'of':<6} {'target':>7}  ok")
    for arch in archs:
        r = result[arch]
        rows = [("bare", r["bare"]["samples_per_s"], 1.0, "bare")]
        rows += [(n, r[n]["samples_per_s"], r[n]["ratio_to_bare"], "bare") for n in PHASES]
        td = r["target_distribution"]
        rows += [("target_distribution", n_train / td["seconds"], td["ratio_to_epoch"], "epoch"),
                 ("eval", r["eval"]["samples_per_s"], r["eval"]["ratio_to_bare"], "bare")]
        for name, rate, ratio, of in rows:
            target = CPU_TARGETS.get(name) if cpu and arch == "dense" else None
            check = "" if target is None else ("yes" if ratio <= target else "NO")
            print(f"{arch:6} {name:20} {rate:10.0f} {ratio:7.3f} {of:<6} {target or '':>7}  {check}")
        for name, v in r.get("variants", {}).items():
            print(f"{arch:6} {'joint, ' + name:20} {v['samples_per_s']:10.0f} {v['speedup']:7.3f} {'faster':<6}"
                  f"          (first 2 steps {v['warmup_s']:.1f} s)")
        if "gemm_fraction" in r:
            g = r["gemm_fraction"]
            print(f"{arch:6} bare step's multiply-add rate / a plain matmul of the head's shape: float32 "
                  f"{g['float32']:.2f}, amp {g['bfloat16']:.2f} (matmuls {g['matmul_gmacs_per_s']['float32']:.0f} "
                  f"and {g['matmul_gmacs_per_s']['bfloat16']:.0f} GMAC/s)")
        print(f"{arch:6} a default run's steps and target passes at these rates: "
              f"{r['full_run_estimate_s'] / 60:.1f} min")
        print(f"{arch:6} {r['bare']['rounds']} rounds of {r['bare']['steps_per_block']} step(s); bench's peak "
              f"memory {r['peak_memory_mb']:.0f} MB ({'RSS' if cpu else 'max_memory_allocated'})"
              + (f"; target distribution and eval extrapolated from {td['images_timed']} and "
                 f"{r['eval']['images_timed']} images" if td["images_timed"] < n_train else ""))
    d = result.get("default_dense_run", {})
    if "skipped" in d:
        print(f"default dense run skipped: {d['skipped']}")
    elif d:
        check = f" (target {RSS_TARGET_MB} MB: {'yes' if d['peak_rss_mb'] <= RSS_TARGET_MB else 'NO'})" if cpu else ""
        print(f"default dense run ({d['data']}): peak RSS {d['peak_rss_mb']:.0f} MB{check}; checkpoint "
              f"{d['checkpoint_mb']:.1f} MB (model + Adam state: {d['checkpoint_ideal_mb']:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", help="folder holding mnist/ (default: synthetic data of MNIST's shapes)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=0, help="most timing rounds per model (0: by device)")
    ap.add_argument("--default-run", choices=["auto", "yes", "no"], default="auto",
                    help="measure a default dense run's peak RSS in a child (auto: if it fits in 5 minutes)")
    ap.add_argument("--variants", choices=["auto", "yes", "no"], default="auto",
                    help="also time the joint step with compile, amp and both (auto: on a GPU only; compiling "
                         "takes minutes on a CPU)")
    ap.add_argument("--arch", choices=["both", "dense", "conv"], default="both", help="which model(s) to time")
    ap.add_argument("--samples", type=int, default=N_TRAIN,
                    help="synthetic training images (fewer: a quick rehearsal of the script, not a measurement)")
    ap.add_argument("--child", metavar="LOGDIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.data_dir, args.device)

    t0 = time.perf_counter()
    plan_runner.reuse_freed_memory()   # as plan_runner.run_plan does, for its steps' allocations
    device = dpsom.pick_device(args.device)
    cpu = device.type == "cpu"
    data = get_data(args.data_dir, args.samples)
    result = {"device": torch.cuda.get_device_name(device) if not cpu else f"cpu ({torch.get_num_threads()} threads)",
              "load_avg": [os.getloadavg()[0]]}
    archs = [(a, a == "conv") for a in ("dense", "conv") if args.arch in ("both", a)]
    for arch, conv in archs:
        if cpu:
            peak_rss_mb(reset=True)
        else:
            torch.cuda.reset_peak_memory_stats(device)
        # Conv steps take seconds on a CPU: few rounds, each at least 3 and stopped after the time budget.
        rounds = args.rounds or (3 if cpu and conv else 20)
        variants = args.variants == "yes" or (args.variants == "auto" and not cpu)
        result[arch] = bench_arch(conv, data, device, rounds, budget_s=30 if cpu else 20, variants=variants)
        result[arch]["peak_memory_mb"] = peak_rss_mb() if cpu else torch.cuda.max_memory_allocated(device) / 2 ** 20
        print(f"bench: {arch} timed, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        print(json.dumps({arch: result[arch]}), flush=True)   # kept if a time cap stops what follows
    result["peak_memory_mb"] = max(result[a]["peak_memory_mb"] for a, _ in archs)
    # One joint epoch and its two target-distribution passes at the dense speed just measured, plus a
    # margin for what train() adds (start-up, monitoring, evaluation, checkpoint).
    dense = result.get("dense")
    estimate = 1.5 * (10 + len(data["x_train"]) / dense["joint"]["samples_per_s"]
                      + 1.2 * dense["target_distribution"]["seconds"]) if dense else float("inf")
    if args.default_run == "yes" or (args.default_run == "auto" and time.perf_counter() - t0 + estimate < 270):
        result["default_dense_run"] = default_run(args.data_dir, args.device)
        print(f"bench: default dense run measured, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    elif args.default_run == "auto":
        result["default_dense_run"] = {"skipped": f"would take about {estimate:.0f} s here now; "
                                                  "--default-run yes forces it"}
    result["load_avg"].append(os.getloadavg()[0])
    result["amp_speedup"] = {a: result[a]["amp_speedup"] for a, _ in archs}
    result["gemm_fraction"] = {k: result["dense"]["gemm_fraction"][k] for k in ("float32", "bfloat16")} \
        if "gemm_fraction" in result.get("dense", {}) else None

    print_table(result, len(data["x_train"]), cpu)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
