"""Loss terms against values computed by hand (explicit loops), invariants and gradient routing."""
import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from dpsom_model import DPSOM
from som import grid_neighbours
from fast_ops import TRIL_DIAG_SHIFT, VML_OPS, FillScaleTriL, fill_scale_tril_indices, tril_fill_index
from tf1_adam import CHUNK, TF1Adam



@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons with the float64 hand computations below; restored after each test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tiny(**kw) -> DPSOM:
    """2x3 map, latent 3, with prototypes set to known values."""
    m = DPSOM(latent_dim=3, som_dim=(2, 3), dropout=0.0, **kw)
    with torch.no_grad():
        m.embeddings.copy_(torch.tensor([[[0., 0, 0], [1, 0, 0], [2, 0, 0]],
                                         [[0, 1, 0], [1, 1, 0], [2, 1, 1]]]))
    return m


Z = torch.tensor([[0.1, 0.2, -0.1], [1.9, 0.8, 0.7]], dtype=torch.float64)   # 2 samples


def hand_q(z, E, alpha):
    d = np.array([[sum((z[i][k] - e[k]) ** 2 for k in range(3)) for e in E] for i in range(len(z))])
    k = 1e-7 + (1 + d / alpha) ** (-(alpha + 1) / 2)
    return d, k / k.sum(1, keepdims=True)


def test_distances_and_q_by_hand():
    m = tiny(alpha=10.0)
    E = m.embeddings.detach().reshape(6, 3).tolist()
    d, q = hand_q(Z.tolist(), E, 10.0)
    assert d[0, 0] == pytest.approx(0.01 + 0.04 + 0.01)
    assert d[1, 5] == pytest.approx(0.01 + 0.04 + 0.09)
    np.testing.assert_allclose(m.distances(Z).detach().numpy(), d, rtol=1e-12)
    q_t = m.soft_assign(m.distances(Z)).detach().numpy()
    np.testing.assert_allclose(q_t, q, rtol=1e-12)
    np.testing.assert_allclose(q_t.sum(1), 1.0, rtol=1e-12)
    assert q_t[0].argmax() == 0 and q_t[1].argmax() == 5        # nearest prototypes


def test_alpha_changes_the_kernel_not_a_weight():
    m1, m2 = tiny(alpha=1.0), tiny(alpha=10.0)
    _, q1 = hand_q(Z.tolist(), m1.embeddings.detach().reshape(6, 3).tolist(), 1.0)
    np.testing.assert_allclose(m1.soft_assign(m1.distances(Z)).detach().numpy(), q1, rtol=1e-12)
    assert not np.allclose(q1, m2.soft_assign(m2.distances(Z)).detach().numpy())


def test_target_distribution_by_hand():
    q = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    f = [0.7 + 0.1 + 0.5, 0.2 + 0.6 + 0.25, 0.1 + 0.3 + 0.25]
    raw = [[q[i, j].item() ** 2 / f[j] for j in range(3)] for i in range(3)]
    expected = [[v / sum(r) for v in r] for r in raw]
    p = DPSOM.target_distribution(q)
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-12)
    assert p[0, 0] > q[0, 0]                                   # sharpens confident assignments


def test_clustering_kl_by_hand():
    m = tiny()
    p = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]]) + 1e-12
    q = torch.full((2, 6), 1 / 6)
    expected = (sum(v * math.log(v * 6) for v in p[0].tolist()) + sum(v * math.log(v * 6) for v in p[1].tolist())) / 2
    assert m.clustering_kl(p, q).item() == pytest.approx(expected, rel=1e-9)
    assert m.clustering_kl(q, q).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("toroidal", [True, False])
def test_som_loss_by_hand(toroidal):
    m = tiny(toroidal=toroidal)
    E = m.embeddings.detach().reshape(6, 3).tolist()
    _, q = hand_q(Z.tolist(), E, 10.0)
    H, W = 2, 3
    total = 0.0
    for i in range(2):
        for j in range(6):
            r, c = divmod(j, W)
            s = 0.0
            for rr, cc in [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]:
                if toroidal:
                    s += math.log(q[i, (rr % H) * W + cc % W])
                elif 0 <= rr < H and 0 <= cc < W:
                    s += math.log(q[i, rr * W + cc])
            total += q[i, j] * s
    expected = -total / 2
    out_q = m.soft_assign(m.distances(Z))
    assert m.som_loss(Z, out_q).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("toroidal", [True, False])
