"""T-DPSOM's terms against values computed by hand (explicit loops), gradient routing per loss as the reference's
train ops see it, the LSTM cell, roll-outs, non-square maps and the TF weight loader."""
import math

import pytest
import torch

from dpsom_model import load_tf_arrays, to_tf_layout
from som import grid_neighbours
from tdpsom_model import KerasLSTM, TDPSOM, hard_sigmoid, previous_bmu


@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons with the float64 hand computations below; restored after each test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


E6 = [[0., 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0], [1, 1, 0], [2, 1, 1]]   # prototypes of a 2x3 map, latent 3


def tiny(**kw) -> TDPSOM:
    """4 features, latent 3, a 2x3 map with known prototypes, LSTM of 5."""
    torch.manual_seed(0)
    m = TDPSOM(**{"input_dim": 4, "latent_dim": 3, "som_dim": (2, 3), "lstm_dim": 5, **kw})
    with torch.no_grad():
        m.embeddings.copy_(torch.tensor(E6).view(2, 3, 3))
    return m


def normal_logpdf(x: float, mu: float, s: float) -> float:
    return -0.5 * ((x - mu) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)


def test_hard_sigmoid_is_keras():
    a = torch.tensor([-3.0, -2.5, -1.0, 0.0, 1.0, 2.5, 3.0])
    assert hard_sigmoid(a).tolist() == pytest.approx([0.0, 0.0, 0.3, 0.5, 0.7, 1.0, 1.0], abs=1e-15)


@pytest.mark.parametrize("gates", ["hard_sigmoid", "sigmoid"])
def test_lstm_by_hand(gates):
    """Two steps of the cell with explicit loops: gates [i, f, c, o], one bias, c = f c + i tanh(.), h = o tanh(c)."""
    torch.manual_seed(1)
    cell = KerasLSTM(2, 3, gates)
    with torch.no_grad():
        cell.bias.uniform_(-1, 1)
    x = torch.randn(1, 2, 2)                                          # one sequence of 2 steps
    h0, c0 = torch.randn(1, 3), torch.randn(1, 3)
    out, (h, c) = cell(x, (h0, c0))
    hard = lambda a: min(max(0.2 * a + 0.5, 0.0), 1.0)
    act = hard if gates == "hard_sigmoid" else (lambda a: 1 / (1 + math.exp(-a)))
    Wi, Wh, b = cell.weight_ih.tolist(), cell.weight_hh.tolist(), cell.bias.tolist()
    hs, cs = h0[0].tolist(), c0[0].tolist()
    for t in range(2):
        pre = [sum(Wi[r][j] * x[0, t, j].item() for j in range(2)) + sum(Wh[r][j] * hs[j] for j in range(3)) + b[r]
               for r in range(12)]
        gate = lambda block, u: pre[3 * block + u]
        cs = [act(gate(1, u)) * cs[u] + act(gate(0, u)) * math.tanh(gate(2, u)) for u in range(3)]
        hs = [act(gate(3, u)) * math.tanh(cs[u]) for u in range(3)]
        assert out[0, t].tolist() == pytest.approx(hs, rel=1e-12)
    assert h[0].tolist() == pytest.approx(hs, rel=1e-12) and c[0].tolist() == pytest.approx(cs, rel=1e-12)


def test_lstm_starts_from_zeros_and_is_initialised_as_keras():
    cell = KerasLSTM(4, 6)
    x = torch.randn(2, 3, 4)
    zeros = (torch.zeros(2, 6), torch.zeros(2, 6))
    assert torch.equal(cell(x)[0], cell(x, zeros)[0])
    assert cell.bias.view(4, 6)[1].eq(1).all() and cell.bias.view(4, 6)[[0, 2, 3]].eq(0).all()   # forget block 1
    Wh = cell.weight_hh                                               # (4H, H): TF's (H, 4H) has orthonormal rows
    assert torch.allclose(Wh.T @ Wh, torch.eye(6), atol=1e-12)
    lim = math.sqrt(6 / (4 + 24))                                     # Glorot-uniform over fan_in 4, fan_out 24
    assert cell.weight_ih.abs().max() <= lim
    with pytest.raises(ValueError, match="lstm_gates"):
        KerasLSTM(4, 6, "relu")


