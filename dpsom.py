"""Train and evaluate DPSOM: a Sacred experiment with three phases sharing one optimiser and one step count.

    python dpsom.py with quick data_dir=path/to/idx_files
    python dpsom.py print_config
    tensorboard --logdir runs

Phases: 1 autoencoder pretraining (ELBO), 2 SOM initialisation (only the prototypes learn),
3 joint training (ELBO + KL(P||Q) + SOM loss, target distribution P recomputed every epoch).
"""
import csv
import ctypes
import json
import math
import os
import signal
import sys
import time
import uuid
import warnings
from datetime import datetime

import numpy as np
import torch
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")   # raised inside Sacred 0.8.7
from sacred import Experiment  # noqa: E402
from sacred.randomness import set_global_seed
from sacred.utils import SacredError, apply_backspaces_and_linefeeds
from google.protobuf import text_format
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from tqdm import tqdm

from checkpoint import (Interrupted, StopRequest, accelerator, checkpoint_state, load_checkpoint, restore_rng,
                        resumed_config, save_checkpoint)
from decay_scheduler import decayed_lr, set_lr
from dpsom_model import DPSOM, MNIST_SHAPE, check_conv_shape, has_bf16_arithmetic
from mnist_data import DATASETS, DataError, load_data
from user_data import CHANNELS, LIKELIHOODS, NORMALIZATIONS, Preprocessing, load_for_assign, load_user_data
from tf1_adam import TF1Adam
from utils import (clustering_metrics, heatmap, label_map, map_usage, node_statistics, picture_grid,
                   quantization_error, reconstruction_errors, topographic_error, u_matrix)

ex = Experiment("dpsom")
ex.captured_out_filter = apply_backspaces_and_linefeeds


@ex.config
def config():
    data_set = "MNIST"               # "MNIST" or "fMNIST"
    data_dir = "data"                # holds mnist/ and fashion-mnist/ with the 4 IDX .gz files each
    data_path = None                 # your own data instead of data_set: a .npz (x, optional y, x_test, y_test), .npy or .csv
    label_column = None              # the .csv column holding labels (None: no labels)
    channels = "auto"                # images (N, a, b, c): channels "first", "last", or "auto" (the smaller of a and c)
    likelihood = "bernoulli"         # "bernoulli" (values in [0, 1]) or "gaussian" (real values, unit variance)
    normalize = "max"                # "max" (each sample by its maximum, MNIST's), "minmax", "standard" (per feature), "none"
    component_planes = None          # vector data: features (names or indices) pictured over the map (None: the first 8)
    validation = False               # evaluate and monitor on the validation split (True) or the test set
    max_train_samples = None         # use only the first N training images (None: all 51,000)
    max_eval_samples = None          # evaluate and monitor on the first N images of the evaluation set only
    convolution = False              # convolutional encoder/decoder instead of the dense one
    latent_dim = 100                 # dimension of the latent space
    som_dim = [8, 8]                 # SOM grid, rows x columns
    toroidal = True                  # SOM neighbourhood wraps around the edges (the reference's grid)
    alpha = 10.0                     # Student's t degrees of freedom of the soft assignment q (not a loss weight)
    beta = 0.25                      # weight of the SOM loss
    gamma = 20                       # weight of the clustering loss KL(P||Q)
    theta = 1                        # weight of the ELBO
    prior = 0.5                      # weight of the KL term inside the ELBO
    prior_var = 1                    # standard deviation of the N(0, prior_var^2 I) prior
    dropout = 0.0                    # dropout after dense encoder layers 1 and 2 (the reference's was inactive)
    batch_size = 300                 # the last partial batch of each epoch is dropped
    epochs_pretrain = 15             # phase 1 epochs
    learning_rate_pretrain = 0.001   # phase 1 learning rate
    som_learning_rates = [0.9, 0.3, 0.1, 0.01]  # phase 2: one block of som_epochs per rate
    som_epochs = 5                   # phase 2 epochs per block
    num_epochs = 300                 # phase 3 epochs
    learning_rate = 0.001            # phase 3 learning rate
    decay_factor = 0.99              # lr *= decay_factor every decay_steps global steps (staircase)
    decay_steps = 1000               # the reference's effective value: its configured 5000 was never passed on
    val_epochs = False               # evaluate every 10 joint epochs as well as at the end
    seed = 2020                      # the reference's seed; Sacred seeds Python, NumPy and torch from it
    more_runs = False                # repeat the whole training n_runs times with seeds seed, seed+1, ...
    n_runs = 10                      # runs when more_runs is set; mean and std are reported
    # The training numerics are the reference's (README, Closing the purity gap: on dense MNIST they reach the
    # published purity, the diagonal posterior and the standard layers do not); `standard_layers` gives the modern
    # layers. Conv keeps the diagonal posterior: unmeasured here, and a full covariance is a 12544 x 5150 head.
    posterior = "diag" if convolution else "tril"   # "tril" (the reference's full covariance) or "diag" (mu, logvar)
    batchnorm = "frozen"             # "frozen" (the reference's: BN after the activation, stats 0/1) or "standard"
    leaky_logits = True              # LeakyReLU on the dense decoder's logits, as the reference had
    adam = "tf1"                     # "tf1" (TF1's bias correction over the global step) or "torch"
    target_sample = True             # DEC target P from one posterior sample (the reference's) instead of the mean
    eval_sample = False              # evaluate on one posterior sample (the reference's) instead of the mean
    device = "auto"                  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    compile = False                  # torch.compile each phase's loss (compiling takes a while at each phase's start)
    amp = False                      # bf16 products (encoder, decoder, head) on bf16 hardware; SOM, losses float32
    log_every = 50                   # steps between logged scalars (the only host syncs in the loop)
    arch = "conv" if convolution else "dense"
    data_name = os.path.splitext(os.path.basename(data_path))[0] if isinstance(data_path, str) else data_set  # for names
    logdir = os.path.join("runs", f"{datetime.now():%Y%m%d-%H%M%S}_{data_name}_{arch}_{uuid.uuid4().hex[:6]}")  # run folder
    save_pretrain = False            # save model and optimiser after phase 2 to pretrain_path
    use_saved_pretrain = False       # skip phases 1-2 by loading pretrain_path
    resume = None                    # checkpoint file or run folder to continue, with the checkpoint's config
    deterministic = False            # deterministic algorithms only (for GPUs; CPU runs already repeat bit for bit)
    som_grid = "x".join(map(str, som_dim)) if isinstance(som_dim, (list, tuple)) else som_dim  # for file names
    pretrain_path = os.path.join("runs", "pretrained", f"{data_name}_{arch}_{latent_dim}_{som_grid}.pt")
    checkpoint = None                # the evaluate command: checkpoint file or run folder to evaluate