def test_som_init_loss_by_hand(toroidal):
    m = tiny(toroidal=toroidal)
    E = m.embeddings.detach().reshape(6, 3).numpy()
    z = Z.numpy()
    k = [0, 5]                                                  # BMUs (checked in test_distances_and_q_by_hand)
    commit = np.mean([(z[i] - E[k[i]]) ** 2 for i in range(2)])
    H, W = 2, 3
    sq = []
    for i in range(2):
        r, c = divmod(k[i], W)
        for rr, cc in [(r, c), (r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]:
            if toroidal:
                rr, cc = rr % H, cc % W
            elif not (0 <= rr < H and 0 <= cc < W):
                continue
            sq.append(np.mean((z[i] - E[rr * W + cc]) ** 2))
    expected = commit + np.mean(sq)
    assert m.som_init_loss(Z, m.distances(Z)).item() == pytest.approx(expected, rel=1e-10)


def test_nll_and_diag_kl_by_hand():
    m = tiny(prior_var=2.0)
    x = torch.tensor([[0.0, 1.0, 0.5]])
    logits = torch.tensor([[0.3, -1.2, 2.0]])
    nll = sum(math.log1p(math.exp(l)) - xi * l for xi, l in zip([0, 1, .5], [.3, -1.2, 2.0]))
    assert m.nll(x, logits).item() == pytest.approx(nll, rel=1e-12)
    mu, logvar = torch.tensor([[0.5, -1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0), -1.0]])
    s2 = 4.0   # prior_var is a standard deviation
    kl = sum(0.5 * (math.exp(lv) / s2 + mm ** 2 / s2 - 1 + math.log(s2) - lv) for mm, lv in zip([.5, -1, 0], [0, math.log(4), -1]))
    assert m.kl_prior(mu, logvar).item() == pytest.approx(kl, rel=1e-12)
    assert m.kl_prior(torch.zeros(1, 3), torch.full((1, 3), math.log(4.0))).item() == pytest.approx(0.0, abs=1e-12)


def test_tril_kl_matches_torch_distributions():
    m = DPSOM(latent_dim=4, som_dim=(2, 2), posterior="tril", prior_var=1.5)
    loc = torch.randn(3, 4)
    L = torch.randn(3, 4, 4).tril(-1) + torch.diag_embed(torch.rand(3, 4) + 0.5)
    q = torch.distributions.MultivariateNormal(loc, scale_tril=L)
    prior = torch.distributions.MultivariateNormal(torch.zeros(4), scale_tril=1.5 * torch.eye(4))
    assert m.kl_prior(loc, L).item() == pytest.approx(torch.distributions.kl_divergence(q, prior).mean().item(), rel=1e-10)


