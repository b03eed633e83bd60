"""Never lose a run: signals, resume in every phase, atomic checkpoints, fallbacks, refusals, determinism."""
import errno
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import checkpoint
import dpsom
import mnist_data
from conftest import ROOT
from test_end_to_end import TINY, run

ARGS = [f"{k}={v}" for k, v in TINY.items()]   # 6 steps an epoch: pretrain 1-6, som_init 7-18, train 19-30


def cli(tmp_path, data_dir, logdir, *extra, stop_at=None):
    script = ["tests/interrupt_at.py", str(stop_at)] if stop_at else ["dpsom.py"]
    cmd = [sys.executable, *script, "-F", str(tmp_path / "sacred"), "with", *ARGS, f"data_dir={data_dir}",
           f"logdir={logdir}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def weights(path):
    return torch.load(path, weights_only=False)["model"]


def test_sigterm_in_every_phase_then_resume_gives_identical_results(tmp_path, data_dir):
    reference = run(tmp_path, data_dir, logdir=str(tmp_path / "straight"))
    logdir = tmp_path / "interrupted"
    for stop_at, phase in [(4, "pretrain"), (9, "som_init"), (26, "train")]:
        resume = [f"resume={logdir}"] if stop_at > 4 else []
        out = cli(tmp_path, data_dir, logdir, *resume, stop_at=stop_at)
        assert out.returncode == 130, out.stderr[-2000:]
        assert f"in phase {phase}" in out.stderr and f"global step {stop_at}" in out.stderr
        assert f"resume={logdir}" in out.stderr                      # says how to continue
        ckpt = torch.load(logdir / "checkpoint.pt", weights_only=False)
        assert ckpt["global_step"] == stop_at and ckpt["phase"] == phase
        runs = sorted(os.listdir(tmp_path / "sacred"), key=lambda d: int(d) if d.isdigit() else -1)
        status = json.load(open(tmp_path / "sacred" / runs[-1] / "run.json"))["status"]
        assert status == "INTERRUPTED"
    out = cli(tmp_path, data_dir, logdir, f"resume={logdir}")
    assert out.returncode == 0, out.stderr[-2000:]
    final, straight = weights(logdir / "checkpoint.pt"), weights(tmp_path / "straight" / "checkpoint.pt")
    assert final.keys() == straight.keys()
    for name in final:
        assert torch.equal(final[name], straight[name]), name
    nmi = float(out.stdout.split("nmi: ")[1].split()[0])
    assert nmi == pytest.approx(reference.result["nmi"], abs=1e-4)   # printed with 4 decimals


def test_same_seed_is_bit_identical(tmp_path, data_dir):
    a = run(tmp_path, data_dir, logdir=str(tmp_path / "a"), num_epochs=1)
    b = run(tmp_path, data_dir, logdir=str(tmp_path / "b"), num_epochs=1)
    assert a.result == b.result
    wa, wb = weights(tmp_path / "a" / "checkpoint.pt"), weights(tmp_path / "b" / "checkpoint.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def two_checkpoints(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    for step in (1, 2):
        checkpoint.save_checkpoint(path, {"model": {"w": torch.full((1000,), float(step))}, "optimizer": {},
                                     "config": {}, "plan_index": step, "global_step": step})
    return path


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, capsys):
    path = two_checkpoints(tmp_path)
    blob = open(path, "rb").read()
    rng = random.Random(0)
    for cut in [0, 1, 100] + [rng.randrange(len(blob)) for _ in range(5)]:
        with open(path, "wb") as f:
            f.write(blob[:cut])
        state = checkpoint.load_checkpoint(path, torch.device("cpu"))
        assert state["global_step"] == 1 and state["path"] == path + ".prev"
        assert f"cannot load checkpoint {path}" in capsys.readouterr().err
    with open(path, "wb") as f:
        f.write(blob)
    assert checkpoint.load_checkpoint(str(tmp_path), torch.device("cpu"))["global_step"] == 2   # a run folder works too


def test_full_disk_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = two_checkpoints(tmp_path)

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_checkpoint(path, {"x": 1})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path, torch.device("cpu"))["global_step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.prev"]     # no stray temp file


def test_resume_refuses_another_config_naming_the_keys(tmp_path, data_dir):
    run(tmp_path, data_dir, num_epochs=0, som_learning_rates=[])
    with pytest.raises(ValueError, match=r"som_dim: checkpoint \[8, 8\], now \[4, 4\].*convolution|convolution.*som_dim"):
        run(tmp_path, data_dir, resume=str(tmp_path / "run"), som_dim=[4, 4], convolution=True)
    with pytest.raises(ValueError, match=r"config resume=.*does not exist"):
        run(tmp_path, data_dir, resume=str(tmp_path / "nowhere"))


def test_resume_after_non_finite_loss(tmp_path, data_dir, monkeypatch):
    real = dpsom.phase_loss
    poison = {"on": True}

    def poisoned(model, phase, x, p):
        total, parts = real(model, phase, x, p)
        if poison["on"] and phase == "som_init":
            parts = {"loss": parts["loss"] * float("inf")}
            total = parts["loss"]
        return total, parts

    monkeypatch.setattr(dpsom, "phase_loss", poisoned)
    with pytest.raises(dpsom.NonFiniteLoss, match="phase som_init, epoch 0, global step 7 \\(terms: loss\\)"):
        run(tmp_path, data_dir)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["phase"] == "pretrain" and ckpt["global_step"] == 6
    poison["on"] = False
    r = run(tmp_path, data_dir, resume=str(tmp_path / "run"))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["global_step"] == 30
    assert 0 < r.result["nmi"] < 1


def test_unwritable_data_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    mnist_data.read_dataset.cache_clear()
    with pytest.raises(mnist_data.DataError, match="cannot write to"):
        mnist_data.load_data("MNIST", str(blocker), True)
