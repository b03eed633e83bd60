"""The plan runner (plan_runner.py) driven by a toy recipe shaped like T-DPSOM's: stays of T steps, phases named
by the recipe, a joint epoch of two ops per batch (joint, then prediction) with P over every step of every stay
recomputed each epoch, and a fine-tuning phase of the second op alone. Checked: the order of the ops, one global
step per op, each op's learning rate from the global step before it, the batch's stays and P rows each op gets,
the targets recomputed once a joint epoch, the log points, the pretrain points, and a stop mid-epoch resumed to
the uninterrupted run bit for bit (a runner that recomputes P on resume fails it)."""
import os
import signal

import pytest
import torch
from torch import nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import plan_runner
from checkpoint import Interrupted, load_checkpoint
from plan_runner import Epoch

N, T, D, K, B = 6, 4, 3, 5, 2          # stays, steps, features, map nodes, stays a batch: 3 batches an epoch
PLAN = [Epoch("warmup", 0.1, ("ae",), pictures=True),
        Epoch("joint", 0.01, ("joint", "prediction"), targets=True),
        Epoch("joint", 0.01, ("joint", "prediction"), targets=True, evaluate=True),
        Epoch("finetune", 0.001, ("prediction",), evaluate=True, pictures=True)]
OPS = ["ae"] * 3 + ["joint", "prediction"] * 6 + ["prediction"] * 3          # 18 optimiser steps
CONFIG = dict(batch_size=B, compile=False, adam="tf1", learning_rate=0.01, decay_factor=0.5, decay_steps=3,
              log_every=3, save_pretrain=False, use_saved_pretrain=False, som_dim=[1, K], checkpoint_every=0)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(D, K), nn.Linear(K, K)

    def code(self, x: torch.Tensor) -> torch.Tensor:
        """A noisy code of every step (B*T, K): the noise draws on training's random stream."""
        return self.enc(x.reshape(-1, D)) + 0.1 * torch.randn(x.shape[0] * x.shape[1], K)