def test_tril_fill_order_is_tfps():
    idx = tril_fill_index(100)
    # README of the golden files: L[0,0] <- o[200], L[99,99] <- o[100], L[99,0] <- o[199], L[49,49] <- o[5149]
    # where o = [loc (100) | t (5050)], so t-index = o-index - 100.
    assert (idx[0, 0], idx[99, 99], idx[99, 0], idx[49, 49]) == (100, 0, 99, 5049)
    lower = idx[torch.ones(100, 100, dtype=torch.bool).tril()]
    assert sorted(lower.tolist()) == list(range(5050))           # each parameter used exactly once
    assert (idx.triu(1) == -1).sum() == 4950 and (idx[torch.ones(100, 100, dtype=torch.bool).triu(1)] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, B", [(100, 300), (7, 5), (1, 3)])
def test_fill_scale_tril_is_the_composed_construction_bit_for_bit(n, B, dtype):
    """FillScaleTriL against the construction it replaced (gather, mask, tril, diag_embed of the shifted
    softplus), forward and the gradient through the model's consumers of the scale: equal, not close."""
    def composed(t, idx):
        raw = t[:, idx.clamp(min=0)] * (idx >= 0)
        return raw.tril(-1) + torch.diag_embed(F.softplus(torch.diagonal(raw, dim1=1, dim2=2)) + TRIL_DIAG_SHIFT)
    torch.manual_seed(n)
    t = torch.randn(B, n * (n + 1) // 2, dtype=dtype) * 5
    t[0, :3] = 30.0                                                # softplus's linear branch
    eps = torch.randn(B, n, dtype=dtype)
    consumers = lambda L: ((L @ eps.unsqueeze(-1)).pow(2).sum() + torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum()
                           + (L ** 2).sum())
    a, b = t.clone().requires_grad_(), t.clone().requires_grad_()
    La, Lb = composed(a, tril_fill_index(n)), FillScaleTriL.apply(b, *fill_scale_tril_indices(n))
    assert torch.equal(La, Lb)
    assert torch.equal(torch.autograd.grad(consumers(La), a)[0], torch.autograd.grad(consumers(Lb), b)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tf1_adam_in_pieces_is_the_multi_tensor_update_bit_for_bit(dtype, monkeypatch):
    """Parameters larger than CHUNK are updated piece by piece; with the pieces made larger than every
    parameter, all go through the multi-tensor form. Same numbers after several steps, a gradient missing once."""
    shapes = [(3 * CHUNK + 5,), (CHUNK + 1, 2), (CHUNK,), (3, 5)]
    torch.manual_seed(0)
    runs = []
    for chunk in (CHUNK, 10 * CHUNK):
        monkeypatch.setattr("tf1_adam.CHUNK", chunk)
        torch.manual_seed(0)
        ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
        opt = TF1Adam(ps, lr=1e-3)
        for step in range(5):
            for i, p in enumerate(ps):
                p.grad = None if (step, i) == (2, 1) else torch.randn_like(p) * 10.0 ** (step - 2)
            opt.param_groups[0]["lr"] = 1e-3 * 0.9 ** step
            opt.step()
        runs.append([p.detach() for p in ps] + [opt.state[p][k] for p in ps for k in ("m", "v")])
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_sample_uses_given_noise():
    m = tiny().eval()
    x = torch.rand(2, 784)
    eps = torch.randn(2, 3)
    out = m(x, eps=eps)
    np.testing.assert_allclose(out.z.detach(), (out.loc + torch.exp(0.5 * out.scale) * eps).detach(), rtol=1e-12)
    np.testing.assert_allclose(out.dist.detach(), m.distances(out.z).detach(), rtol=1e-12)
    assert torch.equal(m(x, sample=False).z, out.loc)


@pytest.mark.parametrize("H,W", [(2, 3), (6, 10), (8, 8)])
def test_neighbours_toroidal(H, W):
    idx, ok = grid_neighbours((H, W), toroidal=True)
    assert ok.all() and idx.shape == (H * W, 4)
    for j in range(H * W):
        r, c = divmod(j, W)
        assert idx[j].tolist() == [((r + 1) % H) * W + c, ((r - 1) % H) * W + c, r * W + (c + 1) % W, r * W + (c - 1) % W]


def test_neighbours_planar_differs_at_edges():
    idx, ok = grid_neighbours((6, 10), toroidal=False)
    assert ok.sum(1).tolist().count(2) == 4                       # the four corners
    assert ok[0].tolist() == [True, False, True, False]           # (0,0): up and right only
    assert idx[0, 0] == 10 and idx[0, 2] == 1
    assert ok[59].tolist() == [False, True, False, True]          # (5,9): down and left only
    assert idx[59, 1] == 49 and idx[59, 3] == 58
    inner = 2 * 10 + 5
    assert ok[inner].all() and idx[inner].tolist() == [35, 15, 26, 24]
    t_idx, _ = grid_neighbours((6, 10), toroidal=True)
    assert (t_idx[0] != idx[0]).any()


def test_non_square_map_forward_and_losses():
    m = DPSOM(latent_dim=5, som_dim=(6, 10), toroidal=False)
    x = torch.rand(4, 784)
    out = m(x)
    assert out.dist.shape == (4, 60) and out.q.shape == (4, 60)
    p = DPSOM.target_distribution(out.q.detach())
    total, parts = m.joint_loss(x, out, p)
    assert torch.isfinite(total) and set(parts) == {"loss", "elbo", "nll", "kl", "cah", "som"}
    assert total.item() == pytest.approx(parts["elbo"].item() + 20 * parts["cah"].item() + 0.25 * parts["som"].item(), rel=1e-10)


def grads_of(loss, model):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: (p.grad is not None and p.grad.abs().sum().item() > 0) for n, p in model.named_parameters()}


@pytest.mark.parametrize("convolution", [False, True])
def test_gradient_routing(convolution):
    torch.manual_seed(0)
    m = DPSOM(latent_dim=3, som_dim=(2, 3), convolution=convolution, dropout=0.0)
    x = torch.rand(4, 784)
    out = m(x)
    p = DPSOM.target_distribution(out.q.detach())
    p = torch.roll(p, 1, dims=1)   # a target different from q, so KL(P||Q) has a nonzero gradient
    enc = lambda n: n.startswith(("encoder", "head"))
    dec = lambda n: n.startswith(("decoder", "decoder_in"))
    names = [n for n, _ in m.named_parameters()]

    g = grads_of(m.elbo(x, out)[0], m)
    assert all(g[n] for n in names if enc(n) or dec(n)) and not g["embeddings"]
    g = grads_of(m.clustering_kl(p, out.q), m)
    assert all(g[n] for n in names if enc(n)) and g["embeddings"] and not any(g[n] for n in names if dec(n))
    g = grads_of(m.som_loss(out.z, out.q), m)
    assert g["embeddings"] and not any(g[n] for n in names if n != "embeddings")
    g = grads_of(m.som_init_loss(out.z, out.dist), m)
    assert g["embeddings"] and not any(g[n] for n in names if n != "embeddings")
    g = grads_of(m.joint_loss(x, out, p)[0], m)
    assert all(g.values())


def test_conv_layers_run_channels_last_with_the_nchw_model_s_numbers():
    """The conv model keeps its kernels and every conv's input and output NHWC (channels_last, the fast layout on
    a CPU); the same weights in NCHW give the same posterior, logits and gradients up to float64 rounding."""
    convs_of = lambda model: [c for c in model.modules() if isinstance(c, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    nhwc = lambda t: t.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    m = DPSOM(latent_dim=4, som_dim=(2, 2), convolution=True).eval()
    nchw = copy.deepcopy(m).to(memory_format=torch.contiguous_format)
    convs = convs_of(m)
    assert len(convs) == 8 and all(nhwc(c.weight) for c in convs)
    assert sum(not nhwc(c.weight) for c in convs_of(nchw)) == 7     # all but 32x1x3x3, which is both layouts
    seen = []
    for c in convs:
        c.register_forward_hook(lambda mod, inp, out: seen.append(nhwc(inp[0]) and nhwc(out)))
    x = torch.rand(6, 784)
    outs = []
    for model in (m, nchw):
        loc, logvar = model.encode(x)
        logits = model.decode(loc + logvar)
        model.zero_grad()
        (logits.square().mean() + loc.sum()).backward()
        outs.append([loc, logvar, logits] + [p.grad for p in model.parameters()])
    assert seen == [True] * 8
    # sums of at most 256 * 9 products taken in another order, through 8 layers: float64 rounding, far below 1e-9
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the check sees a layout mistake: the encoder's output read in C, H, W order instead of TF's H, W, C
    with torch.no_grad():
        h = m.encoder(x.view(-1, 1, 28, 28) - 0.5)
        wrong = m.head(h.flatten(1))[:, :4]
    assert (wrong - outs[1][0]).abs().max() > 1e-3


def test_frozen_batchnorm_is_the_tf_affine_map():
    m = DPSOM(latent_dim=3, som_dim=(2, 2), batchnorm="frozen", dropout=0.0)
    bn = m.encoder[0][2]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    h = torch.randn(5, 500)
    np.testing.assert_allclose(bn(h).detach(), (bn.weight * h / math.sqrt(1 + 1e-3) + bn.bias).detach(), rtol=1e-12)
    m.train()
    m(torch.rand(8, 784))
    assert torch.equal(bn.running_mean, torch.zeros(500)) and torch.equal(bn.running_var, torch.ones(500))


def test_bad_constructor_values():
    with pytest.raises(ValueError, match="posterior"):
        DPSOM(posterior="full")
    with pytest.raises(ValueError, match="batchnorm"):
        DPSOM(batchnorm="none")


RECORD_IMPORT = """
import sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode

class Record(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        print(func.__name__, None if x is None else x.numel(), None if x is None else str(x.dtype))
        return func(*args, **(kwargs or {}))

with Record():
    import tdpsom_model  # noqa: F401  (imports dpsom_model, which imports fast_ops)
"""


def test_importing_a_model_first_resolves_every_vml_kernel_on_one_element():
    """oneMKL's first-call race (fast_ops.resolve_vml_kernels): importing the models calls every VML function
    on one element, float32 and float64, before any other op runs, so no later call can be a first call on two
    threads. benchmarks/vml_first_call.py measures what it prevents."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", RECORD_IMPORT], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ops = [line.split() for line in out.stdout.splitlines()]
    calls = [(name, dtype) for name, numel, dtype in ops if name.split(".")[0] in VML_OPS and numel == "1"]
    want = {(f"{op}.default", f"torch.{dtype}") for op in VML_OPS for dtype in ("float32", "float64")}
    assert want <= set(calls), sorted(want - set(calls))
    last = max(i for i, (name, numel, dtype) in enumerate(ops) if (name, dtype) in want and numel == "1")
    before = ops[:last + 1]                      # nothing but the one-element calls and their inputs' creation
    assert all(name.split(".")[0] in ("full", "fill_") or (name, dtype) in want for name, _, dtype in before), before