@ex.named_config
def fmnist():
    data_set = "fMNIST"
    beta = 0.4      # the reference README's value for Fashion-MNIST


@ex.named_config
def conv():
    convolution = True


@ex.named_config
def quick():
    # About 5 minutes on a 2-core CPU: all training images, short phases, validation split, a 32-dim latent space
    # (seed 2020: purity 0.906, NMI 0.639; README, Measured). A joint lr of 0.002, which helped the standard
    # layers, makes the reference's numerics diverge here within 20 steps. The diagonal posterior: the full
    # covariance overtakes it only after about 90 joint epochs (here 7 min 20 s, purity 0.884, NMI 0.615)
    validation = True
    posterior = "diag"
    latent_dim = 32
    epochs_pretrain = 5
    som_epochs = 1
    num_epochs = 20


@ex.named_config
def tf_original():
    # the reference's numerics, to compare a run with the TensorFlow code
    posterior = "tril"
    batchnorm = "frozen"
    dropout = 0.0
    leaky_logits = True
    adam = "tf1"
    target_sample = True
    eval_sample = True


@ex.named_config
def standard_layers():
    # the port's first default: standard BatchNorm, dropout, plain logits, PyTorch's Adam, P from the posterior
    # mean, the diagonal posterior. Measured 0.03 purity below the reference's numerics on MNIST with the same
    # posterior, 0.04 below the default (README, Closing the purity gap)
    posterior = "diag"
    batchnorm = "standard"
    dropout = 0.4
    leaky_logits = False
    adam = "torch"
    target_sample = False
    eval_sample = False


# ---- configuration checks -----------------------------------------------------------------------------
class SetupError(SacredError, ValueError):
    """A config value or data file that cannot work: Sacred prints the message alone, without a traceback."""

    def __init__(self, message: str):
        super().__init__(message, print_traceback=False)


BOOLEAN_KEYS = ("validation", "convolution", "toroidal", "val_epochs", "more_runs", "leaky_logits", "eval_sample",
                "target_sample", "compile", "amp", "save_pretrain", "use_saved_pretrain", "deterministic")
