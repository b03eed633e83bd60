"""DPSOM's recipe for the plan runner (plan_runner.py): the model of a config, the plan of its three phases
(pretraining, SOM initialisation, joint training) and their losses, the DEC target distribution, inference over a
whole set and the evaluation numbers; `train` runs it.

Takes a config dict and a device from the experiment (dpsom.py) and never imports it; TensorBoard goes through
tb_logging.
"""
import sys

import numpy as np
import torch

from dpsom_model import DPSOM, MNIST_SHAPE
from fast_ops import has_bf16_arithmetic
from plan_runner import Epoch, run_plan
from tb_logging import PICTURE_EPOCHS, Logger, log_pictures
from utils import clustering_metrics, map_usage, quantization_error, reconstruction_errors, topographic_error


# ---- the model, its plan and its losses ----------------------------------------------------------------
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


def epoch_plan(c: dict) -> list[Epoch]:
    """Every epoch of the run, in order; each phase's one op is the phase itself (phase_loss's names).

    Pictures at the end of every phase and every PICTURE_EPOCHS joint epochs; the evaluation at the end, and
    every 10 joint epochs with val_epochs. P is recomputed at the start of every joint epoch.
    """
    som = [lr for lr in c["som_learning_rates"] for _ in range(c["som_epochs"])]
    J = c["num_epochs"]
    return ([Epoch("pretrain", c["learning_rate_pretrain"], ("pretrain",), pictures=e == c["epochs_pretrain"] - 1)
             for e in range(c["epochs_pretrain"])]
            + [Epoch("som_init", lr, ("som_init",), pictures=e == len(som) - 1) for e, lr in enumerate(som)]
            + [Epoch("train", c["learning_rate"], ("train",), targets=True,
                     evaluate=e == J - 1 or (c["val_epochs"] and (e + 1) % 10 == 0),
                     pictures=e == J - 1 or (e + 1) % PICTURE_EPOCHS == 0) for e in range(J)])


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


# ---- the run ------------------------------------------------------------------------------------------
class DPSOMRecipe:
    """DPSOM's part of plan_runner.run_plan. The save_pretrain file holds the weights after SOM initialisation;
    use_saved_pretrain starts at the first joint epoch."""
    save_pretrain_after, saved_pretrain_starts = "som_init", "train"

    def __init__(self, c: dict, y_eval: np.ndarray | None, device: torch.device):
        self.c, self.y_eval, self.device = c, y_eval, device
        self.plan = epoch_plan(c)
        self.phase_loss = phase_loss   # looked up now: a test may have replaced it

    def build_model(self) -> DPSOM:
        return build_model({**self.c, "amp": amp_on(self.c, self.device)}).to(self.device)

    def targets(self, model: DPSOM, x_train: torch.Tensor, x_eval: torch.Tensor) -> tuple:
        """DEC target over the whole train split and the monitoring batch (from P over the whole evaluation set)."""
        B, sample = self.c["batch_size"], self.c["target_sample"]
        return target_distribution(model, x_train, B, sample), target_distribution(model, x_eval, B, sample)[:B]

    def evaluate(self, model: DPSOM, x_eval: torch.Tensor) -> dict:
        return evaluate_model(model, x_eval, self.y_eval, self.c["batch_size"], self.c["eval_sample"])[0]

    def pictures(self, log: Logger, model: DPSOM, x_eval: torch.Tensor, phase: str, step: int,
                 end_of_phase: bool) -> None:
        encoded = infer(model, x_eval, self.c["batch_size"], self.c["eval_sample"], decode=False)   # the evaluation's z
        log_pictures(log, model, x_eval, self.y_eval, encoded, self.c, phase, step, projector=end_of_phase)


def train(c: dict, data: dict, device: torch.device, logdir: str, run, resume: dict | None = None,
          how_to_continue: str | None = None) -> dict:
    """All three phases with one optimiser and one global step; returns the final metrics.

    how_to_continue: what a stop message tells the user (default: the resume command for logdir).
    """
    return run_plan(DPSOMRecipe(c, data["y_eval"], device), c, data, device, logdir, run, resume,
                    how_to_continue or f"continue with: python dpsom.py with resume={logdir}")
