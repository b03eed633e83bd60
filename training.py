"""Training and evaluating a DPSOM: the three phases' loop with one optimiser and one global step, its step,
the DEC target distribution, inference over a whole set and the evaluation numbers.

Takes a config dict and a device from the experiment (dpsom.py) and never imports it; TensorBoard goes through
tb_logging, checkpoints through checkpoint.
"""
import ctypes
import math
import os
import signal
import sys
import time
import warnings

import numpy as np
import torch
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")   # raised inside Sacred 0.8.7
from sacred.utils import SacredError  # noqa: E402
from tqdm import tqdm

from checkpoint import Interrupted, StopRequest, checkpoint_state, load_checkpoint, restore_rng, save_checkpoint
from decay_scheduler import decayed_lr, set_lr
from dpsom_model import DPSOM, MNIST_SHAPE
from fast_ops import has_bf16_arithmetic
from tb_logging import PICTURE_EPOCHS, Logger, log_pictures
from tf1_adam import TF1Adam
from utils import clustering_metrics, map_usage, quantization_error, reconstruction_errors, topographic_error


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


# ---- the model, its optimiser and its step ------------------------------------------------------------
def make_optimizer(model: DPSOM, c: dict) -> torch.optim.Optimizer:
    """The one optimiser of all three phases: TF1's Adam (the reference's) or PyTorch's, as c["adam"] says."""
    return (TF1Adam if c["adam"] == "tf1" else torch.optim.Adam)(model.parameters(), lr=c["learning_rate"])


def amp_on(c: dict, device: torch.device) -> bool:
    """Whether the model runs amp's bf16 products: c["amp"], where the device has bf16 arithmetic. Elsewhere it
    runs float32 and says so (emulated bf16 is slower than float32).

    On a CUDA device every float32 product stays float32, with or without amp: PyTorch's default lets cuDNN's
    convolutions round to TF32, and TF32 matmuls would round the SOM distances and the sample, the float32 parts
    that amp leaves (its layers' products are bf16 already).
    """
    use = c["amp"] and has_bf16_arithmetic(device)
    if c["amp"] and not use:
        print(f"warning: amp=True, but {device} has no bf16 arithmetic (a CPU needs AMX or AVX512-BF16, a GPU "
              f"Ampere or later): running float32", file=sys.stderr)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return use


def build_model(c: dict) -> DPSOM:
    """The model of a run's config; c["input_shape"] (set from the data) is MNIST's where absent."""
    return DPSOM(latent_dim=c["latent_dim"], som_dim=c["som_dim"], alpha=c["alpha"], beta=c["beta"],
                 gamma=c["gamma"], theta=c["theta"], prior=c["prior"], prior_var=c["prior_var"],
                 dropout=c["dropout"], convolution=c["convolution"], toroidal=c["toroidal"],
                 posterior=c["posterior"], batchnorm=c["batchnorm"], leaky_logits=c["leaky_logits"],
                 amp=c.get("amp", False),   # checkpoints written before the switch existed lack the key
                 input_shape=tuple(c.get("input_shape", MNIST_SHAPE)), likelihood=c.get("likelihood", "bernoulli"))


def train_step(model: DPSOM, opt: torch.optim.Optimizer, phase: str, x: torch.Tensor, p: torch.Tensor | None,
               lr: float, loss_fn=None) -> dict:
    """One optimiser step of the phase's loss; returns its parts as device tensors (no host sync).

    loss_fn: phase_loss itself (default) or its torch.compile'd form.
    """
    set_lr(opt, lr)
    total, parts = (loss_fn or phase_loss)(model, phase, x, p)
    opt.zero_grad(set_to_none=True)
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

    def check(self, phase: str, epoch: int, ckpt_path: str) -> None:
        """Stop on a non-finite loss, naming the phase, epoch, step and the terms that went bad."""
        step = int(self.bad_step)
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