ARCHITECTURE_KEYS = ("data_set", "convolution", "latent_dim", "som_dim", "posterior", "batchnorm", "adam", "data_path",
                     "likelihood", "normalize", "channels")
DATA_KEY_DEFAULTS = {"data_path": None, "label_column": None, "channels": "auto", "likelihood": "bernoulli",
                     "normalize": "max", "component_planes": None}   # what checkpoints older than these keys ran with


def check_config(c: dict, n_train: int | None = None) -> None:
    """Fail before training, naming the key, on a config value that cannot work."""
    def need(ok, key, what):
        if not ok:
            raise SetupError(f"config {key}={c[key]!r}: {what}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    need(c["data_path"] is not None or c["data_set"] in DATASETS, "data_set",
         f"must be one of {sorted(DATASETS)}, or give your own file with data_path=<file>")
    need(c["data_path"] is None or isinstance(c["data_path"], str), "data_path", "must be a file name")
    need(c["label_column"] is None or (isinstance(c["label_column"], str) and c["data_path"] is not None),
         "label_column", "names a column of the .csv given as data_path")
    need(c["channels"] in CHANNELS, "channels", f"must be one of {CHANNELS}")
    need(c["likelihood"] in LIKELIHOODS, "likelihood", f"must be one of {LIKELIHOODS}")
    need(c["normalize"] in NORMALIZATIONS, "normalize", f"must be one of {NORMALIZATIONS}")
    need(c["data_path"] is not None or c["normalize"] == "max", "normalize",
         "applies to data_path files; MNIST and Fashion-MNIST are always divided by each image's maximum")
    need(c["likelihood"] == "gaussian" or c["normalize"] != "standard", "normalize",
         "gives negative values, which likelihood='bernoulli' cannot model; use likelihood='gaussian' or "
         "normalize='minmax'")
    need(c["component_planes"] is None or (isinstance(c["component_planes"], (list, tuple)) and all(
        isinstance(v, (str, int)) and not isinstance(v, bool) for v in c["component_planes"])), "component_planes",
        "must be a list of feature names or indices, e.g. component_planes=[0,3,7]")
    need(isinstance(c["som_dim"], (list, tuple)) and len(c["som_dim"]) == 2
         and all(is_int(v) and v > 0 for v in c["som_dim"]), "som_dim", "must be two positive integers")
    for key in ("batch_size", "latent_dim", "decay_steps", "log_every"):
        need(is_int(c[key]) and c[key] > 0, key, "must be a positive integer")
    for key in ("epochs_pretrain", "som_epochs", "num_epochs"):
        need(is_int(c[key]) and c[key] >= 0, key, "must be a non-negative integer")
    for key in ("beta", "gamma", "theta", "prior", "learning_rate", "learning_rate_pretrain"):
        need(isinstance(c[key], (int, float)) and c[key] >= 0, key, "must be a non-negative number")
    need(isinstance(c["alpha"], (int, float)) and c["alpha"] > 0, "alpha", "degrees of freedom must be > 0")
    need(isinstance(c["prior_var"], (int, float)) and c["prior_var"] > 0, "prior_var", "a standard deviation must be > 0")
    need(isinstance(c["dropout"], (int, float)) and 0 <= c["dropout"] < 1, "dropout", "must be in [0, 1)")
    need(0 < c["decay_factor"] <= 1, "decay_factor", "must be in (0, 1]")
    need(isinstance(c["som_learning_rates"], (list, tuple))
         and all(isinstance(v, (int, float)) and v >= 0 for v in c["som_learning_rates"]),
         "som_learning_rates", "must be a list of non-negative numbers")
    for key in ("max_train_samples", "max_eval_samples"):
        need(c[key] is None or (is_int(c[key]) and c[key] > 0), key, "must be None or a positive integer")
    need(c["posterior"] in ("diag", "tril"), "posterior", "must be 'diag' or 'tril'")
    need(c["batchnorm"] in ("standard", "frozen"), "batchnorm", "must be 'standard' or 'frozen'")
    need(c["adam"] in ("torch", "tf1"), "adam", "must be 'torch' or 'tf1'")
    for key in BOOLEAN_KEYS:   # Sacred passes `key=false` as the string 'false', which would count as True
        need(isinstance(c[key], bool), key, "must be True or False (Python's spelling)")
    need(not c["more_runs"] or (is_int(c["n_runs"]) and c["n_runs"] > 0), "n_runs", "must be a positive integer")
    need(not c["use_saved_pretrain"] or os.path.exists(c["pretrain_path"]), "pretrain_path",
         "does not exist; run once with save_pretrain=True first")
    if c["use_saved_pretrain"] and n_train is None:
        saved = torch.load(c["pretrain_path"], map_location="cpu", weights_only=False)["config"]
        saved_value = lambda k: saved.get(k, DATA_KEY_DEFAULTS.get(k))
        differ = [f"{k}: saved {saved_value(k)!r}, now {c[k]!r}" for k in ARCHITECTURE_KEYS if saved_value(k) != c[k]]
        need(not differ, "pretrain_path", "was saved by another model (" + "; ".join(differ)
             + "); use those values, or save_pretrain=True with this config and another pretrain_path")
    if n_train is not None:
        need(c["batch_size"] <= n_train, "batch_size", f"is larger than the {n_train} training samples; use at most "
             f"{n_train}")


