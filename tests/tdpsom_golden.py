"""A golden file of the TensorFlow original T-DPSOM (format: ../shared/parity-tdpsom/README.md) as the parity
checks read it (tdpsom_parity_checks.py, tdpsom_parity_steps.py), and the tolerances they hold the port to.

Tolerances, from u = 2^-24, float32's unit round-off (test_parity.py takes the same forward, loss and gradient
tolerances from its golden README and derives the step bounds the same way):
- Forward: |port - TF| <= FWD_RTOL * max|TF| of each tensor. Each is a few Dense layers deep, each layer a float32
  sum of up to 2000 terms; rounding errors of random sign grow like sqrt(n) u (45 u for n = 2000) of the sum's
  scale, and two implementations summing in different orders over the layers before a tensor stay within about
  four times that: 4 * 45 u ~ 1e-5. Integers (BMUs, indices) and the prototypes they pick are exact.
- Losses: relative |port - TF| <= LOSS_RTOL * C, C = sum|terms| / |sum of terms| (1 when all terms have one
  sign): a mean of up to N * H * W = 24,576 terms rounds by ~sqrt(n) u = 157 u ~ 1e-5 of its terms' sizes.
- Gradients: |port - TF| <= GRAD_RTOL * max|TF| per tensor: the backward pass runs the forward's sums again, so
  twice the forward's. KL(P||Q)'s gradient sums w_nj (z_n - E_j) over the nodes with sum_j w_nj ~ 0, which
  cancels |z| / |E| ~ 100 times over 256 terms: its float32 value is noise at ~100 * 16 u ~ 1e-4 of its max (the
  port in float32 and in float64 differ by 1.2e-4 here), hence COMMIT_GRAD_RTOL, as test_parity.py's. The joint
  loss's allowance is the sum of its terms': GRAD_RTOL * max|grad loss| + gamma * COMMIT_GRAD_RTOL * max|grad KL|.
- Weights after a step, entry by entry: 2 ulp of the weight (each side rounds w - update to float32 once), 16 u
  of the update (each side forms it through about eight float32 roundings), the gap between the two step sizes
  lr_t (TF1Adam forms the beta powers in float64, TF in float32: at t = 1, 1 - float32(0.999) = 0.0009999871 makes
  TF's sqrt(1 - beta2^t) 6.4e-6 smaller, which cancels TF's float32 1 - beta2 in v; TF1Adam's does not, so its
  first update is 6.7e-6 larger, relatively), and the spread of Adam's update over the gradients the gradient check
  allows: nothing where |g| is large, up to a flipped step where |g| is within the allowance of zero.
"""
import functools
import json
import re
from pathlib import Path

import numpy as np
import torch

from dpsom_model import load_tf_arrays, to_tf_layout
from parity_common import Check, close
from tdpsom_model import TDPSOM

TRAINED = ("loss", "loss_reconstruction_ze", "loss_a", "loss_prediction")   # the losses of the four train ops
PHASES = {"joint1": "loss", "joint2": "loss_prediction", "ae": "loss_reconstruction_ze", "som": "loss_a"}

U = 2.0 ** -24
FWD_RTOL = 1e-5
LOSS_RTOL = 1e-5
GRAD_RTOL = 2e-5
COMMIT_GRAD_RTOL = 1e-3


# ---- the file ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def golden(path: Path) -> tuple[dict, dict, dict, list[Check]]:
    """The file's arrays, its meta, the TF weights (name -> array, the recipe kernels regenerated from the seeds
    in meta) and the recipe checks."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    meta = json.loads(str(data["meta"]))
    arrays = {k[len("var/"):]: v for k, v in data.items() if k.startswith("var/") and "global_step" not in k}
    checks = []
    for name, r in meta["kernel_recipes"].items():
        lim = np.sqrt(6.0 / (r["fan_in"] + r["fan_out"]))          # Glorot-uniform limit, as the recipe states
        W = np.random.RandomState(r["seed"]).uniform(-lim, lim, size=(r["fan_in"], r["fan_out"])).astype(np.float32)
        checks += [close(f"recipe {name} first8", W.ravel()[:8], data[f"recipe/{name}/first8"]),
                   close(f"recipe {name} sum", W.sum(dtype=np.float64), data[f"recipe/{name}/sum"], atol=1e-9)]
        arrays[name] = W
    return data, meta, arrays, checks


def build(meta: dict) -> TDPSOM:
    """The reference's model with the file's sizes and weights; meta's dropout was inactive, hence none."""
    h = meta["hyper"]
    return TDPSOM(input_dim=meta["shapes"]["features"], latent_dim=h["latent_dim"], som_dim=h["som_dim"],
                  lstm_dim=h["lstm_dim"], alpha=h["alpha"], beta=h["beta"], gamma=h["gamma"], kappa=h["kappa"],
                  theta=h["theta"], eta=h["eta"], prior=h["prior"])


@functools.lru_cache(maxsize=1)
def loaded_model(path: Path) -> TDPSOM:
    """The model with the file's weights, built once (compare works on copies)."""
    _, meta, arrays, _ = golden(path)
    model = build(meta)
    load_tf_arrays(model, arrays)
    return model


def fed_lr(meta: dict, phase: str) -> float:
    """lr_val fed in a phase, read from meta's description of its feed."""
    feed = meta["steps"]["feeds_joint"] if phase.startswith("joint") else meta["steps"][phase]["feeds"]
    return float(re.search(r"lr_val=([0-9.eE+-]+)", feed)[1])


def tf_entries(data: dict, meta: dict, name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor in TF layout, flat; a large one (stored only at fixed flat indices) at those indices."""
    flat = to_tf_layout(t.detach()).reshape(-1)
    return flat[torch.from_numpy(data[f"idx/{name}"])] if name in meta["large"] else flat


def tf_grad(data: dict, meta: dict, loss: str, name: str) -> torch.Tensor:
    """TF's gradient, flat in TF layout (at idx for a large tensor), float64; 0 where TF had none."""
    return torch.from_numpy(data[f"gradsub/{loss}/{name}" if name in meta["large"] else f"grad/{loss}/{name}"]
                            .ravel()).double()


def max_abs(t) -> float:
    return float(torch.as_tensor(t).detach().abs().max())         # a tensor or an array


def near(quantity: str, got: torch.Tensor, ref: np.ndarray) -> Check:
    """A forward tensor within FWD_RTOL of the reference's largest |value|."""
    return close(quantity, got.detach(), ref, atol=FWD_RTOL * max_abs(ref))