def test_gaussian_terms_by_hand():
    m = tiny(prior=0.25)
    x = torch.tensor([[[0.5, -1.0, 2.0, 0.0]], [[1.0, 1.0, -0.5, 3.0]]])      # (B=2, T=1, D=4)
    out = m(x, eps=torch.zeros(2, 3))
    nll = -sum(normal_logpdf(x[n, 0, f].item(), out.dec_loc[n, f].item(), out.dec_scale[n, f].item())
               for n in range(2) for f in range(4)) / 2
    kl = sum(-math.log(s) + (s * s + mu * mu) / 2 - 0.5 for row_mu, row_s in zip(out.loc.tolist(), out.scale.tolist())
             for mu, s in zip(row_mu, row_s)) / 2
    elbo, got_nll, got_kl = m.elbo(x, out)
    assert got_nll.item() == pytest.approx(nll, rel=1e-12) and got_kl.item() == pytest.approx(kl, rel=1e-12)
    assert elbo.item() == pytest.approx(nll + 0.25 * kl, rel=1e-12)
    assert torch.equal(out.scale, torch.nn.functional.softplus(m.enc_scale(m.encoder(x.view(2, 4)))))   # no floor


def test_smoothness_by_hand():
    """Step t is compared with the prototype of step t-1's BMU, step 0 with its own; kernel with epsilon 1e-7."""
    m = tiny(alpha=2.0)
    z = torch.tensor([[[0.1, 0.2, -0.1], [1.9, 0.8, 0.7], [1.0, 0.1, 0.0]]])   # (B=1, T=3, L=3)
    k = torch.tensor([[0, 5, 1]])
    assert previous_bmu(k).tolist() == [[0, 0, 5]]
    total = 0.0
    for t, j in enumerate([0, 0, 5]):
        d = sum((z[0, t, i].item() - E6[j][i]) ** 2 for i in range(3))
        total += 1e-7 + (1 + d / 2.0) ** (-1.5)
    assert m.smoothness_loss(z, k).item() == pytest.approx(-total / 3, rel=1e-12)


@pytest.mark.parametrize("target", ["self", "drop"])
def test_prediction_loss_by_hand(target):
    """Step t forecasts z_{t+1}; with "self" the last step's target is itself (the reference), "drop" leaves it out."""
    m = tiny(last_step_target=target)
    torch.manual_seed(2)
    z, loc, scale = torch.randn(2, 3, 3), torch.randn(2, 3, 3), torch.rand(2, 3, 3) + 0.5
    steps = [(b, t) for b in range(2) for t in range(3 if target == "self" else 2)]
    nll = -sum(normal_logpdf(z[b, min(t + 1, 2), i].item(), loc[b, t, i].item(), scale[b, t, i].item())
               for b, t in steps for i in range(3)) / len(steps)
    assert m.prediction_loss(z, loc, scale).item() == pytest.approx(nll, rel=1e-12)
    if target == "drop":
        with pytest.raises(ValueError, match="2 steps"):
            m.prediction_loss(z[:, :1], loc[:, :1], scale[:, :1])


