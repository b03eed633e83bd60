"""The speed switches `amp` (bf16 autocast) and `compile` (torch.compile) give the losses of the plain model.

Each phase's loss on one fixed batch of real MNIST, with the same weights and the same noise, is compared
with and without the switch; so are the gradients it sends to the parameters.
Tolerances (stated in the README): amp, every loss part within 1e-3 relative (the clustering KL and the prior
KL, small differences of nearly equal numbers, within 2e-2) and, where the gradient is smooth (not the BMU-driven SOM
initialisation), a gradient cosine similarity >= 0.99; compile,
every part within 1e-5 relative and every gradient within 1e-4 of its tensor's largest entry
(plus 1e-6 of the largest gradient anywhere).
Set DPSOM_TEST_DEVICE=cuda to run these checks on a GPU (its bf16 and compiled kernels are not the CPU's).
"""
import os

import pytest
import torch

import dpsom
from dpsom_model import DPSOM
from mnist_data import load_data

PHASES = ("pretrain", "som_init", "train")
DEVICE = torch.device(os.environ.get("DPSOM_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def batch(data_dir) -> torch.Tensor:
    return torch.as_tensor(load_data("MNIST", data_dir, True, max_train_samples=600)["x_train"][:64], device=DEVICE)


def make(convolution: bool, named: tuple = ()) -> DPSOM:
    torch.manual_seed(0)
    config = dpsom.ex.run("print_config", config_updates={"convolution": convolution}, named_configs=named,
                          options={"--loglevel": "ERROR"}).config if named else dpsom.config(fixed={"convolution": convolution})
    return dpsom.build_model({**config, "latent_dim": 16}).to(DEVICE)


def losses_and_grads(model: DPSOM, loss_fn, phase: str, x: torch.Tensor, p: torch.Tensor):
    """Loss parts (floats) and per-parameter gradients of one phase on x, noise seeded identically."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    total, parts = loss_fn(model, phase, x, p if phase == "train" else None)
    total.backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    return {k: v.item() for k, v in parts.items()}, grads


def target(model: DPSOM, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return DPSOM.target_distribution(model(x).q)


# Small differences of nearly equal numbers, whose relative error bf16 inputs multiply: the clustering KL, and
# the prior KL near the prior (each dimension's exp(logvar) - 1 - logvar, with logvar near 0 at initialisation).
CANCELLING = ("cah", "kl")


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


@pytest.mark.parametrize("convolution", [False, True], ids=["dense", "conv"])
def test_amp_gives_the_float32_losses(batch, convolution):
    x = batch[:16] if convolution and DEVICE.type == "cpu" else batch   # conv on a CPU: a smaller batch
    model = make(convolution)
    p = target(model, x)
    for phase in PHASES:
        model.amp = False
        ref, ref_g = losses_and_grads(model, dpsom.phase_loss, phase, x, p)
        model.amp = True
        got, got_g = losses_and_grads(model, dpsom.phase_loss, phase, x, p)
        for k in ref:
            assert relative(ref[k], got[k]) <= (2e-2 if k in CANCELLING else 1e-3), (phase, k, ref[k], got[k])
        assert ref_g.keys() == got_g.keys(), phase                # the same parameters learn
        if phase == "som_init":
            continue   # its gradient follows each sample's BMU, an argmin that bf16 rounding may flip on near ties
        a = torch.cat([g.flatten() for g in ref_g.values()])
        b = torch.cat([got_g[n].flatten() for n in ref_g])
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.99, phase


def test_amp_runs_the_layers_in_bfloat16_and_returns_float32(batch):
    model = dpsom.build_model({**dpsom.config(fixed={}), "latent_dim": 16, "amp": True}).to(DEVICE)   # the config key
    seen = []
    hook = model.encoder[0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = model(batch)
    hook.remove()
    assert seen == [torch.bfloat16]                              # the switch really changes the arithmetic
    assert out.loc.dtype == out.z.dtype == out.logits.dtype == out.dist.dtype == torch.float32


def test_compile_gives_the_eager_losses_and_gradients(batch, monkeypatch):
    # Random ops inside the compiled graph draw from the eager generator, so both see the same noise.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    model = make(False, ("standard_layers",))                   # dropout on: its masks must match too
    p = target(model, batch)
    compiled = torch.compile(dpsom.phase_loss)
    for phase in PHASES:
        ref, ref_g = losses_and_grads(model, dpsom.phase_loss, phase, batch, p)
        got, got_g = losses_and_grads(model, compiled, phase, batch, p)
        for k in ref:
            assert relative(ref[k], got[k]) <= 1e-5, (phase, k, ref[k], got[k])
        assert ref_g.keys() == got_g.keys(), phase
        scale = max(g.abs().max() for g in ref_g.values())
        for n, g in ref_g.items():   # floor: a bias before BatchNorm has a gradient of rounding noise only
            assert (g - got_g[n]).abs().max() <= 1e-4 * g.abs().max() + 1e-6 * scale, (phase, n)
    torch._dynamo.reset()


def test_train_uses_the_compiled_loss_and_amp(tmp_path, data_dir, monkeypatch):
    """compile=True routes every optimiser step through torch.compile(phase_loss) (recorded, not compiled);
    amp=True trains all three phases to finite numbers."""
    calls = []

    def fake_compile(fn):
        def wrapped(*args):
            calls.append(args[1])
            return fn(*args)
        assert fn is dpsom.phase_loss
        return wrapped

    monkeypatch.setattr(dpsom.torch, "compile", fake_compile)
    c = {**dpsom.config(fixed={}), "latent_dim": 10, "batch_size": 100, "epochs_pretrain": 1, "som_epochs": 1,
         "som_learning_rates": [0.5], "num_epochs": 1, "compile": True, "amp": True}
    data = load_data("MNIST", data_dir, True, max_train_samples=300, max_eval_samples=300)
    metrics = dpsom.train(c, data, DEVICE, str(tmp_path), None)
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values())
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["config"]["amp"] is True
    assert calls == ["pretrain"] * 3 + ["som_init"] * 3 + ["train"] * 3