def toy_loss(model: Toy, op: str, x: torch.Tensor, p: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    h = model.code(x)                                                          # (B*T, K)
    if op == "ae":
        loss = h.pow(2).mean()
    elif op == "joint":
        loss = (h.softmax(1) - p).pow(2).sum(1).mean() + model.head(h).pow(2).mean()
    else:
        loss = (model.head(h.detach()) - 1).pow(2).mean()
    return loss, {"loss": loss}


class ToyRecipe:
    save_pretrain_after, saved_pretrain_starts = "warmup", "joint"

    def __init__(self):
        self.plan, self.phase_loss, self.P, self.pictured = PLAN, toy_loss, [], []

    def build_model(self) -> Toy:
        return Toy()

    def targets(self, model: Toy, x_train: torch.Tensor, x_eval: torch.Tensor) -> tuple:
        with torch.no_grad():
            q = model.code(x_train).softmax(1)                                 # (N*T, K): every step of every stay
            p = q ** 2 / q.sum(0)
            self.P.append(p / p.sum(1, keepdim=True))
            return self.P[-1], self.P[-1][:B * T]

    def evaluate(self, model: Toy, x_eval: torch.Tensor) -> dict:
        return {"score": model.head.weight.detach().sum().item()}

    def pictures(self, log, model, x_eval, phase, step, end_of_phase) -> None:
        self.pictured.append((phase, step, end_of_phase))


@pytest.fixture
def steps(monkeypatch):
    """Every optimiser step the runner takes: (op, lr, x, p); `stop_at` sends SIGTERM inside that step."""
    record = {"calls": [], "stop_at": None}
    real = plan_runner.train_step

    def recording(model, opt, op, x, p, lr, loss_fn):
        record["calls"].append((op, lr, x, p))
        if len(record["calls"]) == record["stop_at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, opt, op, x, p, lr, loss_fn)

    monkeypatch.setattr(plan_runner, "train_step", recording)
    return record


def run(tmp_path, name: str, recipe=None, resume=None, **updates) -> tuple[ToyRecipe, dict]:
    torch.manual_seed(0)
    data = {"x_train": torch.rand(N, T, D, generator=torch.Generator().manual_seed(1)), "x_eval": torch.rand(N, T, D)}
    recipe = recipe or ToyRecipe()
    c = {**CONFIG, "pretrain_path": str(tmp_path / "pre.pt"), **updates}
    metrics = plan_runner.run_plan(recipe, c, data, torch.device("cpu"), str(tmp_path / name), None, resume,
                                   "continue with: resume")
    return recipe, metrics


def checkpoint_tensors(path) -> dict:
    state = torch.load(path, weights_only=False)
    opt = {f"opt/{i}/{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()
           if isinstance(v, torch.Tensor)}
    return {**state["model"], **opt}


def test_two_ops_a_batch_one_global_step_lr_per_op_targets_per_epoch(tmp_path, steps):
    recipe, metrics = run(tmp_path, "straight")
    calls = steps["calls"]
    assert [op for op, *_ in calls] == OPS
    assert torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["global_step"] == 18
    # lr = base * 0.5 ** (global step before the op // 3), counted in ops: batch 1 of joint epoch 0 (global steps 5
    # and 6 before its ops) gives its joint op 0.01 * 0.5 and its prediction op 0.01 * 0.25
    assert [lr for _, lr, *_ in calls] == pytest.approx(
        [0.1] * 3 + [0.005] * 3 + [0.0025] * 3 + [0.00125] * 3 + [0.000625] * 3 + [0.001 * 0.5 ** 5] * 3)
    assert len(recipe.P) == 2                                          # once a joint epoch, at its start
    x_train = torch.rand(N, T, D, generator=torch.Generator().manual_seed(1))
    for i, (op, _, x, p) in enumerate(calls):
        b = (i - 3) // 2 % 3 if 3 <= i < 15 else i % 3                  # the batch of the epoch
        assert torch.equal(x, x_train[b * B:(b + 1) * B]), i          # (B, T, D): the batch's stays
        if op == "ae" or i >= 15:
            assert p is None, i
        else:                                                          # the batch's B*T rows of its epoch's P
            assert torch.equal(p, recipe.P[(i - 3) // 6][b * B * T:(b + 1) * B * T]), i
    assert not torch.equal(recipe.P[0], recipe.P[1])                    # the second from the weights then
    assert recipe.pictured == [("warmup", 3, True), ("finetune", 18, True)]
    acc = EventAccumulator(str(tmp_path / "straight"))
    acc.Reload()
    # a log point where the global step passes a multiple of log_every (3) within a batch, and at an epoch's end
    assert [e.step for e in acc.Scalars("joint/joint/loss")] == [7, 9, 13, 15]
    assert [e.step for e in acc.Scalars("joint/prediction/val_loss")] == [7, 9, 13, 15]
    assert [e.value for e in acc.Scalars("joint/prediction/lr")] == pytest.approx([0.0025, 0.0025, 0.000625, 0.000625])
    assert [e.step for e in acc.Scalars("warmup/loss")] == [3] and [e.step for e in acc.Scalars("finetune/loss")] == [18]
    assert [e.step for e in acc.Scalars("eval/score")] == [15, 18] and metrics == {"score": pytest.approx(
        acc.Scalars("eval/score")[-1].value)}


@pytest.mark.parametrize("every, saved_at_steps", [(0, [3, 9, 15, 18]), (3600, [3, 15, 18])])
def test_a_checkpoint_ends_every_phase_and_an_epoch_once_checkpoint_every_has_passed(tmp_path, steps, monkeypatch,
                                                                                     every, saved_at_steps):
    # 0: every epoch; an hour: the phases' last epochs only (warmup, the second joint epoch, finetune)
    saved, real = [], plan_runner.save_checkpoint
    monkeypatch.setattr(plan_runner, "save_checkpoint", lambda path, state: saved.append(state["global_step"])
                        or real(path, state))
    run(tmp_path, "straight", checkpoint_every=every)
    assert saved == saved_at_steps


def test_a_stop_between_the_ops_of_a_batch_resumes_to_the_uninterrupted_run(tmp_path, steps):
    run(tmp_path, "straight")
    straight = [(op, lr) for op, lr, *_ in steps["calls"]]
    steps["calls"].clear()
    steps["stop_at"] = 12                       # joint epoch 1, batch 1: the signal comes during its joint op
    with pytest.raises(Interrupted, match="in phase joint, epoch 1, global step 13;"):
        run(tmp_path, "stopped")
    state = load_checkpoint(str(tmp_path / "stopped"))
    assert (state["global_step"], state["plan_index"], state["batch"], state["phase"]) == (13, 2, 2, "joint")
    assert len(state["targets"]) == 2 and state["targets"][0].shape == (N * T, K)   # P kept mid-epoch
    steps["stop_at"] = None
    recipe, _ = run(tmp_path, "stopped", resume=state)
    assert recipe.P == []                                              # the stored P, not recomputed
    assert [(op, lr) for op, lr, *_ in steps["calls"]] == straight      # the batch's prediction op ran before the stop
    a, b = checkpoint_tensors(tmp_path / "straight" / "checkpoint.pt"), checkpoint_tensors(tmp_path / "stopped" /
                                                                                           "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the check can fail: P recomputed on resume (from the weights mid-epoch) gives other weights
    run(tmp_path, "recomputed", resume={**state, "targets": None})
    c = checkpoint_tensors(tmp_path / "recomputed" / "checkpoint.pt")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_the_pretrain_points_are_the_recipes_phases(tmp_path, steps):
    run(tmp_path, "a", save_pretrain=True)
    saved = torch.load(tmp_path / "pre.pt", weights_only=False)
    assert saved["phase"] == "warmup" and saved["global_step"] == 3
    steps["calls"].clear()
    recipe, _ = run(tmp_path, "b", use_saved_pretrain=True)
    assert [op for op, *_ in steps["calls"]] == OPS[3:] and len(recipe.P) == 2
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["global_step"] == 18


def test_a_non_finite_loss_names_the_phase_and_op(tmp_path, steps, monkeypatch):
    recipe = ToyRecipe()
    recipe.phase_loss = lambda model, op, x, p: (lambda t, parts: (t * float("nan"), {"loss": t * float("nan")}) if (
        op == "prediction" and model.training) else (t, parts))(*toy_loss(model, op, x, p))
    with pytest.raises(plan_runner.NonFiniteLoss, match=r"phase joint/prediction, epoch 0, global step 5 \(terms: loss\)"):
        run(tmp_path, "nan", recipe=recipe)