def test_joint_loss_weights_each_term():
    """Distinct weights: each multiplies its own term (a weight on the wrong term would show)."""
    w = dict(theta=1.5, gamma=2.0, beta=3.0, kappa=5.0, eta=7.0)
    m = tiny(**w)
    x = torch.randn(2, 4, 4)
    out = m(x)
    p = TDPSOM.target_distribution(out.q.detach())
    total, parts = m.joint_loss(x, out, p)
    assert set(parts) == {"loss", "elbo", "nll", "kl", "cah", "som", "smooth", "pred"}
    z = out.z.view(2, 4, 3)
    assert parts["smooth"].item() == m.smoothness_loss(z, out.dist.argmin(1).view(2, 4)).item()
    assert parts["pred"].item() == m.prediction_loss(z, out.pred_loc, out.pred_scale).item()
    expected = sum(w[k] * parts[t].item() for k, t in
                   (("theta", "elbo"), ("gamma", "cah"), ("beta", "som"), ("kappa", "smooth"), ("eta", "pred")))
    assert total.item() == pytest.approx(expected, rel=1e-12)


def test_forward_sample_and_predict():
    m = tiny()
    x = torch.randn(2, 4, 4)
    eps = torch.randn(8, 3)
    out = m(x, eps=eps)
    assert torch.allclose(out.z, out.loc + out.scale * eps, rtol=1e-14)
    assert torch.equal(m(x, sample=False).z, out.loc)
    assert out.dist.shape == (8, 6) and out.pred_loc.shape == (2, 4, 3) and out.state[0].shape == (2, 5)
    short = m(x, decode=False, predict=False)
    assert short.dec_loc is None and short.pred_loc is None and short.state is None


def test_roll_out_step_by_step_equals_the_sequence():
    """predict over a whole sequence equals predicting one step at a time from the returned state."""
    m = tiny()
    z = torch.randn(2, 4, 3)
    loc, scale, state = m.predict(z)
    s = None
    for t in range(4):
        l1, s1, s = m.predict(z[:, t:t + 1], s)
        assert torch.allclose(l1[:, 0], loc[:, t], rtol=1e-13) and torch.allclose(s1[:, 0], scale[:, t], rtol=1e-13)
    assert all(torch.allclose(a, b, rtol=1e-13) for a, b in zip(s, state))


PARTS = {"encoder": ("encoder", "enc_loc", "enc_scale"), "decoder": ("decoder",), "som": ("embeddings",),
         "prediction": ("lstm", "predictor")}


def learners(loss: torch.Tensor, m: TDPSOM) -> set[str]:
    """The parts whose parameters get a nonzero gradient from loss."""
    m.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return {part for part, prefixes in PARTS.items() if any(n.startswith(prefixes) for n in got)}


def test_gradient_routing_as_the_reference_train_ops():
    """Which parts learn from which term, as the reference's stop-gradients decide (its golden grad_none table):
    the ELBO trains encoder and decoder; KL(P||Q) the encoder and prototypes; the SOM terms only the prototypes;
    smoothness only the encoder (its prototype is stopped); the forecast only the LSTM and its head (input and
    target stopped); the joint loss everything."""
    m = tiny()
    x = torch.randn(2, 4, 4)
    out = m(x)
    p = torch.roll(TDPSOM.target_distribution(out.q.detach()), 1, dims=1)   # differs from q: KL(P||Q) has a gradient
    z, k = out.z.view(2, 4, 3), out.dist.argmin(1).view(2, 4)
    assert learners(m.elbo(x, out)[0], m) == {"encoder", "decoder"}
    assert learners(m.clustering_kl(p, out.q), m) == {"encoder", "som"}
    assert learners(m.som_loss(out.z, out.q), m) == {"som"}
    assert learners(m.som_init_loss(out.z, out.dist), m) == {"som"}
    assert learners(m.smoothness_loss(z, k), m) == {"encoder"}
    assert learners(m.prediction_loss(z, out.pred_loc, out.pred_scale), m) == {"prediction"}
    assert learners(m.joint_loss(x, out, p)[0], m) == set(PARTS)
    params = {n: p for n, p in m.named_parameters()}                   # every parameter, not only every part
    m.zero_grad(set_to_none=True)
    m.joint_loss(x, out, p)[0].backward()
    assert [n for n, t in params.items() if t.grad is None or not t.grad.any()] == []


