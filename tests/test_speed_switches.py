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
from torch.utils._python_dispatch import TorchDispatchMode

import dpsom
from dpsom_model import DPSOM
from mnist_data import load_data
import training

PHASES = ("pretrain", "som_init", "train")
DEVICE = torch.device(os.environ.get("DPSOM_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def batch(data_dir) -> torch.Tensor:
    return torch.as_tensor(load_data("MNIST", data_dir, True, max_train_samples=600)["x_train"][:64], device=DEVICE)


def make(convolution: bool, named: tuple = ()) -> DPSOM:
    training.amp_on({"amp": False}, DEVICE)      # a GPU's float32 as a run's (TF32 off), whatever ran before
    torch.manual_seed(0)
    config = dpsom.ex.run("print_config", config_updates={"convolution": convolution}, named_configs=named,
                          options={"--loglevel": "ERROR"}).config if named else dpsom.config(fixed={"convolution": convolution})
    return training.build_model({**config, "latent_dim": 16}).to(DEVICE)


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


def amp_mismatches(model: DPSOM, x: torch.Tensor, p: torch.Tensor) -> list:
    """The phases, loss parts and gradients where amp leaves the README's bounds, from one pass of each phase
    without and with amp (noise seeded identically); empty where amp computes what float32 does."""
    bad = []
    for phase in PHASES:
        model.amp = False
        ref, ref_g = losses_and_grads(model, training.phase_loss, phase, x, p)
        model.amp = True
        got, got_g = losses_and_grads(model, training.phase_loss, phase, x, p)
        model.amp = False
        bad += [(phase, k, ref[k], got[k]) for k in ref
                if not relative(ref[k], got[k]) <= (2e-2 if k in CANCELLING else 1e-3)]
        if ref_g.keys() != got_g.keys():                          # the same parameters learn
            bad.append((phase, "parameters with a gradient"))
        elif phase != "som_init":   # its gradient follows each sample's BMU, an argmin bf16 rounding may flip on near ties
            a = torch.cat([g.flatten() for g in ref_g.values()])
            b = torch.cat([got_g[n].flatten() for n in ref_g])
            if not torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.99:
                bad.append((phase, "gradient cosine"))
    # What amp keeps in float32 is exactly float32: from an amp forward's z, its distances, q and every loss
    # equal those computed with amp off.
    with torch.no_grad():
        model.amp = True
        out = model(x)
        amp_parts = model.joint_loss(x, out, p)[1]
        model.amp = False
        parts = model.joint_loss(x, out, p)[1]
        exact = {"dist": (out.dist, model.distances(out.z)), "q": (out.q, model.soft_assign(out.dist)),
                 **{k: (amp_parts[k], parts[k]) for k in parts}}
    return bad + [("float32", k) for k, (a, b) in exact.items() if a.dtype != torch.float32 or not torch.equal(a, b)]


def batch_for(batch: torch.Tensor, convolution: bool) -> torch.Tensor:
    return batch[:16] if convolution and DEVICE.type == "cpu" else batch   # conv on a CPU: a smaller batch


@pytest.mark.parametrize("convolution", [False, True], ids=["dense", "conv"])
def test_amp_gives_the_float32_losses(batch, convolution):
    x = batch_for(batch, convolution)
    model = make(convolution)
    assert amp_mismatches(model, x, target(model, x)) == []


def autocast_bf16(method):
    """The method run inside bf16 autocast: its products in bf16, as if it sat in the encoder's autocast block."""
    def wrapped(self, *args):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=self.amp):
            return method(self, *args)
    return wrapped


def bf16_inputs(method):
    """The method fed bf16 copies of its tensors under amp, as if a cast back to float32 had been left out."""
    def wrapped(self, *args):
        return method(self, *(a.to(torch.bfloat16) if self.amp else a for a in args))
    return wrapped


# Casts that amp must not make: each moves some part of the comparison outside its bound.
WRONG_CASTS = {"SOM distances in bf16": ("distances", autocast_bf16), "q from bf16 distances": ("soft_assign", bf16_inputs),
               "likelihood of bf16 logits": ("nll", bf16_inputs), "prior KL of a bf16 posterior": ("kl_prior", bf16_inputs)}


@pytest.mark.parametrize("wrong", WRONG_CASTS)
def test_a_wrong_cast_fails_the_amp_checks(batch, monkeypatch, wrong):
    name, cast = WRONG_CASTS[wrong]
    monkeypatch.setattr(DPSOM, name, cast(getattr(DPSOM, name)))
    model = make(False)
    assert amp_mismatches(model, batch, target(model, batch)) != []


class MatmulDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matrix product, keyed by the operands' (rows, inner, columns)."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            a, b = args[-2:]
            self.seen.setdefault((a.shape[-2], a.shape[-1], b.shape[-1]), set()).add(a.dtype)
        return func(*args, **(kwargs or {}))


def test_amp_runs_the_products_in_bfloat16_and_returns_float32(batch):
    model = training.build_model({**dpsom.config(fixed={}), "latent_dim": 16, "amp": True}).to(DEVICE)   # the config key
    p = target(model, batch)
    with MatmulDtypes() as products:
        total, _ = training.phase_loss(model, "train", batch, p)
        total.backward()
    B, F, O, K = len(batch), 2000, model.head.out_features, 64   # batch, features, head outputs, SOM nodes
    head = [(B, F, O), (B, O, F), (O, B, F)]                    # forward, input gradient, weight gradient
    assert all(products.seen[k] == {torch.bfloat16} for k in head + [(B, 784, 500), (B, 16, 2000)])   # + encoder, decoder
    assert products.seen[(B, 16, K)] == {torch.float32}         # the SOM distances
    out = model(batch)
    assert out.loc.dtype == out.z.dtype == out.logits.dtype == out.dist.dtype == torch.float32
    assert all(q.dtype == q.grad.dtype == torch.float32 for q in model.parameters())   # what the optimiser sees


def test_compile_gives_the_eager_losses_and_gradients(batch, monkeypatch):
    # Random ops inside the compiled graph draw from the eager generator, so both see the same noise.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    model = make(False, ("standard_layers",))                   # dropout on: its masks must match too
    p = target(model, batch)
    compiled = torch.compile(training.phase_loss)
    for phase in PHASES:
        ref, ref_g = losses_and_grads(model, training.phase_loss, phase, batch, p)
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
        assert fn is training.phase_loss
        return wrapped

    monkeypatch.setattr(training.torch, "compile", fake_compile)
    c = {**dpsom.config(fixed={}), "latent_dim": 10, "batch_size": 100, "epochs_pretrain": 1, "som_epochs": 1,
         "som_learning_rates": [0.5], "num_epochs": 1, "compile": True, "amp": True}
    data = load_data("MNIST", data_dir, True, max_train_samples=300, max_eval_samples=300)
    metrics = training.train(c, data, DEVICE, str(tmp_path), None)
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values())
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["config"]["amp"] is True
    assert calls == ["pretrain"] * 3 + ["som_init"] * 3 + ["train"] * 3


def test_amp_runs_float32_where_the_cpu_has_no_bf16_arithmetic(monkeypatch, capsys):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, "avx2": True})
    assert training.amp_on({"amp": True}, cpu) is False
    assert "no bf16 arithmetic" in capsys.readouterr().err
    for unit in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {unit: True})
        assert training.amp_on({"amp": True}, cpu) is True
    assert training.amp_on({"amp": False}, cpu) is False
    assert capsys.readouterr().err == ""
