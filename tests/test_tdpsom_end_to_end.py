"""T-DPSOM through its real entry point (tdpsom.py's Sacred experiment), on a few seconds of synthetic stays: the
plan of four phases, which parameters each op trains, the target distribution over steps, the evaluation pass
and its forecast, TensorBoard, the evaluate and assign commands, resume mid-joint bit for bit, and refusals."""
import csv
import json
import os
import signal

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import plan_runner
import tdpsom
from checkpoint import Interrupted
from tdpsom_model import TDPSOM
from tdpsom_training import build_model, epoch_plan, infer, phase_loss, target_distribution

N, T, D = 48, 8, 5
TINY = {"som_dim": [3, 4], "latent_dim": 4, "lstm_dim": 8, "batch_size": 8, "epochs_pretrain": 3,
        "som_learning_rates": [0.1, 0.01], "som_epochs": 1, "num_epochs": 3, "epochs_finetune": 2, "forecast_steps": 3,
        "log_every": 2, "seed": 3}


def stays(path, n=N, labels=True) -> str:
    """Stays whose hidden state (0, 1, 2) moves on at random steps and sets the features' mean."""
    rng = np.random.RandomState(0)
    y = np.cumsum(rng.rand(n, T) < 0.25, axis=1) % 3                  # (n, T)
    x = (2.0 * y[..., None] + 0.3 * rng.randn(n, T, D)).astype(np.float32)
    np.savez(path, x=x, **({"y": y, "label_names": np.array(["state"])} if labels else {}))
    return str(path)


def run(tmp_path, name="run", command="main", **config):
    updates = {**TINY, "data_path": stays(tmp_path / "stays.npz"), "logdir": str(tmp_path / name), **config}
    return tdpsom.ex.run(command, config_updates=updates, options={"--loglevel": "ERROR"})


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One whole run, shared by the tests that read it."""
    tmp = tmp_path_factory.mktemp("tdpsom")
    return run(tmp), tmp


# ---- the plan and the ops ----------------------------------------------------------------------------------
def test_the_reference_plan_has_its_op_count():
    """TempDPSOM.py's defaults: 50 pretraining epochs, 3 SOM blocks of 50 // 3 = 16 epochs at 0.1, 0.01, 0.01, 100
    joint epochs of two ops and 50 fine-tuning epochs: 7,656 op runs at 22 batches an epoch (design §3)."""
    c = {"epochs_pretrain": 50, "som_epochs": None, "som_learning_rates": [0.1, 0.01, 0.01], "num_epochs": 100,
         "epochs_finetune": 50, "learning_rate": 1e-3, "val_epochs": False}
    plan = epoch_plan(c)
    assert [e.phase for e in plan] == ["pretrain"] * 50 + ["som_init"] * 48 + ["joint"] * 100 + ["finetune"] * 50
    assert [e.lr for e in plan if e.phase == "som_init"] == [0.1] * 16 + [0.01] * 32
    assert sum(len(e.ops) for e in plan) * 22 == 7656
    assert all(e.ops == ("joint", "prediction") and e.targets for e in plan if e.phase == "joint")
    assert [i for i, e in enumerate(plan) if e.evaluate] == [len(plan) - 1]


def small_model() -> TDPSOM:
    torch.manual_seed(0)
    return build_model({**tdpsom_defaults(), **TINY, "input_dim": D})


def tdpsom_defaults() -> dict:
    return dict(tdpsom.ex.configurations[0]())


GROUPS = {"embeddings": lambda n: n == "embeddings", "encoder": lambda n: n.startswith(("encoder", "enc_")),
          "prediction": lambda n: n.startswith(("lstm", "predictor")), "decoder": lambda n: n.startswith("decoder")}


@pytest.mark.parametrize("op, trained", [("pretrain", {"encoder", "decoder"}), ("som_init", {"embeddings"}),
                                         ("joint", set(GROUPS)), ("prediction", {"prediction"})])
def test_each_op_trains_the_reference_train_ops_variables(op, trained):
    model = small_model()
    x = torch.randn(4, T, D)
    p = torch.softmax(torch.randn(4 * T, 12), 1)
    loss, parts = phase_loss(model, op, x, p)
    loss.backward()
    got = {g for name, prm in model.named_parameters() if prm.grad is not None and prm.grad.abs().sum() > 0
           for g, match in GROUPS.items() if match(name)}
    assert got == trained
    assert all(torch.isfinite(v) for v in parts.values())


def test_target_distribution_sums_over_every_step_of_every_stay():
    """P's column sums run over all N*T rows (the reference concatenates q over the stays); a per-stay P differs."""
    model = small_model()
    x = torch.randn(10, T, D)
    p = target_distribution(model, x, batch_size=4, sample=False)       # batches of 4 stays: 3 batches
    q = model.soft_assign(infer(model, x, 4, sample=False, decode=False)["dist"].reshape(10 * T, -1)).double()
    want = q ** 2 / q.sum(0)
    want = want / want.sum(1, keepdim=True)
    assert p.shape == (10 * T, 12) and torch.allclose(p.double(), want, atol=1e-6)
    per_stay = TDPSOM.target_distribution(q[:T])
    assert not torch.allclose(p[:T].double(), per_stay, atol=1e-4)