def epoch_plan(c: dict) -> list[tuple[str, float]]:
    """(phase, learning rate of the phase) for every epoch of the run, in order."""
    return ([("pretrain", c["learning_rate_pretrain"])] * c["epochs_pretrain"]
            + [("som_init", lr) for lr in c["som_learning_rates"] for _ in range(c["som_epochs"])]
            + [("train", c["learning_rate"])] * c["num_epochs"])


def phase_loss(model: DPSOM, phase: str, x: torch.Tensor, p: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """The loss a phase minimises and its parts."""
    if phase == "pretrain":
        out = model(x)
        elbo, nll, kl = model.elbo(x, out)
        return elbo, {"elbo": elbo, "nll": nll, "kl": kl}
    if phase == "som_init":
        with torch.no_grad():   # only the prototypes learn: the encoder runs forward only, no decoder
            z = model.sample(*model.encode(x))
            dist = model.distances(z)
        loss = model.som_init_loss(z, dist)
        return loss, {"loss": loss}
    return model.joint_loss(x, model(x), p)


# ---- inference and evaluation -------------------------------------------------------------------------
EVAL_NOISE_SEED = 2020   # evaluation's one posterior sample (eval_sample) is seeded, so `evaluate` reproduces a run


@torch.no_grad()
def infer(model: DPSOM, x: torch.Tensor, batch_size: int, sample: bool, decode: bool = True,
          noise_seed: int | None = EVAL_NOISE_SEED) -> dict:
    """Per sample of a set, batched, in eval mode: latent code z (N, D), squared distances dist (N, H*W) and,
    with `decode`, the reconstruction errors nll and mse (N,).

    z is the posterior mean, or with `sample` one posterior sample whose noise comes from a CPU generator seeded
    with noise_seed (repeatable, the same on every device, training's RNG stream left alone), or from the
    device's global RNG if it is None.
    """
    was_training = model.training
    model.eval()
    noise = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
    results = {}
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        eps = None if not sample else (torch.randn(len(xb), model.latent_dim, device=x.device) if noise is None
                                       else torch.randn(len(xb), model.latent_dim, generator=noise).to(x.device))
        out = model(xb, eps=eps, sample=sample, decode=decode)
        parts = {"z": out.z, "dist": out.dist}
        if decode:
            parts["nll"], parts["mse"] = reconstruction_errors(xb, out.logits, model.likelihood)
        for k, v in parts.items():
            # written into one tensor for the whole set: no per-batch results (z = loc is a view that would
            # hold the head's whole output) left between the batch's freed temporaries to fragment the heap
            if k not in results:
                results[k] = v.new_empty((len(x), *v.shape[1:]))
            results[k][i:i + len(xb)] = v
    model.train(was_training)
    return results


def target_distribution(model: DPSOM, x: torch.Tensor, batch_size: int, sample: bool) -> torch.Tensor:
    """DEC target P (N, H*W) over a whole set, encoder only; a sampled z draws on training's RNG stream."""
    dist = infer(model, x, batch_size, sample, decode=False, noise_seed=None)["dist"]
    return DPSOM.target_distribution(model.soft_assign(dist))


@torch.no_grad()
def place(model: DPSOM, x: torch.Tensor, batch_size: int, sample: bool) -> dict:
    """Each sample's place on the map, encoded as `infer` does, as NumPy arrays: bmu (its node), row and column of
    the node on the grid, distance (Euclidean, to the BMU's prototype), q_bmu (q of the BMU) and q (N, H*W)."""
    dist = infer(model, x, batch_size, sample, decode=False)["dist"]          # (N, H*W)
    q = model.soft_assign(dist)                                                # (N, H*W)
    bmu = dist.argmin(1)
    W = model.som_dim[1]
    out = {"bmu": bmu, "row": bmu // W, "column": bmu % W, "distance": dist.gather(1, bmu[:, None]).squeeze(1).sqrt(),
           "q_bmu": q.gather(1, bmu[:, None]).squeeze(1), "q": q}
    return {k: v.cpu().numpy() for k, v in out.items()}


LABEL_METRICS = "NMI, purity, AMI, ARI, accuracy"


def evaluate_model(model: DPSOM, x: torch.Tensor, y: np.ndarray | None, batch_size: int,
                   sample: bool) -> tuple[dict, np.ndarray]:
    """Every evaluation number over every sample of the set, and the BMU of each sample (its cluster).

    Without labels (y None) the clustering numbers (LABEL_METRICS) are left out."""
    out = infer(model, x, batch_size, sample)
    dist = out["dist"]                                                 # (N, H*W)
    bmu = dist.argmin(1).cpu().numpy()
    metrics = {**(clustering_metrics(bmu, y, dist.shape[1]) if y is not None else {}),
               "nll": float(out["nll"].mean()), "mse": float(out["mse"].mean()),
               "quantization_error": quantization_error(dist),
               "topographic_error": topographic_error(dist, model.neighbours, model.neighbour_mask),
               **map_usage(bmu, dist.shape[1])}
    return metrics, bmu


# ---- the loop -----------------------------------------------------------------------------------------
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


def train(c: dict, data: dict, device: torch.device, logdir: str, run, resume: dict | None = None,
          how_to_continue: str | None = None) -> dict:
    """All three phases with one optimiser and one global step; returns the final metrics.

    how_to_continue: what a stop message tells the user (default: the resume command for logdir).
    """
    reuse_freed_memory()
    model = build_model({**c, "amp": amp_on(c, device)}).to(device)
    opt = make_optimizer(model, c)
    loss_fn = torch.compile(phase_loss) if c["compile"] else phase_loss   # one graph per phase, made at its start
    x_train = torch.as_tensor(data["x_train"], device=device)         # (N, 784), resident on the device
    x_eval = torch.as_tensor(data["x_eval"], device=device)
    B = c["batch_size"]
    steps_per_epoch = len(x_train) // B
    plan = epoch_plan(c)
    global_step, start, first_batch, targets = 0, 0, 0, None
    state = resume or (load_checkpoint(c["pretrain_path"]) if c["use_saved_pretrain"] else None)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        global_step, start, first_batch = state["global_step"], state["plan_index"], state["batch"]
    if resume is None and c["use_saved_pretrain"]:                     # joint training of this plan
        start, first_batch = c["epochs_pretrain"] + len(c["som_learning_rates"]) * c["som_epochs"], 0
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
    how_to_continue = how_to_continue or f"continue with: python dpsom.py with resume={logdir}"
    model.train()
    with StopRequest(f"the last checkpoint ({ckpt_path}, end of the last epoch) is kept; {how_to_continue}") as stop:
        for index in range(start, len(plan)):
            phase, base_lr = plan[index]
            started = time.perf_counter()
            epoch = [ph for ph, _ in plan[:index]].count(phase)        # epoch within its phase
            b0 = first_batch if index == start else 0
            if phase != bar_phase:
                if bar is not None:
                    bar.close()
                bar_phase, bar = phase, tqdm(total=[ph for ph, _ in plan].count(phase) * steps_per_epoch,
                                             initial=epoch * steps_per_epoch + b0, desc=phase, disable=None)
            if phase == "train" and (targets is None or b0 == 0):
                # DEC target over the whole train split and the monitoring set, once an epoch
                targets = (target_distribution(model, x_train, B, c["target_sample"]),
                           target_distribution(model, x_eval, B, c["target_sample"])[:B])
            p_train, p_mon = targets if phase == "train" else (None, None)
            stats, means = StepStats(), {"loss": float("nan")}   # no steps left when it stopped after the last
            for b in range(b0, steps_per_epoch):
                p = None if p_train is None else p_train[b * B:(b + 1) * B]
                lr = decayed_lr(base_lr, global_step, c["decay_factor"], c["decay_steps"])
                global_step += 1
                stats.add(train_step(model, opt, phase, x_train[b * B:(b + 1) * B], p, lr, loss_fn), global_step)
                bar.update(1)
                if global_step % c["log_every"] == 0 or b == steps_per_epoch - 1 or stop.signum:
                    stats.check(phase, epoch, ckpt_path)
                    means = stats.pop_means()
                    log.scalars(phase, {**means, "lr": lr, **monitor(model, phase, x_mon, p_mon)}, global_step)
                    bar.set_postfix(loss=f"{next(iter(means.values())):.4g}", refresh=False)
                if stop.signum:
                    save_checkpoint(ckpt_path, checkpoint_state(model, opt, c, global_step, index, b + 1, phase,
                                                                epoch, targets if phase == "train" else None))
                    log.writer.close()
                    raise Interrupted(f"stopped by signal {signal.Signals(stop.signum).name} in phase {phase}, "
                                      f"epoch {epoch}, global step {global_step}; checkpoint {ckpt_path}; "
                                      f"{how_to_continue}")
            last_of_phase = index + 1 == len(plan) or plan[index + 1][0] != phase
            if phase == "train" and (last_of_phase or (c["val_epochs"] and (epoch + 1) % 10 == 0)):
                metrics = evaluate_model(model, x_eval, data["y_eval"], B, c["eval_sample"])[0]
                log.scalars("eval", metrics, global_step)
            if last_of_phase or (phase == "train" and (epoch + 1) % PICTURE_EPOCHS == 0):
                encoded = infer(model, x_eval, B, c["eval_sample"], decode=False)   # the evaluation's z
                log_pictures(log, model, x_eval, data["y_eval"], encoded, c, phase, global_step,
                             projector=last_of_phase)
            state = checkpoint_state(model, opt, c, global_step, index + 1, 0, phase, epoch)
            save_checkpoint(ckpt_path, state)
            release_freed_memory()
            if phase == "som_init" and last_of_phase and c["save_pretrain"]:
                save_checkpoint(c["pretrain_path"], state)
            if bar.disable:   # no terminal (a file, nohup, Sacred's capture): one line an epoch instead of the bar
                print(progress_line(plan, index, epoch, steps_per_epoch - b0, B, time.perf_counter() - started,
                                    global_step, steps_per_epoch, means), flush=True)
    if bar is not None:
        bar.close()
    if not metrics:   # no joint epochs left to run: evaluate what the weights give
        metrics = evaluate_model(model, x_eval, data["y_eval"], B, c["eval_sample"])[0]
        log.scalars("eval", metrics, global_step)
    log.hparams(c, metrics)
    log.writer.close()
    return metrics


def progress_line(plan: list, index: int, epoch: int, steps: int, batch_size: int, seconds: float, global_step: int,
                  steps_per_epoch: int, means: dict) -> str:
    """phase, epoch/total, global step, the epoch's last logged loss, samples/s, and the time left at this pace."""
    phase = plan[index][0]
    left = (len(plan) - index - 1) * steps_per_epoch * seconds / max(steps, 1)
    return (f"{phase} epoch {epoch + 1}/{[ph for ph, _ in plan].count(phase)}  step {global_step}/"
            f"{len(plan) * steps_per_epoch}  loss {next(iter(means.values())):.4g}  "
            f"{steps * batch_size / seconds:.0f} samples/s  ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:"
            f"{int(left % 60):02d}")


@torch.no_grad()
def monitor(model: DPSOM, phase: str, x: torch.Tensor, p: torch.Tensor | None) -> dict:
    """The phase's loss on a fixed batch of the evaluation set, in eval mode.

    Its noise comes from a forked RNG, so monitoring leaves training's random stream (and resume) untouched.
    """
    model.eval()
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device], device_type=x.device.type):
        _, parts = phase_loss(model, phase, x, p)
    model.train()
    return {f"val_{k}": v for k, v in parts.items()}
