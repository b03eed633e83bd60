"""Parity of TDPSOM in the reference's numerics with golden outputs of the TensorFlow original (T-DPSOM).

Every tf_tdpsom*.npz in ../shared/parity-tdpsom (relative to the repository root) and in the folder named by
TDPSOM_PARITY_DIR is checked (tdpsom_parity_checks.py): its TF weights are loaded (two kernels regenerated from
the recipes in its meta), x, eps and p are fed, and the forward tensors (LSTM outputs and every Dense layer's input
included), all eleven losses, the gradients of the four trained losses (and where TF has none: the
stop-gradients), the weights after one run of each of the four train ops with one TF1Adam, and the eval-mode
forecast and decoder are compared. Hyperparameters come from each file's meta; the tolerances and their derivation
are in tdpsom_golden.py. Each tolerance is paired with wrong ports that must fail it (WRONG_PORTS).
`python tests/test_tdpsom_parity.py` prints the measured errors.
"""
import functools
import math
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conftest import missing  # noqa: E402
from parity_common import Check, summary  # noqa: E402
import tdpsom_model  # noqa: E402
from tdpsom_model import KerasLSTM, TDPSOM  # noqa: E402
from tdpsom_parity_checks import GROUPS, compare  # noqa: E402
import tdpsom_parity_steps  # noqa: E402
from tf1_adam import TF1Adam  # noqa: E402

SHARED_DIR = REPO / "../shared/parity-tdpsom"
EXTRA_DIR = Path(os.environ["TDPSOM_PARITY_DIR"]) if os.environ.get("TDPSOM_PARITY_DIR") else None
EXTRA_DIR = EXTRA_DIR if EXTRA_DIR is None or EXTRA_DIR.is_absolute() else REPO / EXTRA_DIR
FILES = sorted({p.resolve() for d in (SHARED_DIR, EXTRA_DIR) if d is not None for p in d.glob("tf_tdpsom*.npz")})
GOLDEN_MISSING = (f"no T-DPSOM golden files (tf_tdpsom*.npz) in {SHARED_DIR}"
                  + (f" or {EXTRA_DIR}" if EXTRA_DIR else "") + ": the T-DPSOM parity tests need the TensorFlow "
                  "original's outputs; put them there or set TDPSOM_PARITY_DIR (their format: the folder's README)")


def test_named_folder_holds_files():
    """A folder named by TDPSOM_PARITY_DIR must hold golden files: a typo there would test nothing from it."""
    if EXTRA_DIR is None:
        pytest.skip("TDPSOM_PARITY_DIR is not set")
    assert list(EXTRA_DIR.glob("tf_tdpsom*.npz")), f"TDPSOM_PARITY_DIR={EXTRA_DIR} holds no tf_tdpsom*.npz"


@functools.lru_cache(maxsize=None)
def full(path: Path) -> dict[str, list[Check]]:
    return compare(path)


@pytest.fixture(scope="module", params=FILES or [None], ids=[p.stem for p in FILES] or ["no-golden-files"])
def result(request) -> dict[str, list[Check]]:
    if request.param is None:
        missing(GOLDEN_MISSING)
    return full(request.param)


@pytest.mark.parametrize("group", GROUPS)
def test_parity(result, group):
    assert result[group], f"nothing compared for {group}"
    failures = [c.message() for c in result[group] if not c.ok]
    assert not failures, f"{len(failures)} {group} check(s) failed:\n" + "\n".join(failures)


# ---- wrong ports: each tolerance must reject a plausible mistake ------------------------------------
def runtime_forget_bias(self, x, state=None):
    """TF's LSTMCell adds forget_bias=1 in the cell; Keras' LSTM has it in the bias already: both would make 2."""
    H = self.hidden
    with torch.no_grad():
        self.bias[H:2 * H] += 1.0
    try:
        return REAL["lstm"](self, x, state)
    finally:
        with torch.no_grad():
            self.bias[H:2 * H] -= 1.0


def smoothness_to_own_bmu(self, z, k):
    """The smoothness term against each step's own BMU instead of the previous step's."""
    e = self.embeddings.view(-1, self.latent_dim)[k].detach()
    return -tdpsom_model.student_t(((z - e) ** 2).sum(-1), self.alpha).mean()


def dropping_last_target(self, z, pred_loc, pred_scale):
    """The port's own option "drop", which the reference does not have: only the T-1 real transitions count."""
    self.last_step_target = "drop"
    try:
        return REAL["prediction_loss"](self, z, pred_loc, pred_scale)
    finally:
        self.last_step_target = "self"


def kappa_as_beta(self, x, out, p):
    """The joint loss with the smoothness term weighted by beta (the SOM term's weight) instead of kappa."""
    total, parts = REAL["joint_loss"](self, x, out, p)
    return total + (self.beta - self.kappa) * parts["smooth"], parts


def grad_scaled(name):
    """The term's value unchanged, its gradient (of its first output) 1.01 times the true one."""
    def wrong(self, *args):
        v = REAL[name](self, *args)
        first = v[0] if isinstance(v, tuple) else v
        scaled = 1.01 * first - 0.01 * first.detach()
        return (scaled, *v[1:]) if isinstance(v, tuple) else scaled
    return wrong


