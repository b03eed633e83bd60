"""The plan runner: a run as a list of epochs, each of one or more optimiser steps (ops) per batch, with one
optimiser and one global step; its step, how a run stops (a signal, a non-finite loss, a transient failure),
checkpoints and resume, TensorBoard scalars and the progress line.

A model brings a Recipe: its plan (phases named by it), model, losses, targets and evaluation. DPSOM's is
training.DPSOMRecipe. Takes a config dict and a device and imports no experiment; TensorBoard goes through
tb_logging, checkpoints through checkpoint.
"""
import ctypes
import json
import math
import os
import signal
import sys
import time
import warnings
from typing import Callable, NamedTuple, Protocol

import torch
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")   # raised inside Sacred 0.8.7
from sacred.utils import SacredError  # noqa: E402
from tqdm import tqdm

from checkpoint import Interrupted, StopRequest, checkpoint_state, load_checkpoint, restore_rng, save_checkpoint
from decay_scheduler import decayed_lr, set_lr
from tb_logging import Logger
from tf1_adam import TF1Adam


# ---- how a run stops ----------------------------------------------------------------------------------
class NonFiniteLoss(SacredError, RuntimeError):
    """A loss became NaN or infinite: the run stops, its last checkpoint stays."""

    def __init__(self, message: str):
        super().__init__(message, print_traceback=False)


TRANSIENT = 75   # exit status of a run stopped by a failure a retry may not meet (EX_TEMPFAIL); sweep.py retries it


class TransientFailure(BaseException):
    """Out of device memory, or the file system failed: the run stops with its last checkpoint, and the same
    run resumed later may succeed. A BaseException, so that Sacred, which turns every Exception into exit
    status 1 (a config error's, never retried), passes it to __main__ and its own status."""


# Device failures that are not torch.OutOfMemoryError yet pass with time or another process's exit: memory
# taken while a context, cuBLAS or cuDNN handle is made, and a GPU held by another process (exclusive mode)
TRANSIENT_DEVICE_ERRORS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                           "CUBLAS_STATUS_NOT_INITIALIZED", "busy or unavailable")


def is_transient(e: BaseException) -> bool:
    """Whether a failure may not meet a retry of the same run (sweep.py retries exit status TRANSIENT)."""
    return isinstance(e, (torch.OutOfMemoryError, OSError)) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in TRANSIENT_DEVICE_ERRORS))


def run_commandline(ex) -> None:
    """An experiment's __main__: Sacred's command line, ending with exit status 130 after a stop by signal (a
    checkpoint was written, or after a second signal the last one is kept) and TRANSIENT after a transient
    failure, which sweep.py retries."""
    try:
        ex.run_commandline()
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except TransientFailure as e:
        print(e, file=sys.stderr)
        sys.exit(TRANSIENT)


def write_result(logdir: str, result: dict) -> None:
    """The run's result.json, what a sweep collects: written whole or not at all."""
    path = os.path.join(logdir, "result.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


# ---- what a model brings --------------------------------------------------------------------------------
class Epoch(NamedTuple):
    """One epoch of a plan: every batch runs `ops` in order, each one optimiser step of its own loss with the
    learning rate `lr` decayed by the global step, which each op advances (TF's minimize(global_step=...)).

    targets: the recipe's targets (P) are recomputed at the epoch's start and handed to every op;
    evaluate, pictures: after the epoch, the recipe's evaluation (logged under eval/) and pictures.
    """
    phase: str
    lr: float
    ops: tuple[str, ...]
    targets: bool = False
    evaluate: bool = False
    pictures: bool = False


class Recipe(Protocol):
    """A model's part of a run. Its phases name the TensorBoard prefix, the bar and the checkpoint's phase."""
    plan: list[Epoch]
    phase_loss: Callable   # (model, op, x, p) -> (total, parts): the op's loss and its parts (device scalars)
    save_pretrain_after: str      # with save_pretrain, the pretrain file is written after this phase's last epoch
    saved_pretrain_starts: str    # with use_saved_pretrain, the run starts at this phase's first epoch

    def build_model(self) -> torch.nn.Module:
        """The model of the config, on the device."""

    def targets(self, model: torch.nn.Module, x_train: torch.Tensor, x_eval: torch.Tensor) -> tuple:
        """(P of the training set, P of the monitoring batch x_eval[:batch_size]). P has a whole number of rows
        per sample of x (one per image; one per step of a stay), in the samples' order."""

    def evaluate(self, model: torch.nn.Module, x_eval: torch.Tensor) -> dict:
        """The evaluation numbers over the evaluation set."""

    def pictures(self, log: Logger, model: torch.nn.Module, x_eval: torch.Tensor, phase: str, step: int,
                 end_of_phase: bool) -> None:
        """TensorBoard pictures of the model under `<phase>/...`."""


# ---- the optimiser and its step -----------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, c: dict) -> torch.optim.Optimizer:
    """The one optimiser of all phases: TF1's Adam (the reference's) or PyTorch's, as c["adam"] says."""
    return (TF1Adam if c["adam"] == "tf1" else torch.optim.Adam)(model.parameters(), lr=c["learning_rate"])


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, op: str, x: torch.Tensor,
               p: torch.Tensor | None, lr: float, loss_fn: Callable) -> dict:
    """One optimiser step of the op's loss; returns its parts as device tensors (no host sync).

    loss_fn: the recipe's phase_loss or its torch.compile'd form.
    """
    set_lr(opt, lr)
    total, parts = loss_fn(model, op, x, p)
    opt.zero_grad(set_to_none=True)   # params the loss leaves untouched keep grad None: TF1Adam skips them
    total.backward()
    opt.step()
    return parts