@pytest.mark.parametrize("toroidal", [True, False])
def test_non_square_map(toroidal):
    """A 3x5 map: node (r, c) is r*5 + c everywhere (the reference's formulas assume a square map)."""
    torch.manual_seed(3)
    m = TDPSOM(input_dim=4, latent_dim=3, som_dim=(3, 5), lstm_dim=5, toroidal=toroidal)
    x = torch.randn(2, 3, 4)
    out = m(x)
    assert out.dist.shape == (6, 15) and out.q.shape == (6, 15)
    E = m.embeddings
    d = torch.stack([((out.z - E[r, c]) ** 2).sum(1) for r in range(3) for c in range(5)], 1)
    assert torch.allclose(out.dist, d, rtol=1e-10, atol=1e-12)
    assert torch.equal(m.neighbours, grid_neighbours((3, 5), toroidal)[0])
    k = torch.tensor([[7, 14, 0]])                                    # nodes (1, 2), (2, 4), (0, 0)
    z = torch.stack([E[0, 0], E[1, 2], E[2, 4]]).unsqueeze(0).detach()   # each at the previous step's prototype
    d0 = ((E[0, 0] - E[1, 2]) ** 2).sum().item()                     # step 0 against its own BMU; the others at 0
    kernel = lambda d: 1e-7 + (1 + d / m.alpha) ** (-(m.alpha + 1) / 2)
    assert m.smoothness_loss(z, k).item() == pytest.approx(-(kernel(d0) + 2 * kernel(0.0)) / 3, rel=1e-12)
    p = TDPSOM.target_distribution(out.q.detach())
    total, parts = m.joint_loss(x, out, p)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())


def test_frozen_batchnorm_and_no_dropout_by_default():
    m = tiny()
    assert not any(isinstance(mod, (torch.nn.Dropout, torch.nn.BatchNorm1d)) for mod in m.modules())
    m.train()
    m(torch.randn(3, 2, 4))
    bns = [mod for mod in m.modules() if type(mod).__name__ == "FrozenBatchNorm"]
    assert len(bns) == 6 and all(bn.running_mean.eq(0).all() and bn.running_var.eq(1).all() for bn in bns)


def test_tf_loader_round_trip_and_refusals():
    source, target = tiny(), tiny()
    with torch.no_grad():
        for t in source.parameters():
            t.add_(torch.rand_like(t))
    arrays = {n: to_tf_layout(t).detach().numpy().copy() for n, t in source.tf_variables().items()}
    assert len(arrays) == 1 + 5 * 2 + 3 + 2 * 2 + 4 * 2 + 6 * 4       # 38 trainable + 12 BN moving statistics
    assert arrays["prediction/next_state/lstm/lstm_cell/kernel:0"].shape == (3, 20)
    assert arrays["prediction/next_state/lstm/lstm_cell/recurrent_kernel:0"].shape == (5, 20)
    assert arrays["reconstruction_e/decoder/dense_10/kernel:0"].shape == (500, 8)
    load_tf_arrays(target, arrays)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    for switch, needed in (({"lstm_gates": "sigmoid"}, "lstm_gates='hard_sigmoid'"),
                           ({"batchnorm": "standard"}, "batchnorm='frozen'"), ({"dropout": 0.5}, "dropout=0"),
                           ({"last_step_target": "drop"}, "last_step_target='self'")):
        with pytest.raises(ValueError, match=needed):
            load_tf_arrays(tiny(**switch), arrays)
    with pytest.raises(KeyError, match="dense_5"):
        load_tf_arrays(target, {n: a for n, a in arrays.items() if "dense_5/bias" not in n})


def test_bad_constructor_values():
    for bad, match in (({"batchnorm": "none"}, "batchnorm"), ({"last_step_target": "zero"}, "last_step_target"),
                       ({"lstm_gates": "tanh"}, "lstm_gates")):
        with pytest.raises(ValueError, match=match):
            TDPSOM(**bad)