def test_forecast_rolls_out_from_the_lstm_state_of_the_first_steps():
    """z_pred[:, 0] is the forecast after steps 0..T-S-1; each later one feeds the previous forecast back."""
    model, S = small_model(), 3
    x = torch.randn(5, T, D)
    out = infer(model, x, batch_size=2, sample=False, forecast_steps=S)
    assert out["z_pred"].shape == (5, S, 4) and out["x_pred"].shape == (5, S, D) and out["x_rec"].shape == (5, T, D)
    model.eval()
    with torch.no_grad():
        z = model.encode(x.reshape(-1, D))[0].view(5, T, -1)
        assert torch.allclose(out["z"], z, atol=1e-6)
        loc, _, state = model.predict(z[:, :T - S])
        steps = [loc[:, -1]]
        for _ in range(S - 1):
            loc, _, state = model.predict(steps[-1][:, None], state)
            steps.append(loc[:, -1])
        assert torch.allclose(out["z_pred"], torch.stack(steps, 1), atol=1e-6)
        assert torch.allclose(out["x_pred"], model.decode(out["z_pred"].reshape(-1, 4))[0].view(5, S, D), atol=1e-6)
    sampled = infer(model, x, batch_size=2, sample=True, forecast_steps=S)
    again = infer(model, x, batch_size=2, sample=True, forecast_steps=S)   # seeded: `evaluate` repeats a run
    assert not torch.allclose(sampled["z"], out["z"]) and torch.equal(sampled["z"], again["z"])


# ---- a whole run ------------------------------------------------------------------------------------------
def test_a_run_trains_every_phase_and_reports_every_number(done):
    r, tmp = done
    result = json.load(open(tmp / "run" / "result.json"))                # every number
    for key in ("nmi/state", "ami/state", "purity/state", "moran/state", "moran_reference/state", "qe", "te",
                "qe_step/0", f"te_step/{T - 1}", "pred_ze", "pred_xhat", "pred_rec", "pred_ze_step/3", "nodes_used"):
        assert key in result and np.isfinite(result[key]), key
    assert result["purity/state"] > 0.6     # three well separated states, 12 nodes; chance is about 0.4
    # Sacred prints and records the headline numbers, not a line of every step's
    assert r.result == pytest.approx({k: v for k, v in result.items() if "_step/" not in k})
    assert "pred_ze" in r.result and "qe_step/0" not in r.result
    state = torch.load(tmp / "run" / "checkpoint.pt", weights_only=False)
    batches = int(int(N * 0.85) * 0.8) // TINY["batch_size"]
    assert state["phase"] == "finetune" and state["global_step"] == batches * (3 + 2 + 3 * 2 + 2)
    assert state["config"]["input_dim"] == D and state["config"]["label_names"] == ["state"]