class StepStats:
    """Running sums of the loss parts and the first non-finite step, kept on the device between log points."""

    def __init__(self):
        self.names, self.n = None, 0

    def add(self, parts: dict, step: int) -> None:
        values = torch.stack([v.detach() for v in parts.values()])     # (terms,)
        if self.names is None:
            self.names = list(parts)
            self.sum = torch.zeros_like(values)
            self.bad_step = torch.full((), -1, dtype=torch.long, device=values.device)
            self.bad_values = torch.zeros_like(values)
        first_bad = ~torch.isfinite(values).all() & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.bad_values = torch.where(first_bad, values, self.bad_values)
        self.sum += values
        self.n += 1

    def first_bad_step(self) -> int:
        """The global step of the first non-finite loss added; -1 if none."""
        return int(self.bad_step)

    def check(self, phase: str, epoch: int, ckpt_path: str) -> None:
        """Stop on a non-finite loss, naming the phase (and op), epoch, step and the terms that went bad."""
        step = self.first_bad_step()
        if step >= 0:
            terms = [k for k, v in zip(self.names, self.bad_values.tolist()) if not math.isfinite(v)]
            kept = (f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path)
                    else "no checkpoint had been written yet")
            raise NonFiniteLoss(f"non-finite loss in phase {phase}, epoch {epoch}, global step {step} "
                                f"(terms: {', '.join(terms)}); {kept}")

    def pop_means(self) -> dict:
        means = dict(zip(self.names, (self.sum / self.n).tolist()))
        self.sum.zero_()
        self.n = 0
        return means


@torch.no_grad()
def monitor(model: torch.nn.Module, loss_fn: Callable, op: str, x: torch.Tensor, p: torch.Tensor | None) -> dict:
    """The op's loss on a fixed batch of the evaluation set, in eval mode.

    Its noise comes from a forked RNG, so monitoring leaves training's random stream (and resume) untouched.
    """
    model.eval()
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device], device_type=x.device.type):
        _, parts = loss_fn(model, op, x, p)
    model.train()
    return {f"val_{k}": v for k, v in parts.items()}
# ---- memory -------------------------------------------------------------------------------------------
try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _MALLOC_TRIM, _MALLOPT = _LIBC.malloc_trim, _LIBC.mallopt   # glibc (Linux); absent on macOS, Windows, musl
except (OSError, AttributeError):
    _MALLOC_TRIM = _MALLOPT = None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
HEAP_THRESHOLD = 1 << 30                       # bytes: blocks up to 1 GB come from the heap, kept when freed


def reuse_freed_memory() -> bool:
    """Serve every block of a step from glibc's heap, and keep freed ones there for the next step; False where
    there is no glibc. Called once, as training starts; changes no number.

    glibc maps each block over its mmap threshold (at most 32 MB) afresh and unmaps it when freed, and gives the
    heap's free top back once it exceeds 128 KB. A default dense CPU step frees blocks of 41 MB (the posterior
    head's weight gradient) every step, so the next step faults every page of them in again: 19,000 page faults
    a float32 step (15,000 amp), 170 (1,100) with this. The cost: freed memory stays in the RSS until the next
    step reuses it or the epoch's release_freed_memory returns it, and a fragmented heap can hold more than the
    blocks alive at any moment; the default run's peak RSS (benchmarks/bench.py --default-run yes) is measured
    against its target with this on.
    """
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(M_MMAP_THRESHOLD, HEAP_THRESHOLD)) and bool(_MALLOPT(M_TRIM_THRESHOLD, HEAP_THRESHOLD))