def pick_device(name: str) -> torch.device:
    """The device a config names; "auto" is CUDA where present. One that is absent here fails, naming the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SetupError(f"config device={name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    acc = accelerator(device)
    if acc is not None and not acc.is_available():
        raise SetupError(f"config device={name!r}: {device.type.upper()} is not available here; use device=cpu")
    if acc is not None and (device.index or 0) >= acc.device_count():
        raise SetupError(f"config device={name!r}: this machine has {acc.device_count()} {device.type.upper()} "
                         f"device(s), {device.type}:0 to {device.type}:{acc.device_count() - 1}")
    return device


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


# ---- training ---------------------------------------------------------------------------------------
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


def make_optimizer(model: DPSOM, c: dict) -> torch.optim.Optimizer:
    """The one optimiser of all three phases: TF1's Adam (the reference's) or PyTorch's, as c["adam"] says."""
    return (TF1Adam if c["adam"] == "tf1" else torch.optim.Adam)(model.parameters(), lr=c["learning_rate"])


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


class Logger:
    """One place that writes to TensorBoard (scalars, pictures, embeddings, hparams), and scalars to Sacred,
    under `<phase>/<name>`."""

    def __init__(self, logdir: str, run, purge_step: int | None = None):
        # purge_step: a resumed run hides what the interrupted one logged after its checkpoint
        self.writer, self.run = SummaryWriter(logdir, purge_step=purge_step), run

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for name, value in values.items():
            value = float(value)   # the only place tensors meet the host
            self.writer.add_scalar(f"{prefix}/{name}", value, step)
            if self.run is not None:
                self.run.log_scalar(f"{prefix}/{name}", value, step)

    def image(self, tag: str, picture, step: int) -> None:
        """A (channels, H, W) picture with values in [0, 1]."""
        self.writer.add_image(tag, picture, step)

    def embedding(self, tag: str, codes: torch.Tensor, labels: np.ndarray | None, nodes: np.ndarray,
                  images: torch.Tensor | None, step: int) -> None:
        """Latent codes (N, D) in the projector with each one's BMU node and label (if any), images (N, C, h, w)
        with C 1 or 3 (if any) as sprites."""
        config = os.path.join(self.writer.get_logdir(), "projector_config.pbtxt")
        if not hasattr(self.writer, "_projector_config") and os.path.exists(config):
            # add_embedding rewrites the file from this writer's entries: keep those of the run before a resume
            with open(config) as f:
                self.writer._projector_config = text_format.Parse(f.read(), ProjectorConfig())
        if labels is None:
            metadata, header = [int(n) for n in nodes], None
        else:
            metadata, header = [[str(a), int(n)] for a, n in zip(labels, nodes)], ["label", "node"]
        self.writer.add_embedding(codes, metadata=metadata, metadata_header=header, label_img=images,
                                  global_step=step, tag=tag)

    def hparams(self, config: dict, metrics: dict) -> None:
        """The config (paths left out, som_dim split into som_dim_h, som_dim_w) with the eval/... metrics in the
        HParams tab. Written into this run's folder; SummaryWriter.add_hparams would make a sub-run."""
        paths = ("data_dir", "logdir", "pretrain_path", "resume", "checkpoint", "preprocessing")
        values = {k: v for k, v in config.items() if k not in paths}
        values["som_dim_h"], values["som_dim_w"] = values.pop("som_dim")
        values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}  # lists, None
        for summary in hparams_summaries(values, {f"eval/{k}": v for k, v in metrics.items()}):
            self.writer.file_writer.add_summary(summary)   # the values are the eval/... scalars of this run


