"""Evaluation numbers on hand-made cases and the `evaluate` command on a tiny run."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

import dpsom
from som import grid_neighbours
import training
from utils import (cluster_accuracy, clustering_metrics, map_usage, node_statistics, quantization_error,
                   reconstruction_errors, topographic_error, u_matrix)


# ---- numbers --------------------------------------------------------------------------------------
def test_clustering_perfect_and_one_cluster():
    labels = [3, 3, 1, 1, 7, 7]
    perfect = clustering_metrics([2, 2, 0, 0, 1, 1], labels, n_clusters=3)    # relabelled
    assert perfect == pytest.approx({k: 1.0 for k in ["nmi", "purity", "ami", "ari", "accuracy"]})
    one = clustering_metrics([5] * 6, labels, n_clusters=1)
    assert one == pytest.approx({"nmi": 0.0, "purity": 1 / 3, "ami": 0.0, "ari": 0.0})   # no accuracy: 1 != 3
    assert "accuracy" not in clustering_metrics([0, 1, 2, 3, 4, 5], labels, n_clusters=64)


def test_hungarian_accuracy_by_hand_and_brute_force():
    # greedy majority gives purity 3/4; one-to-one, cluster 1 can only take label 1: 2/4
    assert cluster_accuracy([0, 0, 0, 1], [0, 0, 1, 0]) == pytest.approx(0.5)
    assert cluster_accuracy([0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 0, 1]) == pytest.approx(5 / 6)
    rng = np.random.default_rng(0)
    c, y = rng.integers(0, 5, 400), rng.integers(0, 5, 400)
    table = contingency_matrix(y, c)                                           # (classes, clusters)
    best = max(sum(table[i, j] for i, j in enumerate(perm)) for perm in itertools.permutations(range(5)))
    assert cluster_accuracy(c, y) == pytest.approx(best / 400)
    m = clustering_metrics(c, y, n_clusters=5)
    assert m["ari"] == pytest.approx(adjusted_rand_score(y, c))
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y, c, average_method="geometric"))
    assert m["ami"] == pytest.approx(adjusted_mutual_info_score(y, c))


def test_reconstruction_errors_by_hand():
    x = torch.tensor([[1.0, 0.0, 1.0, 0.5]])
    logits = torch.tensor([[0.0, 0.0, math.log(3.0), 0.0]])                   # sigmoid: 1/2, 1/2, 3/4, 1/2
    nll, mse = reconstruction_errors(x, logits)
    assert nll.item() == pytest.approx(3 * math.log(2) + math.log(4 / 3))
    assert mse.item() == pytest.approx((0.25 + 0.25 + 0.0625 + 0) / 4)


def test_quantization_error_by_hand():
    dist = torch.tensor([[4.0, 9.0, 16.0], [1.0, 0.25, 4.0]])                 # squared distances
    assert quantization_error(dist) == pytest.approx((2.0 + 0.5) / 2)


@pytest.mark.parametrize("toroidal,expected", [(True, 1 / 4), (False, 3 / 4)])
def test_topographic_error_toroidal_and_planar(toroidal, expected):
    # 4x4 map, (first BMU, second BMU): (0,0)-(0,3) wraps a row, (0,1)-(3,1) wraps a column,
    # (0,0)-(1,0) are neighbours on both, (0,0)-(1,1) are diagonal: neighbours on neither
    pairs = [(0, 3), (1, 13), (0, 4), (0, 5)]
    dist = torch.full((len(pairs), 16), 10.0)
    for i, (first, second) in enumerate(pairs):
        dist[i, first], dist[i, second] = 0.0, 1.0
    assert topographic_error(dist, *grid_neighbours((4, 4), toroidal)) == pytest.approx(expected)


def test_u_matrix_by_hand():
    line = torch.tensor([[0.0], [1.0], [3.0]])                                 # a planar 1x3 map in 1-D
    assert u_matrix(line, *grid_neighbours((1, 3), False)).tolist() == pytest.approx([1.0, 1.5, 2.0])
    r, c = torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij")
    grid = torch.stack([r, c], -1).view(9, 2)                                  # prototypes at their grid positions
    u = u_matrix(grid, *grid_neighbours((3, 3), True)).view(3, 3)             # wrapping neighbours are 2 away
    assert u[1, 1].item() == pytest.approx(1.0) and u[0, 0].item() == pytest.approx(1.5)
    assert u[0, 1].item() == pytest.approx(1.25)


def test_map_usage_and_node_statistics_by_hand():
    assert map_usage([0, 0, 1, 1], 4) == {"nodes_used": 2, "occupancy_entropy": pytest.approx(1.0)}
    assert map_usage([3, 3, 3], 4) == {"nodes_used": 1, "occupancy_entropy": 0.0}
    assert map_usage(np.arange(64), 64)["occupancy_entropy"] == pytest.approx(6.0)
    hits, majority, purity = node_statistics([0, 0, 0, 2], [5, 5, 3, 7], 3)
    assert hits.tolist() == [3, 0, 1] and majority.tolist() == [5, -1, 7]
    assert purity.tolist() == pytest.approx([2 / 3, 0.0, 1.0])


# ---- the evaluate command on a tiny run -----------------------------------------------------------
def test_evaluate_command_reproduces_the_run(tiny_run, data_dir, capsys):
    r, logdir = tiny_run
    ev = dpsom.ex.run("evaluate", config_updates={"checkpoint": str(logdir), "data_dir": data_dir, "latent_dim": 7},
                      options={"--loglevel": "ERROR"})
    assert ev.result == r.result                                               # eval_sample: the same seeded noise
    assert "ignored: latent_dim=7 (checkpoint: 10)" in capsys.readouterr().out  # says what it did not use
    with open(logdir / "evaluation_validation.json") as f:
        saved = json.load(f)
    assert saved["metrics"] == r.result and saved["samples"] == 300 and saved["global_step"] == 9
    per_sample = np.load(logdir / "evaluation_validation.npz")
    assert per_sample["bmu"].shape == per_sample["label"].shape == (300,)
    assert len(np.unique(per_sample["bmu"])) == r.result["nodes_used"]
    with pytest.raises(ValueError, match="config checkpoint=None"):
        dpsom.ex.run("evaluate", options={"--loglevel": "ERROR"})


def test_evaluate_command_on_another_set_and_on_the_posterior_mean(tiny_run, data_dir):
    r, logdir = tiny_run                                     # trained with validation=True, eval_sample=True
    ev = dpsom.ex.run_commandline(["dpsom.py", "evaluate", "-l", "ERROR", "with", f"checkpoint={logdir}",
                                   f"data_dir={data_dir}", "validation=False", "eval_sample=False"])
    with open(logdir / "evaluation_test_mean.json") as f:
        saved = json.load(f)
    assert saved["set"] == "test" and saved["eval_sample"] is False and saved["metrics"] == ev.result
    state = torch.load(logdir / "checkpoint.pt", map_location="cpu", weights_only=False)
    model = training.build_model(state["config"])
    model.load_state_dict(state["model"])
    test = dpsom.load_data_or_explain({**state["config"], "validation": False, "data_dir": data_dir},
                                      max_eval_samples=300)
    x = torch.as_tensor(test["x_eval"])
    mean, _ = training.evaluate_model(model, x, test["y_eval"], 16, sample=False)
    sample, _ = training.evaluate_model(model, x, test["y_eval"], 16, sample=True)
    assert ev.result == mean and mean != sample                # the test images, encoded as the mean