def release_freed_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's malloc_trim); False where there is no glibc.

    Called once an epoch. A CPU step frees tensors of 12 MB and more (the full-covariance scale of a batch of
    300, the head's 41 MB gradient); glibc raises its mmap threshold after the first such free and then serves
    them from its heap, where freed holes between smaller survivors stay in the RSS. Costs milliseconds and
    changes no number. (In a default MNIST run, before `infer` wrote into preallocated results, the RSS had
    reached 3.1 GB by joint epoch 244; one malloc_trim brought it to 1.0 GB.)
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


# ---- the loop -----------------------------------------------------------------------------------------
def run_plan(recipe: Recipe, c: dict, data: dict, device: torch.device, logdir: str, run, resume: dict | None,
             how_to_continue: str) -> dict:
    """Every epoch of recipe.plan with one optimiser and one global step; returns the last evaluation's numbers.

    resume: the checkpoint to continue exactly where it stopped; how_to_continue: what a stop message tells the user.
    """
    reuse_freed_memory()
    model = recipe.build_model()
    opt = make_optimizer(model, c)
    loss_fn = torch.compile(recipe.phase_loss) if c["compile"] else recipe.phase_loss   # a graph per op, at its start
    x_train = torch.as_tensor(data["x_train"], device=device)         # (N, ...), resident on the device
    x_eval = torch.as_tensor(data["x_eval"], device=device)
    B, plan = c["batch_size"], recipe.plan
    steps_per_epoch, phases = len(x_train) // B, [e.phase for e in plan]
    global_step, start, first_batch, targets = 0, 0, 0, None
    state = resume or (load_checkpoint(c["pretrain_path"]) if c["use_saved_pretrain"] else None)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        global_step, start, first_batch = state["global_step"], state["plan_index"], state["batch"]
    if resume is None and c["use_saved_pretrain"]:                     # the rest of this plan after the pretraining
        kept = [i for i, e in enumerate(plan) if e.phase == recipe.save_pretrain_after]   # what the file holds
        start = (phases.index(recipe.saved_pretrain_starts) if recipe.saved_pretrain_starts in phases
                 else kept[-1] + 1 if kept else len(plan))   # no such phase: whatever follows the saved ones
        first_batch = 0
    if resume is not None:                                             # continue exactly where it stopped
        targets = None if resume["targets"] is None else tuple(t.to(device) for t in resume["targets"])
        if not restore_rng(resume["rng"], device, resume["config"].get("device", "auto")):
            print(f"note: the checkpoint was written on another kind of device than {device}; training goes on "
                  f"with this device's own random stream, so the run does not repeat an uninterrupted one bit for "
                  f"bit", file=sys.stderr)
    log = Logger(logdir, run, purge_step=global_step + 1 if resume else None)
    ckpt_path = os.path.join(logdir, "checkpoint.pt")
    x_mon = x_eval[:B]                                                 # fixed monitoring batch
    bar, bar_phase, metrics = None, None, {}
    saved_at = time.monotonic()                                       # the last checkpoint (or the start)
    model.train()
    with StopRequest(f"the last checkpoint ({ckpt_path}) is kept; {how_to_continue}") as stop:
        for index in range(start, len(plan)):
            e, started, b0 = plan[index], time.perf_counter(), first_batch if index == start else 0
            epoch = phases[:index].count(e.phase)                      # epoch within its phase
            names = {op: e.phase if len(e.ops) == 1 else f"{e.phase}/{op}" for op in e.ops}   # log prefix
            if e.phase != bar_phase:
                if bar is not None:
                    bar.close()
                bar_phase, bar = e.phase, tqdm(total=phases.count(e.phase) * steps_per_epoch,
                                               initial=epoch * steps_per_epoch + b0, desc=e.phase, disable=None)
            if e.targets and (targets is None or b0 == 0):             # once an epoch, over the whole training set
                targets = recipe.targets(model, x_train, x_eval)
            p_train, p_mon = targets if e.targets else (None, None)
            rows = 0 if p_train is None else len(p_train) // len(x_train)   # P's rows per sample
            stats, lrs = {op: StepStats() for op in e.ops}, {}
            means = {op: {"loss": float("nan")} for op in e.ops}       # no steps left when it stopped after the last
            for b in range(b0, steps_per_epoch):
                x = x_train[b * B:(b + 1) * B]                                 # (B, ...): the batch's samples
                p = None if p_train is None else p_train[b * B * rows:(b + 1) * B * rows]   # (B*rows, K)
                for op in e.ops:
                    lrs[op] = decayed_lr(e.lr, global_step, c["decay_factor"], c["decay_steps"])
                    global_step += 1
                    stats[op].add(train_step(model, opt, op, x, p, lrs[op], loss_fn), global_step)
                bar.update(1)
                crossed = global_step // c["log_every"] > (global_step - len(e.ops)) // c["log_every"]
                if crossed or b == steps_per_epoch - 1 or stop.signum:   # a log point among this batch's steps
                    for op in sorted(e.ops, key=lambda op: stats[op].first_bad_step()):   # the earliest first
                        stats[op].check(names[op], epoch, ckpt_path)
                    for op in e.ops:
                        means[op] = stats[op].pop_means()
                        log.scalars(names[op], {**means[op], "lr": lrs[op],
                                                **monitor(model, recipe.phase_loss, op, x_mon, p_mon)}, global_step)
                    bar.set_postfix(loss=f"{next(iter(means[e.ops[0]].values())):.4g}", refresh=False)
                if stop.signum:
                    save_checkpoint(ckpt_path, checkpoint_state(model, opt, c, global_step, index, b + 1, e.phase,
                                                                epoch, targets if e.targets else None))
                    log.writer.close()
                    raise Interrupted(f"stopped by signal {signal.Signals(stop.signum).name} in phase {e.phase}, "
                                      f"epoch {epoch}, global step {global_step}; checkpoint {ckpt_path}; "
                                      f"{how_to_continue}")
            last_of_phase = index + 1 == len(plan) or plan[index + 1].phase != e.phase
            if e.evaluate:
                metrics = recipe.evaluate(model, x_eval)
                log.scalars("eval", metrics, global_step)
            if e.pictures:
                recipe.pictures(log, model, x_eval, e.phase, global_step, last_of_phase)
            if last_of_phase or time.monotonic() - saved_at >= c["checkpoint_every"]:   # a GPU's epochs take seconds
                state = checkpoint_state(model, opt, c, global_step, index + 1, 0, e.phase, epoch)
                save_checkpoint(ckpt_path, state)
                saved_at = time.monotonic()
            release_freed_memory()
            if e.phase == recipe.save_pretrain_after and last_of_phase and c["save_pretrain"]:
                save_checkpoint(c["pretrain_path"], state)
            if bar.disable:   # no terminal (a file, nohup, Sacred's capture): one line an epoch instead of the bar
                print(progress_line(plan, index, epoch, steps_per_epoch - b0, B, time.perf_counter() - started,
                                    global_step, steps_per_epoch, means[e.ops[0]]), flush=True)
    if bar is not None:
        bar.close()
    if not metrics:   # no evaluated epochs left to run: evaluate what the weights give
        metrics = recipe.evaluate(model, x_eval)
        log.scalars("eval", metrics, global_step)
    log.hparams(c, metrics)
    log.writer.close()
    return metrics


def progress_line(plan: list[Epoch], index: int, epoch: int, steps: int, batch_size: int, seconds: float,
                  global_step: int, steps_per_epoch: int, means: dict) -> str:
    """phase, epoch/total, global step, the epoch's last logged loss (its first op's), samples/s, and the time
    left at this pace per optimiser step."""
    phase, ops = plan[index].phase, len(plan[index].ops)
    left = sum(len(e.ops) for e in plan[index + 1:]) * steps_per_epoch * seconds / max(steps * ops, 1)
    return (f"{phase} epoch {epoch + 1}/{[e.phase for e in plan].count(phase)}  step {global_step}/"
            f"{sum(len(e.ops) for e in plan) * steps_per_epoch}  loss {next(iter(means.values())):.4g}  "
            f"{steps * batch_size / seconds:.0f} samples/s  ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:"
            f"{int(left % 60):02d}")
