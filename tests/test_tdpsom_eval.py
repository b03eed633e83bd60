"""T-DPSOM's evaluation from arrays: clustering per label column against scikit-learn, Moran's I by hand in both
forms, topology per step against utils, the forecast errors as main() computes them, and the pictures."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_mutual_info_score, mean_squared_error, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from som import grid_neighbours
from tdpsom_eval import (forecast_errors, grid_weights, hit_map_picture, label_mean_pictures, moran_i,
                         moran_i_reference, sequence_metrics, topology, trajectory_picture)
from utils import PALETTE, VIRIDIS, quantization_error, topographic_error

E1, E2 = math.exp(-1), math.exp(-2)


def random_pass(N=7, T=5, som_dim=(3, 4), K=2, seed=0):
    rng = np.random.default_rng(seed)
    dist = torch.tensor(rng.random((N, T, som_dim[0] * som_dim[1])), dtype=torch.float32)   # (N, T, H*W)
    y = rng.integers(0, 3, (N, T, K)).astype(np.float64)
    y[..., 1] += y[..., 0]                                   # a second column that shares information with the map
    return dist, y


# ---- clustering per label column ---------------------------------------------------------------------------
def test_clustering_per_label_column_is_scikit_learns_on_the_flat_steps():
    dist, y = random_pass()
    m = sequence_metrics(dist, (3, 4), y, ["score", "stage"])
    k = dist.argmin(-1).numpy()                                                  # (N, T)
    for j, name in enumerate(["score", "stage"]):
        labels = y[:, :, j].reshape(-1)                                          # step n*T + t, as k's
        assert m[f"nmi/{name}"] == pytest.approx(normalized_mutual_info_score(labels, k.reshape(-1),
                                                                              average_method="geometric"))
        assert m[f"ami/{name}"] == pytest.approx(adjusted_mutual_info_score(k.reshape(-1), labels))   # the reference's
        table = contingency_matrix(labels, k.reshape(-1))                                            # (labels, nodes)
        assert m[f"purity/{name}"] == pytest.approx(table.max(0).sum() / table.sum())
        # pairing each stay's steps with another order of the labels gives other numbers
        wrong = normalized_mutual_info_score(y[:, :, j].T.reshape(-1), k.reshape(-1), average_method="geometric")
        assert abs(wrong - m[f"nmi/{name}"]) > 1e-3


def test_metric_names_are_stable():
    dist, y = random_pass(T=3)
    z = np.zeros((7, 3, 2))
    m = sequence_metrics(dist, (3, 4), y[..., :1], ["score"],
                         forecast=dict(x=z, x_rec=z, x_pred=z[:, -2:], z=z, z_pred=z[:, -2:]))
    assert set(m) == {"qe", "te", "qe_step/0", "qe_step/1", "qe_step/2", "te_step/0", "te_step/1", "te_step/2",
                      "nodes_used", "occupancy_entropy", "nmi/score", "ami/score", "purity/score", "moran/score",
                      "moran_reference/score", "pred_ze", "pred_ze_step/1", "pred_ze_step/2", "pred_xhat",
                      "pred_xhat_step/1", "pred_xhat_step/2", "pred_rec"}
    assert "nmi/label_0" in sequence_metrics(dist, (3, 4), y[..., 0])             # (N, T) labels, no names
    assert not any("/" in k and k.split("/")[0] in ("nmi", "moran") for k in sequence_metrics(dist, (3, 4)))


# ---- Moran's I ------------------------------------------------------------------------------------------------
# A 2x2 map: node 0 maps steps labelled 1 and 3 (mean 2), node 1 one labelled 0, node 2 one labelled 4, node 3 none.
BMU = np.array([0, 0, 1, 2])
LABELS = np.array([1.0, 3.0, 0.0, 4.0])


def test_moran_reference_by_hand_on_2x2():
    """evaluate_model: node means [2, 0, 4, 0] (the empty node counts as 0), deviations from the mean over steps
    (2): [0, -2, 2, -2]. Torus weights: 1 on the diagonal, e^-1 for a row or column neighbour, e^-2 diagonal.
    sum_ij w dev dev = 12 + 2 (-4 e^-2 + 4 e^-1 - 4 e^-1); sum dev^2 = 12; sum w = 4 (1 + e^-1)^2; times 4 nodes."""
    expected = 4 * (12 - 8 * E2) / (12 * 4 * (1 + E1) ** 2)
    assert moran_i_reference(BMU, LABELS, (2, 2)) == pytest.approx(expected, rel=1e-12)
    # empty nodes left out instead (the standard form's choice) would give another value
    assert abs(moran_i_reference(BMU, LABELS, (2, 2)) - moran_i(BMU, LABELS, (2, 2))) > 0.5


def test_moran_standard_by_hand_on_2x2():
    """Used nodes 0, 1, 2 with means [2, 0, 4], their mean 2, deviations [0, -2, 2]; no self-weights:
    w01 = w02 = e^-1, w12 = e^-2. I = 3 / (2 (2 e^-1 + e^-2)) * 2 (-4 e^-2) / 8."""
    expected = 3 / (2 * (2 * E1 + E2)) * (2 * -4 * E2) / 8
    assert moran_i(BMU, LABELS, (2, 2)) == pytest.approx(expected, rel=1e-12)


def reference_loops(bmu, labels, som_dim):
    """evaluate_model's Moran's I, written as its loops."""
    H, W = som_dim
    sd = H * W
    mean = labels.sum() / len(labels)
    c = [labels[bmu == i].mean() if (bmu == i).any() else 0.0 for i in range(sd)]
    k1, k2 = [i // H for i in range(sd)], [i % W for i in range(sd)]
    w = np.zeros((sd, sd))
    for i in range(sd):
        for j in range(sd):
            d1, d2 = abs(k1[i] - k1[j]), abs(k2[i] - k2[j])
            w[i, j] = math.exp(-(min(H - d1, d1) + min(W - d2, d2)))
    M = sum((c[i] - mean) * (c[j] - mean) * w[i, j] for i in range(sd) for j in range(sd))
    return M * sd / (sum((ci - mean) ** 2 for ci in c) * w.sum())


def standard_loops(bmu, labels, som_dim, toroidal):
    """Moran's I over the used nodes by its textbook definition, coordinates (k // W, k % W)."""
    H, W = som_dim
    used = sorted(set(bmu.tolist()))
    x = {i: labels[bmu == i].mean() for i in used}
    xbar = sum(x.values()) / len(used)
    num = den = wsum = 0.0
    for i in used:
        den += (x[i] - xbar) ** 2
        for j in used:
            if i != j:
                d1, d2 = abs(i // W - j // W), abs(i % W - j % W)
                if toroidal:
                    d1, d2 = min(H - d1, d1), min(W - d2, d2)
                w = math.exp(-(d1 + d2))
                wsum += w
                num += w * (x[i] - xbar) * (x[j] - xbar)
    return len(used) / wsum * num / den


@pytest.mark.parametrize("som_dim", [(3, 3), (2, 3), (4, 3)])
def test_moran_both_forms_against_their_loops(som_dim):
    rng = np.random.default_rng(1)
    n = som_dim[0] * som_dim[1]
    bmu = rng.integers(0, n - 2, 40)                                  # the last two nodes stay empty
    labels = rng.normal(size=40) + (bmu % 3)                          # a pattern over the map
    assert moran_i_reference(bmu, labels, som_dim) == pytest.approx(reference_loops(bmu, labels, som_dim), rel=1e-12)
    for toroidal in (True, False):
        assert moran_i(bmu, labels, som_dim, toroidal) == pytest.approx(
            standard_loops(bmu, labels, som_dim, toroidal), rel=1e-12)
    if som_dim[0] != som_dim[1]:   # the reference's k // som_dim[0] is not the row on a non-square map (quirk Q17)
        assert not np.allclose(grid_weights(som_dim, reference=True), grid_weights(som_dim))


def test_moran_of_a_checkerboard_and_of_stripes():
    """Every node used once. A checkerboard on the 4x4 torus: deviations +-1/2, each node has 4 nodes at distance 1
    (opposite sign), 6 at 2 (same), 4 at 3 (opposite), 1 at 4 (same), so I = sum w sign / sum w."""
    k = np.arange(16)
    r, c = k // 4, k % 4
    checker = ((r + c) % 2).astype(float)
    w = np.array([4 * E1, 6 * E2, 4 * math.exp(-3), math.exp(-4)])
    assert moran_i(k, checker, (4, 4)) == pytest.approx((w * [-1, 1, -1, 1]).sum() / w.sum(), rel=1e-12)
    assert moran_i(k, r.astype(float), (4, 4), toroidal=False) > 0.3              # rows: like near like
    assert math.isnan(moran_i(k[:1], checker[:1], (4, 4)))                       # one used node
    assert math.isnan(moran_i(k, np.ones(16), (4, 4)))                           # no variation


# ---- topology per step ------------------------------------------------------------------------------------
@pytest.mark.parametrize("toroidal", [True, False])
def test_topology_per_step_is_utils_on_each_step(toroidal):
    dist, _ = random_pass(N=11, T=4)
    m = topology(dist, (3, 4), toroidal)
    neighbours, exists = grid_neighbours((3, 4), toroidal)
    flat = dist.reshape(-1, 12)
    assert m["qe"] == quantization_error(flat) and m["te"] == topographic_error(flat, neighbours, exists)
    for t in range(4):
        assert m[f"qe_step/{t}"] == quantization_error(dist[:, t])
        assert m[f"te_step/{t}"] == topographic_error(dist[:, t], neighbours, exists)
    # every step holds N of the N*T rows: the overall numbers are the steps' means
    assert m["qe"] == pytest.approx(np.mean([m[f"qe_step/{t}"] for t in range(4)]), rel=1e-6)
    assert m["te"] == pytest.approx(np.mean([m[f"te_step/{t}"] for t in range(4)]), abs=1e-7)
    # by hand: squared distances 4 and 1 to the BMU at step 0 of two stays
    d = torch.full((2, 1, 4), 9.0)
    d[0, 0, 3], d[1, 0, 0] = 4.0, 1.0
    assert topology(d, (2, 2))["qe_step/0"] == pytest.approx(1.5)


# ---- forecast ---------------------------------------------------------------------------------------------
def test_forecast_errors_as_main_computes_them():
    rng = np.random.default_rng(2)
    N, T, S, L, D = 6, 8, 3, 4, 5
    x, x_rec, x_pred = rng.normal(size=(N, T, D)), rng.normal(size=(N, T, D)), rng.normal(size=(N, S, D))
    z, z_pred = rng.normal(size=(N, T, L)), rng.normal(size=(N, S, L))
    m = forecast_errors(x=x, x_rec=x_rec, x_pred=x_pred, z=z, z_pred=z_pred)
    assert m["pred_ze"] == pytest.approx(mean_squared_error(z_pred.reshape(-1, L), z[:, -S:].reshape(-1, L)))
    assert m["pred_xhat"] == pytest.approx(mean_squared_error(x_pred.reshape(-1, D), x[:, -S:].reshape(-1, D)))
    assert m["pred_rec"] == pytest.approx(mean_squared_error(x_rec.reshape(-1, D), x.reshape(-1, D)))
    for h in range(1, S + 1):
        assert m[f"pred_ze_step/{h}"] == pytest.approx(((z_pred[:, h - 1] - z[:, T - S + h - 1]) ** 2).mean())
    assert m["pred_ze"] == pytest.approx(np.mean([m[f"pred_ze_step/{h}"] for h in range(1, S + 1)]))
    # against the first S steps instead of the last, the number changes
    assert abs(m["pred_ze"] - mean_squared_error(z_pred.reshape(-1, L), z[:, :S].reshape(-1, L))) > 1e-3
    assert forecast_errors(x=x, x_rec=x_rec) == {"pred_rec": m["pred_rec"]}
    with pytest.raises(ValueError, match=r"shapes \(6, 7, 5\) and \(6, 8, 5\)"):
        forecast_errors(x=x, x_rec=x_rec[:, 1:])


# ---- pictures ---------------------------------------------------------------------------------------------
def test_label_mean_and_hit_map_pictures():
    bmu = BMU.reshape(2, 2)                                             # two stays of two steps
    pics = label_mean_pictures(bmu, LABELS.reshape(2, 2), (2, 2), ["score"], cell=4)
    pic = pics["label_mean/score"]
    assert set(pics) == {"label_mean/score"} and pic.shape == (3, 8, 8) and 0 <= pic.min() <= pic.max() <= 1
    np.testing.assert_allclose(pic[:, 0, 0], VIRIDIS[2])                # node 0: mean 2, half-way from 0 to 4
    np.testing.assert_allclose(pic[:, 0, 4], VIRIDIS[0])                # node 1: mean 0, the lowest
    np.testing.assert_allclose(pic[:, 4, 0], VIRIDIS[-1])               # node 2: mean 4, the highest
    np.testing.assert_allclose(pic[:, 4, 4], 0.5)                       # node 3: empty, grey
    hits = hit_map_picture(bmu, (2, 2), cell=4)
    np.testing.assert_allclose(hits[:, 0, 0], VIRIDIS[-1])              # two steps
    np.testing.assert_allclose(hits[:, 4, 4], VIRIDIS[0])               # none


def test_trajectory_picture_draws_each_stay_in_its_colour():
    cell = 8
    # stay 0 walks right along row 0 of a 3x4 map; stay 1 steps from column 0 to column 3 of row 2: a wrap
    pic = trajectory_picture(np.array([[0, 1, 2], [8, 11, 11]]), (3, 4), cell=cell)
    assert pic.shape == (3, 24, 32) and 0 <= pic.min() <= pic.max() <= 1
    centre = cell // 2
    np.testing.assert_allclose(pic[:, centre, cell + centre], PALETTE[0])        # on stay 0's line
    np.testing.assert_allclose(pic[:, 2 * cell + centre, 1], PALETTE[1])          # stay 1 leaves by the left edge
    np.testing.assert_allclose(pic[:, 2 * cell + centre, 4 * cell - 1], PALETTE[1])   # and enters on the right
    np.testing.assert_allclose(pic[:, 2 * cell + centre, 2 * cell + 1], 1.0)      # not across the middle
    planar = trajectory_picture(np.array([[8, 11]]), (3, 4), toroidal=False, cell=cell)
    np.testing.assert_allclose(planar[:, 2 * cell + centre, 2 * cell + 1], PALETTE[0])   # planar: straight across
    under = trajectory_picture(np.array([[0, 1]]), (3, 4), background=np.arange(12.0).reshape(3, 4), cell=cell)
    np.testing.assert_allclose(under[:, 2 * cell + 1, 3 * cell + 1], VIRIDIS[-1])   # the background's top value