def kl_weight_from_prior_val(self, x, out):
    """The ELBO with the KL weighted by train_model()'s annealed prior_val (0 at first) instead of the constant
    prior: the placeholder is fed but no op reads it (the golden README's "Semantics" 6)."""
    elbo, nll, kl = REAL["elbo"](self, x, out)
    return nll + 0.0 * kl, nll, kl


def zero_instead_of_none(self, closure=None):
    """Zero gradients where the train op's loss has none (zero_grad(set_to_none=False)): Adam then decays those
    variables' slots and moves them by their momentum; TF leaves them alone."""
    for p in (p for group in self.param_groups for p in group["params"] if p.grad is None):
        p.grad = torch.zeros_like(p)
    REAL["step"](self, closure)


def no_bias_correction(self, closure=None):
    for group in self.param_groups:                                  # cancels the correction TF1Adam applies
        t = self.global_step + 1
        group["lr"] = group["lr"] * (1 - group["betas"][0] ** t) / math.sqrt(1 - group["betas"][1] ** t)
    REAL["step"](self, closure)


def beta1_091(self, closure=None):
    for group in self.param_groups:
        group["betas"] = (0.91, group["betas"][1])
    REAL["step"](self, closure)


REAL = {"lstm": KerasLSTM.forward, "prediction_loss": TDPSOM.prediction_loss, "joint_loss": TDPSOM.joint_loss,
        "elbo": TDPSOM.elbo, "clustering_kl": TDPSOM.clustering_kl, "step": TF1Adam.step}
FWD_LOSSES = ("forward", "losses")
WRONG_PORTS = {   # name: (owner, attribute, wrong value, (groups, train ops) to run, checks that must fail)
    "sigmoid LSTM gates (nn.LSTM's)": (tdpsom_model, "hard_sigmoid", torch.sigmoid, (FWD_LOSSES + ("eval",), ()),
                                       ("pred_loc", "next_state", "act", "loss_prediction", "eval pred_loc")),
    "forget bias added in the cell": (KerasLSTM, "forward", runtime_forget_bias, (FWD_LOSSES, ()),
                                      ("pred_loc", "next_state", "loss_prediction")),
    "smoothness against the own BMU": (TDPSOM, "smoothness_loss", smoothness_to_own_bmu, (("losses",), ()),
                                       ("loss_smoothness",)),
    "kappa replaced by beta": (TDPSOM, "joint_loss", kappa_as_beta, (("losses", "grads"), ()), ("loss", "grad loss")),
    "last step's target dropped": (TDPSOM, "prediction_loss", dropping_last_target, (("losses", "grads"), ()),
                                   ("loss_prediction", "grad loss_prediction")),
    "KL(P||Q) gradient x 1.01": (TDPSOM, "clustering_kl", grad_scaled("clustering_kl"), (("grads",), ()),
                                 ("grad loss",)),
    "KL weighted by prior_val (0)": (TDPSOM, "elbo", kl_weight_from_prior_val, (("grads",), ()),
                                     ("grad loss_reconstruction_ze",)),
    "ELBO gradient x 1.01": (TDPSOM, "elbo", grad_scaled("elbo"), (("grads", "steps"), ("ae",)),
                             ("grad loss_reconstruction_ze", "ae weights")),
    "Adam without bias correction": (TF1Adam, "step", no_bias_correction, (("steps",), ("som",)), ("som weights",)),
    "Adam's beta1 0.91": (TF1Adam, "step", beta1_091, (("steps",), ("joint1",)), ("joint1 weights",)),
    "zero gradients instead of None": (TF1Adam, "step", zero_instead_of_none, (("steps",), ("joint1", "joint2")),
                                       ("joint2 unchanged", "joint2 slot m", "joint2 slot v")),
    "one Adam per train op": (tdpsom_parity_steps, "optimiser_for",
                              lambda phase, shared, model: TF1Adam(model.parameters()),
                              (("steps",), ("joint1", "joint2")),
                              ("joint2 learning rate", "joint2 beta2 power", "joint2 weights", "joint2 slot m")),
}


@pytest.mark.parametrize("wrong", WRONG_PORTS)
def test_wrong_ports_fail(wrong, monkeypatch):
    """The tolerances are tight enough to reject each of these ports, in the checks named."""
    if not FILES:
        missing(GOLDEN_MISSING)
    owner, attr, value, (groups, phases), must_fail = WRONG_PORTS[wrong]
    monkeypatch.setattr(owner, attr, value)
    checks = compare(FILES[0], groups, phases)
    failed = {c.quantity.split(" / ")[0] for group in checks.values() for c in group if not c.ok}
    assert set(must_fail) <= failed, f"{wrong}: only {sorted(failed)} failed"


if __name__ == "__main__":
    if not FILES:
        sys.exit(GOLDEN_MISSING)
    for path in FILES:
        print(f"\n{path.name}\n\n| quantity | max abs error | rel. to max abs ref | note |\n| --- | --- | --- | --- |")
        for row in summary(full(path)):
            print("| " + " | ".join(row) + " |")
