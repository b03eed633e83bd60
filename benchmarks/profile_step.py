"""Where the time of one dense joint step goes, float32 against amp: what bench.py's amp_speedup is made of.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py        # one thread; without it, torch's default

For each arm it times the default dense model's joint step (plan_runner.train_step, synthetic batches of 300,
a fixed target P), then profiles three more steps with torch.profiler and splits the step's time into the
posterior head's matrix products (those with its 5150 outputs), the head's casts between float32 and bf16,
the optimiser's step, and the rest. It also times a plain copy of the head's weight: Adam, which reads four
and writes three arrays of every parameter a step, cannot run faster than that rate allows. The last line
of stdout is one JSON object.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import plan_runner
import training
from bench import default_config
from fast_ops import has_bf16_arithmetic

STEPS, PROFILED = 8, 3


def median_ms(fn, n: int = STEPS) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def profile_arm(amp: bool, x: torch.Tensor, p: torch.Tensor) -> dict:
    c = {**default_config(False), "input_shape": (x.shape[1],), "amp": amp}
    B = c["batch_size"]
    model = training.build_model(c).train()
    head = list(model.head.weight.shape)                              # (outputs, features): (5150, 2000)
    opt = plan_runner.make_optimizer(model, c)
    stats, n = plan_runner.StepStats(), [0]

    def step():
        b = n[0] % (len(x) // B)
        n[0] += 1
        stats.add(plan_runner.train_step(model, opt, "train", x[b * B:(b + 1) * B], p[b * B:(b + 1) * B],
                                         c["learning_rate"], training.phase_loss), n[0])

    step_ms = median_ms(step)
    with torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(PROFILED):
            step()
    parts = {"head_products": 0.0, "head_casts": 0.0, "optimizer": 0.0}
    total = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        ms = e.self_cpu_time_total / 1e3 / PROFILED                  # each op's own time, counted once
        total += ms
        if e.key.startswith("Optimizer.step"):                       # the whole update, its ops included
            parts["optimizer"] += e.cpu_time_total / 1e3 / PROFILED
        shapes = [list(s) for s in e.input_shapes if s]
        if e.key in ("aten::mm", "aten::addmm") and any(head[0] in s for s in shapes):
            parts["head_products"] += ms
        elif e.key == "aten::copy_" and shapes and shapes[0] == head:   # the weight, or its gradient, cast
            parts["head_casts"] += ms
    # the update's ops are in total too: the rest is what neither the head nor the update takes
    parts["rest"] = max(0.0, total - parts["head_products"] - parts["head_casts"] - parts["optimizer"])
    # the profiler's own cost inflates each op by a varying amount: its shares, applied to the timed step
    return {"step_ms": step_ms, **{k: step_ms * v / total for k, v in parts.items()}}


def cast_ms(shape: list[int]) -> float:
    """The two casts amp's head makes a step, timed alone: its weight to bf16, its bf16 gradient to float32."""
    w, g = torch.randn(shape), torch.randn(shape).to(torch.bfloat16)
    return median_ms(lambda: w.to(torch.bfloat16)) + median_ms(lambda: g.to(torch.float32))


def main() -> None:
    torch.manual_seed(0)
    plan_runner.reuse_freed_memory()                      # as training does: large blocks stay on the heap
    x = torch.rand(3000, 784)
    p = torch.softmax(torch.randn(3000, 64), 1)
    out = {"threads": torch.get_num_threads(), "float32": profile_arm(False, x, p)}
    if has_bf16_arithmetic(torch.device("cpu")):
        out["amp"] = profile_arm(True, x, p)
        out["amp_speedup"] = out["float32"]["step_ms"] / out["amp"]["step_ms"]
    c = {**default_config(False), "input_shape": (784,)}
    model = training.build_model(c)
    params = sum(q.numel() for q in model.parameters())
    w = torch.randn(model.head.weight.shape)
    out["copy_gb_per_s"] = 2 * w.numel() * 4 / median_ms(lambda: w.clone()) / 1e6      # read and write
    out["adam_floor_ms"] = 7 * 4 * params / out["copy_gb_per_s"] / 1e6      # read 4, write 3 arrays
    for arm in ("float32", "amp"):
        if arm in out:
            r = out[arm]
            print(f"{arm:8} step {r['step_ms']:6.1f} ms, by the profile's shares: head products "
                  f"{r['head_products']:5.1f}, head casts {r['head_casts']:5.1f}, optimiser {r['optimizer']:5.1f}, "
                  f"rest {r['rest']:5.1f}")
    print(f"a plain copy moves {out['copy_gb_per_s']:.1f} GB/s: Adam over {params / 1e6:.1f} M float32 parameters "
          f"needs at least {out['adam_floor_ms']:.1f} ms")
    if "amp" in out:
        out["head_casts_alone_ms"] = cast_ms(list(model.head.weight.shape))
        free = out["amp"]["step_ms"] - out["head_casts_alone_ms"]
        out["amp_speedup_without_casts"] = out["float32"]["step_ms"] / free
        print(f"amp speed-up {out['amp_speedup']:.2f} x; the head's casts take {out['head_casts_alone_ms']:.1f} ms "
              f"timed alone, and without them it would be {out['amp_speedup_without_casts']:.2f} x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