def test_tensorboard_has_each_ops_scalars_and_the_pictures(done):
    _, tmp = done
    acc = EventAccumulator(str(tmp / "run"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    for tag in ("pretrain/elbo", "pretrain/val_nll", "som_init/loss", "joint/joint/loss", "joint/joint/smooth",
                "joint/joint/val_cah", "joint/prediction/pred", "finetune/pred", "finetune/lr", "eval/nmi/state",
                "eval/pred_ze"):
        assert tag in scalars, tag
    for tag in ("pretrain/hit_map", "som_init/u_matrix", "joint/label_mean/state", "joint/trajectories",
                "finetune/component_planes/feature_0"):
        assert tag in images, tag


def test_evaluate_repeats_the_runs_numbers_and_assign_places_every_step(done, tmp_path):
    r, tmp = done
    ev = tdpsom.ex.run("evaluate", config_updates={"checkpoint": str(tmp / "run")}, options={"--loglevel": "ERROR"})
    assert ev.result == r.result
    assert json.load(open(tmp / "run" / "evaluation_test.json"))["metrics"] == json.load(open(tmp / "run" / "result.json"))
    saved = np.load(tmp / "run" / "evaluation_test.npz")
    assert saved["bmu"].shape == saved["label"].shape[:2] == (N - int(N * 0.85), T)
    new = stays(tmp_path / "new.npz", n=7)
    a = tdpsom.ex.run("assign", config_updates={"checkpoint": str(tmp / "run"), "data_path": new},
                      options={"--loglevel": "ERROR"})
    assert a.result["stays"] == 7
    out = np.load(tmp / "run" / "assignments.npz")
    assert out["bmu"].shape == (7, T) and out["q"].shape == (7, T, 12)
    assert np.array_equal(out["bmu"], out["q"].argmax(-1))                # the nearest node has the largest q
    assert np.array_equal(out["row"] * 4 + out["column"], out["bmu"])     # a 3 x 4 map: row-major
    rows = list(csv.DictReader(open(tmp / "run" / "assignments.csv")))
    assert len(rows) == 7 * T and rows[T + 2]["stay"] == "1" and rows[T + 2]["step"] == "2"
    assert int(rows[T + 2]["bmu"]) == out["bmu"][1, 2] and rows[T + 2]["state"] == str(out["label"][1, 2, 0])


def test_a_run_stopped_mid_joint_resumes_bit_for_bit(tmp_path, monkeypatch):
    whole = run(tmp_path, "whole")
    real, count = plan_runner.train_step, {"n": 0}
    stop_at = 3 * 4 + 2 * 4 + 3            # pretrain, som_init, then the joint op of joint epoch 1's second batch

    def stopping(*args):
        parts = real(*args)
        count["n"] += 1
        if count["n"] == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return parts

    monkeypatch.setattr(plan_runner, "train_step", stopping)
    with pytest.raises(Interrupted):
        run(tmp_path, "stopped")
    monkeypatch.setattr(plan_runner, "train_step", real)
    mid = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert mid["phase"] == "joint" and mid["batch"] == 2 and mid["targets"] is not None   # after the batch's 2 ops
    resumed = tdpsom.ex.run(config_updates={"resume": str(tmp_path / "stopped")}, options={"--loglevel": "ERROR"})
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.result == whole.result


def test_resume_refuses_a_num_epochs_that_moves_the_epoch_it_stopped_in(tmp_path, done):
    """Stopped in fine-tuning's first epoch, the run cannot gain or lose joint epochs: the stopped epoch would
    become another phase's."""
    from config_checks import SetupError
    _, tmp = done
    state = torch.load(tmp / "run" / "checkpoint.pt", weights_only=False)
    start = 3 + 2 + 3                                                   # pretrain, som_init, joint epochs
    state.update(plan_index=start, batch=1, phase="finetune", epoch=0)
    (tmp_path / "mid").mkdir()
    torch.save(state, tmp_path / "mid" / "checkpoint.pt")
    for epochs in (2, 4):
        with pytest.raises(SetupError, match=f"num_epochs={epochs}: the run is past joint training"):
            tdpsom.ex.run(config_updates={"resume": str(tmp_path / "mid"), "num_epochs": epochs},
                          options={"--loglevel": "ERROR"})
    with pytest.raises(SetupError, match="logdir=.*elsewhere.*continues in its checkpoint's folder"):   # not ignored
        tdpsom.ex.run(config_updates={"resume": str(tmp_path / "mid"), "logdir": str(tmp_path / "elsewhere")},
                      options={"--loglevel": "ERROR"})
    assert not (tmp_path / "elsewhere").exists()


def test_a_saved_pretraining_runs_the_rest_of_the_plan(tmp_path):
    """use_saved_pretrain starts after SOM initialisation, also when there are no joint epochs (fine-tuning
    follows); a saved file of another optimiser is refused by name."""
    from config_checks import SetupError
    pre = str(tmp_path / "pre.pt")
    run(tmp_path, "save", num_epochs=0, epochs_finetune=0, save_pretrain=True, pretrain_path=pre)
    saved = torch.load(pre, weights_only=False)["global_step"]
    run(tmp_path, "use", num_epochs=0, use_saved_pretrain=True, pretrain_path=pre)
    state = torch.load(tmp_path / "use" / "checkpoint.pt", weights_only=False)
    assert state["phase"] == "finetune" and state["global_step"] == saved + 2 * 4   # 2 epochs of 4 batches
    with pytest.raises(SetupError, match="adam: saved 'tf1', now 'torch'"):
        run(tmp_path, "other", use_saved_pretrain=True, pretrain_path=pre, adam="torch")


# ---- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    ({"data_path": None}, "data_path=None: give the file of stays"),
    ({"som_dim": [4]}, "som_dim=[4]: must be two positive integers"),
    ({"last_step_target": "next"}, "last_step_target='next': must be one of"),
    ({"lstm_gates": "relu"}, "lstm_gates='relu'"),
    ({"val_epochs": "false"}, "must be True or False"),
    ({"normalize": "max"}, "normalize='max'"),
    ({"forecast_steps": T}, "forecast_steps=8 needs at least 9"),
    ({"batch_size": 100}, "batch_size=100: is larger than the 32 training stays"),
    ({"component_planes": ["nope"]}, "component_planes: 'nope' is not a feature"),
    ({"checkpoint_every": -1}, "checkpoint_every=-1: must be a non-negative number of seconds"),
])
def test_bad_config_fails_before_training_naming_the_key(tmp_path, config, message):
    from config_checks import SetupError
    with pytest.raises(SetupError, match=message.replace("[", r"\[").replace("(", r"\(")):
        run(tmp_path, **config)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_ragged_stays_are_refused_with_the_fix(tmp_path):
    from config_checks import SetupError
    np.save(tmp_path / "ragged.npy", np.array([np.zeros((3, 2)), np.zeros((4, 2))], dtype=object))
    with pytest.raises(SetupError, match="cut or pad them to a common T"):
        tdpsom.ex.run(config_updates={**TINY, "data_path": str(tmp_path / "ragged.npy"),
                                      "logdir": str(tmp_path / "r")}, options={"--loglevel": "ERROR"})


def test_evaluate_refuses_a_dpsom_checkpoint(tmp_path):
    from config_checks import SetupError
    torch.save({"model": {}, "optimizer": {}, "config": {"latent_dim": 4}, "plan_index": 0}, tmp_path / "c.pt")
    with pytest.raises(SetupError, match="not a T-DPSOM checkpoint"):
        tdpsom.ex.run("evaluate", config_updates={"checkpoint": str(tmp_path / "c.pt")},
                      options={"--loglevel": "ERROR"})