PICTURE_EPOCHS = 10       # joint epochs between pictures (and at the end of every phase)
PROJECTOR_SAMPLES = 3000  # first samples of the evaluation set shown in the embedding projector
PAIR_ROWS, PAIR_COLS = 4, 8
COMPONENT_PLANES = 8      # features pictured over the map by default (vector data)


def component_planes(c: dict, width: int) -> list[tuple[str, int]]:
    """(name, feature index) of the features pictured over the map: component_planes, or the first 8."""
    names = (c.get("preprocessing") or {}).get("feature_names") or [f"feature_{j}" for j in range(width)]
    requested = c.get("component_planes")
    if requested is None:
        return [(names[j], j) for j in range(min(COMPONENT_PLANES, width))]
    planes = []
    for v in requested:
        j = names.index(v) if isinstance(v, str) and v in names else v
        if not isinstance(j, int) or not 0 <= j < width:
            raise SetupError(f"config component_planes: {v!r} is not a feature; give names of {', '.join(names[:8])}"
                             f"{' ...' if width > 8 else ''} or indices 0 to {width - 1}")
        planes.append((names[j], j))
    return planes


@torch.no_grad()
def log_pictures(log: Logger, model: DPSOM, x: torch.Tensor, y: np.ndarray | None, c: dict, phase: str, step: int,
                 projector: bool) -> None:
    """The map as TensorBoard pictures under `<phase>/...`, from one encoder pass over the evaluation set (x, y)
    with the evaluation's z.

    Images: decoded_som, every prototype decoded, laid out as the H x W grid (RGB with 3 channels, else the
    channels' mean); reconstructions, rows of inputs of the set's first samples, each above its reconstruction
    (posterior mean). Vectors: component_planes/<feature>, each chosen feature's decoded value over the map.
    Both: hit_map and u_matrix, one cell per node, and with labels majority_label (faded as the node's purity falls)
    and node_purity; with `projector`, the latent codes of the first PROJECTOR_SAMPLES samples in the embedding
    projector.
    """
    out = infer(model, x, c["batch_size"], c["eval_sample"], decode=False)
    bmu = out["dist"].argmin(1).cpu().numpy()
    H, W = model.som_dim
    E = model.embeddings.view(H * W, -1)                                      # (H*W, D)
    shape = model.input_shape
    images = len(shape) == 3
    was_training = model.training
    model.eval()
    decoded = model.mean(model.decode(E))                                     # (H*W, F)
    if images:
        log.image(f"{phase}/decoded_som", picture_grid(decoded, shape, H, W), step)
        cols = min(PAIR_COLS, len(x))
        rows = min(PAIR_ROWS, len(x) // cols)
        inputs = x[:rows * cols]                                              # (rows*cols, F)
        recon = model.mean(model.decode(model.encode(inputs)[0]))
        pairs = torch.stack([inputs.view(rows, cols, -1), recon.view(rows, cols, -1)], 1)   # (rows, 2, cols, F)
        log.image(f"{phase}/reconstructions", picture_grid(pairs.view(rows * 2 * cols, -1), shape, 2 * rows, cols),
                  step)
    else:
        for name, j in component_planes(c, shape[0]):
            log.image(f"{phase}/component_planes/{name.replace('/', '_')}",
                      heatmap(decoded[:, j].view(H, W).cpu().numpy()), step)
    model.train(was_training)
    log.image(f"{phase}/hit_map", heatmap(np.bincount(bmu, minlength=H * W).reshape(H, W), lo=0), step)
    if y is not None:
        classes, codes = np.unique(y, return_inverse=True)
        if np.issubdtype(y.dtype, np.integer) and classes.min() >= 0 and classes.max() <= 9:
            codes = y                                                         # digits draw as themselves
        else:   # colours and glyphs of other labels are their codes 0, 1, ...: say which is which
            log.writer.add_text(f"{phase}/majority_label_codes", ", ".join(f"{k}: {c}" for k, c in enumerate(classes)),
                                step)
        hits, majority, purity = node_statistics(bmu, codes, H * W)
        log.image(f"{phase}/majority_label", label_map(majority.reshape(H, W), purity.reshape(H, W)), step)
        log.image(f"{phase}/node_purity", heatmap(np.where(hits > 0, purity, np.nan).reshape(H, W), lo=0, hi=1), step)
    u = u_matrix(E, model.neighbours, model.neighbour_mask)                  # (H*W,)
    log.image(f"{phase}/u_matrix", heatmap(u.view(H, W).cpu().numpy()), step)
    if projector:
        n = min(PROJECTOR_SAMPLES, len(x))
        sprites = (x[:n].view(n, *shape).cpu() if images and shape[0] in (1, 3) and model.likelihood == "bernoulli"
                   else None)                                                 # the projector shows [0, 1] images
        log.embedding(phase, out["z"][:n].cpu(), None if y is None else y[:n], bmu[:n], sprites, step)


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
                log_pictures(log, model, x_eval, data["y_eval"], c, phase, global_step, projector=last_of_phase)
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


def given_keys(run) -> set[str]:
    """The config keys set on the command line (or by config_updates), whatever their value."""
    updates = run.meta_info.get("options", {}).get("UPDATE") or []
    return set(run.config_modifications.modified) | {u.split("=", 1)[0] for u in updates if "=" in u}


def load_data_or_explain(c: dict, **sizes) -> dict:
    """x_train, y_train, x_eval, y_eval (labels None without them) and the Preprocessing: MNIST's, or the data_path
    file's, with the statistics c["preprocessing"] holds (a checkpoint's) or those of this training split."""
    try:
        if c["data_path"] is None:
            data = load_data(c["data_set"], c["data_dir"], c["validation"], **sizes)
            data["preprocessing"] = Preprocessing(MNIST_SHAPE, "max")
        else:
            data = load_user_data(c["data_path"], c["validation"], c["likelihood"], c["normalize"], c["channels"],
                                  c["label_column"], stored_preprocessing(c), **sizes)
    except DataError as e:
        raise SetupError(f"data: {e}") from None
    if c["convolution"]:
        try:
            check_conv_shape(data["preprocessing"].shape)
        except ValueError as e:
            raise SetupError(f"config {e}") from None
    return data


def stored_preprocessing(c: dict) -> Preprocessing | None:
    """The preprocessing a checkpoint's (or pretrain file's) config holds, or None before a run has one."""
    return Preprocessing.from_dict(c["preprocessing"]) if c.get("preprocessing") else None


def data_description(c: dict, pre: Preprocessing) -> str:
    return c["data_set"] if c["data_path"] is None else f"{c['data_path']} ({pre.describe()})"


def report_metrics(metrics: dict, labelled: bool) -> None:
    for name, value in metrics.items():
        print(f"  {name:<20}{value:>10.4f}" if isinstance(value, float) else f"  {name:<20}{value:>10}")
    if not labelled:
        print(f"  no labels: {LABEL_METRICS} skipped")


def saved_run(_config: dict, what: str) -> tuple[torch.device, dict]:
    """The device and the checkpoint that `checkpoint=` names, for the evaluate and assign commands."""
    if _config["checkpoint"] is None:
        raise SetupError(f"config checkpoint=None: give the checkpoint file or run folder {what}")
    device = pick_device(_config["device"])
    try:
        return device, load_checkpoint(_config["checkpoint"])
    except FileNotFoundError as e:
        raise SetupError(f"config checkpoint={_config['checkpoint']!r}: {e}") from None


@ex.command
def evaluate(_config: dict, _run) -> dict:
    """Evaluate a saved model without training: python dpsom.py evaluate with checkpoint=PATH [data_dir=...].

    The model and the evaluation settings (data set, validation or test set, max_eval_samples, eval_sample,
    batch size) are the checkpoint's own, so the numbers are its run's; device is this command's, and data_dir
    too where given (else the run's). `validation` and `eval_sample`, where given, choose another set (a run
    monitored on the validation split, evaluated on the test set) or the posterior mean instead of a sample.
    Prints every number and writes evaluation_<set>.json (the numbers) and evaluation_<set>.npz (per-sample
    bmu and label) into the checkpoint's run folder; "_mean" or "_sample" is added to the name where
    eval_sample differs from the run's.
    """
    device, state = saved_run(_config, "to evaluate")
    chosen = {k: _config[k] for k in ("validation", "eval_sample") if k in given_keys(_run)}
    ignored = sorted(k for k in given_keys(_run) - {"checkpoint", "data_dir", "data_path", "device", *chosen}
                     if state["config"].get(k, _config[k]) != _config[k])
    if ignored:
        print(f"evaluate uses the checkpoint's own config; ignored: "
              + ", ".join(f"{k}={_config[k]!r} (checkpoint: {state['config'][k]!r})" for k in ignored))
    moved = {k: _config[k] for k in ("data_dir", "data_path") if k in given_keys(_run)}   # the files may have moved
    c = {**_config, **DATA_KEY_DEFAULTS, **state["config"], **moved, **chosen}   # keys the checkpoint predates
    model = build_model({**c, "amp": amp_on(c, device)}).to(device)               # keep their defaults
    model.load_state_dict(state["model"])
    data = load_data_or_explain(c, max_eval_samples=c["max_eval_samples"])
    x = torch.as_tensor(data["x_eval"], device=device)
    metrics, bmu = evaluate_model(model, x, data["y_eval"], c["batch_size"], c["eval_sample"])
    split = "validation" if c["validation"] else "test"
    code = "a posterior sample" if c["eval_sample"] else "the posterior mean"
    print(f"{state['path']}: phase {state['phase']}, global step {state['global_step']}, "
          f"{len(x)} {data_description(c, data['preprocessing'])} {split} samples, encoded as {code}")
    report_metrics(metrics, data["y_eval"] is not None)
    own = c["eval_sample"] == state["config"].get("eval_sample", c["eval_sample"])
    name = f"evaluation_{split}" + ("" if own else "_sample" if c["eval_sample"] else "_mean")
    stem = os.path.join(os.path.dirname(os.path.abspath(state["path"])), name)
    with open(stem + ".json", "w") as f:
        json.dump({"checkpoint": os.path.abspath(state["path"]), "global_step": state["global_step"], "set": split,
                   "eval_sample": c["eval_sample"], "samples": len(x), "metrics": metrics}, f, indent=2)
    np.savez(stem + ".npz", bmu=bmu, **({} if data["y_eval"] is None else {"label": data["y_eval"]}))
    print(f"wrote {stem}.json and {stem}.npz")
    return metrics


@ex.command
def assign(_config: dict, _run) -> dict:
    """Place samples on a trained map: python dpsom.py assign with checkpoint=RUN data_path=FILE.

    Every sample of the file's x is transformed with the checkpoint's stored preprocessing and encoded as the
    run's evaluation does (posterior mean, or its seeded sample with eval_sample). Writes assignments.csv (per
    sample: BMU index, grid row and column, Euclidean distance to the BMU, q of the BMU, label where the file has
    labels) and assignments.npz (the same with the whole soft assignment q, (N, nodes)) into the checkpoint's run
    folder.
    """
    if _config["data_path"] is None:
        raise SetupError("config data_path=None: give the file holding the samples to place (.npz, .npy or .csv)")
    device, state = saved_run(_config, "of the trained map")
    c = {**_config, **DATA_KEY_DEFAULTS, **state["config"]}
    pre = stored_preprocessing(c) or Preprocessing(MNIST_SHAPE, "max")   # checkpoints older than own data: MNIST
    given = given_keys(_run)
    channels = _config["channels"] if "channels" in given else c["channels"]
    # the run's label column, where the new file has it too; a label_column given here must exist
    label_column = _config["label_column"] if "label_column" in given else c["label_column"]
    try:
        x, y = load_for_assign(_config["data_path"], pre, c["likelihood"], channels, label_column,
                               label_optional="label_column" not in given)
    except DataError as e:
        raise SetupError(f"data: {e}") from None
    model = build_model({**c, "amp": amp_on(c, device)}).to(device)
    model.load_state_dict(state["model"])
    dist = infer(model, torch.as_tensor(x, device=device), c["batch_size"], c["eval_sample"], decode=False)["dist"]
    q = model.soft_assign(dist)                                                # (N, H*W)
    bmu = dist.argmin(1)
    W = model.som_dim[1]
    out = {"bmu": bmu, "row": bmu // W, "column": bmu % W,
           "distance": dist.gather(1, bmu[:, None]).squeeze(1).sqrt(), "q_bmu": q.gather(1, bmu[:, None]).squeeze(1)}
    out = {k: v.cpu().numpy() for k, v in out.items()}
    labels = {} if y is None else {"label": y}
    folder = os.path.dirname(os.path.abspath(state["path"]))
    stem = os.path.join(folder, "assignments")
    np.savez(stem + ".npz", **out, q=q.cpu().numpy(), **labels, source=os.path.abspath(_config["data_path"]))
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", *out, *labels])
        columns = [out["bmu"], out["row"], out["column"], out["distance"].tolist(), out["q_bmu"].tolist(),
                   *labels.values()]
        writer.writerows(zip(range(len(x)), *columns))
    print(f"placed {len(x)} samples of {_config['data_path']} on the {model.som_dim[0]}x{W} map of {state['path']}; "
          f"{int((np.bincount(out['bmu'], minlength=q.shape[1]) > 0).sum())} nodes hit; wrote {stem}.csv and {stem}.npz")
    return {"samples": len(x), "path": stem}


@ex.main
def main(_config: dict, _run) -> dict:
    c = dict(_config)
    resume = None
    if c["resume"] is not None:   # the run continues with its checkpoint's config, in its own folder
        if c["more_runs"] is True and "more_runs" in given_keys(_run):
            raise SetupError("config resume: cannot be combined with more_runs=True; resume one run's folder")
        try:
            resume = load_checkpoint(c["resume"])
        except FileNotFoundError as e:
            raise SetupError(f"config resume={c['resume']!r}: {e}") from None
        try:
            c = resumed_config(resume["config"], c, given_keys(_run))
        except ValueError as e:
            raise SetupError(str(e)) from None
        c["logdir"] = os.path.dirname(os.path.abspath(resume["path"]))
        print(f"resuming {resume['path']}: phase {resume['phase']}, global step {resume['global_step']}")
    check_config(c)
    device = pick_device(c["device"])
    _run.info.update(threads=torch.get_num_threads(), device=str(device),   # in Sacred's record: what repeats a run
                     device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    if c["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it before its first call
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    runs = [("", c["seed"])] if not c["more_runs"] else [(f"run{i}", c["seed"] + i) for i in range(c["n_runs"])]
    for sub, _ in runs:
        taken = os.path.join(c["logdir"], sub, "checkpoint.pt")
        if resume is None and os.path.exists(taken):
            raise SetupError(f"config logdir={c['logdir']!r}: {taken} holds another run; continue it with "
                             f"resume={os.path.dirname(taken)}, or choose another logdir (the default is a new folder)")
    if resume is None and c["use_saved_pretrain"]:   # pretrained weights keep the normalisation they learnt with
        saved = torch.load(c["pretrain_path"], map_location="cpu", weights_only=False)["config"]
        c["preprocessing"] = saved.get("preprocessing")
    data = load_data_or_explain(c, max_train_samples=c["max_train_samples"], max_eval_samples=c["max_eval_samples"])
    check_config(c, n_train=len(data["x_train"]))
    pre = data["preprocessing"]
    c["input_shape"], c["preprocessing"] = pre.shape, pre.to_dict()   # kept in the checkpoint with the config
    if not pre.is_image:
        component_planes(c, pre.shape[0])                             # a wrong feature name fails now, not later
    print(f"DPSOM on {data_description(c, pre)} ({c['arch']}), {len(data['x_train'])} training samples, "
          f"{len(data['x_eval'])} {'validation' if c['validation'] else 'test'} samples, device {device}, "
          f"logdir {c['logdir']}")
    if data["y_eval"] is None:
        print(f"no labels for the evaluation set: the run reports reconstruction, quantization and topographic "
              f"error and map usage; {LABEL_METRICS} are skipped")
    results = []
    for i, (sub, seed) in enumerate(runs):
        logdir = os.path.join(c["logdir"], sub) if sub else c["logdir"]
        hint = None
        if c["more_runs"]:   # each run is exactly the single run with its seed
            set_global_seed(seed)
            later = ", ".join(str(s) for _, s in runs[i + 1:])
            hint = (f"continue this run ({i + 1} of {len(runs)}, seed {seed}) with: python dpsom.py with resume={logdir}"
                    + (f"; the runs with seeds {later} were not started" if later else ""))
        try:
            results.append(train({**c, "seed": seed}, data, device, logdir, _run, resume, hint))
        except (RuntimeError, OSError) as e:
            if not is_transient(e):
                raise
            raise TransientFailure(f"{type(e).__name__}: {e}\nthe last checkpoint in {logdir} is kept; "
                                   f"{hint or f'continue with: python dpsom.py with resume={logdir}'}") from e
    result = results[0]
    if c["more_runs"]:
        result = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
        result.update({f"{k}_std": float(np.std([r[k] for r in results])) for k in results[0]})
        result["runs"] = results
    path = os.path.join(c["logdir"], "result.json")                  # what a sweep collects: never half a file
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    print("  ".join(f"{k}: {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    if data["y_eval"] is None:
        print(f"no labels: {LABEL_METRICS} skipped")
    return result


if __name__ == "__main__":
    try:
        ex.run_commandline()
    except Interrupted as e:   # a checkpoint was written (or, after a second signal, the last one is kept)
        print(e, file=sys.stderr)
        sys.exit(130)
    except TransientFailure as e:
        print(e, file=sys.stderr)
        sys.exit(TRANSIENT)
