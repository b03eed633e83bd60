"""Learning-rate schedule, TF1 Adam and clustering metrics."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from decay_scheduler import decayed_lr, set_lr
from tf1_adam import TF1Adam
from utils import ami, clustering_metrics, nmi, purity


@pytest.mark.parametrize("step,expected", [(0, 1e-3), (999, 1e-3), (1000, 0.99e-3), (5950, 1e-3 * 0.99 ** 5),
                                           (56949, 1e-3 * 0.99 ** 56)])
def test_staircase_decay(step, expected):
    assert decayed_lr(1e-3, step, 0.99, 1000) == pytest.approx(expected, rel=1e-12)


def test_decay_shares_the_global_step_across_phases():
    # SOM init starts after 15 pretraining epochs of 170 steps: 2550 steps, two decays already applied.
    assert decayed_lr(0.9, 2550) == pytest.approx(0.9 * 0.99 ** 2)


def test_set_lr_writes_every_group():
    opt = torch.optim.Adam([{"params": [torch.zeros(1, requires_grad=True)]},
                            {"params": [torch.zeros(1, requires_grad=True)]}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_tf1_adam_update_rule_by_hand():
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = TF1Adam([w, unused], lr=0.1)
    opt.global_step = 5   # as if five steps of other losses had run before
    m = v = np.zeros(2)
    theta = np.array([1.0, -2.0])
    for t, g in [(6, np.array([0.5, -1.0])), (7, np.array([0.1, 0.2]))]:
        w.grad = torch.tensor(g)
        opt.step()
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g ** 2
        theta = theta - 0.1 * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-8)
        np.testing.assert_allclose(w.detach().numpy(), theta, rtol=1e-12)
    assert unused.item() == 0.0 and unused not in opt.state   # no gradient: skipped, as in TF
    state = opt.state_dict()
    opt2 = TF1Adam([w, unused], lr=0.1)
    opt2.load_state_dict(state)
    assert opt2.global_step == 7


def test_purity_by_hand():
    clusters = [0, 0, 0, 1, 1, 2]
    labels = [1, 1, 2, 3, 3, 3]
    assert purity(clusters, labels) == pytest.approx(5 / 6)
    assert purity([0] * 4, [0, 1, 2, 2]) == pytest.approx(0.5)      # one cluster: majority class share
    assert purity(np.arange(5), [0, 1, 0, 1, 0]) == 1.0              # singletons are pure


def test_nmi_ami_by_hand_and_against_sklearn():
    assert nmi([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)     # relabelled perfect clustering
    assert nmi([0, 0, 0, 0], [0, 1, 0, 1]) == pytest.approx(0.0)
    # two clusters vs two classes, contingency [[2, 0], [1, 1]]: I = H(Y) + H(C) - H(Y, C)
    c, y = [0, 0, 1, 1], [0, 0, 0, 1]
    h = lambda ps: -sum(p * math.log(p) for p in ps if p > 0)
    i = h([3 / 4, 1 / 4]) + h([1 / 2, 1 / 2]) - h([2 / 4, 1 / 4, 1 / 4])
    assert nmi(c, y) == pytest.approx(i / math.sqrt(h([3 / 4, 1 / 4]) * h([1 / 2, 1 / 2])))
    rng = np.random.default_rng(0)
    c, y = rng.integers(0, 64, 3000), rng.integers(0, 10, 3000)
    assert nmi(c, y) == pytest.approx(normalized_mutual_info_score(y, c, average_method="geometric"))
    assert ami(c, y) == pytest.approx(adjusted_mutual_info_score(y, c))
    assert set(clustering_metrics(c, y)) == {"nmi", "purity", "ami", "ari"}


def test_purity_rejects_bad_input():
    with pytest.raises(ValueError):
        purity([0, 1], [0])
    with pytest.raises(ValueError):
        purity([], [])
