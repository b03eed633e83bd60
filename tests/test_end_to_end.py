"""Seconds-long runs through the real Sacred entry point on real MNIST."""
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dpsom
from conftest import ROOT, Started, one_thread

TINY = dict(max_train_samples=600, batch_size=100, epochs_pretrain=1, som_epochs=1, som_learning_rates=[0.9, 0.1],
            num_epochs=2, latent_dim=10, validation=True, log_every=3, max_eval_samples=1000, seed=1)
METRICS = {"nmi", "purity", "ami", "ari", "nll", "mse", "quantization_error", "topographic_error", "nodes_used",
           "occupancy_entropy"}   # of an 8x8 map on 10 classes: no Hungarian accuracy


def run(tmp_path, data_dir, **updates):
    config = {**TINY, "data_dir": data_dir, "logdir": str(tmp_path / "run"),
              "pretrain_path": str(tmp_path / "pre.pt"), **updates}
    return dpsom.ex.run(config_updates=config, options={"--loglevel": "ERROR"})


def tags(logdir):
    acc = EventAccumulator(logdir)
    acc.Reload()
    return acc


def test_three_phases_result_checkpoint_and_tensorboard(tmp_path, data_dir):
    r = run(tmp_path, data_dir)
    assert set(r.result) == METRICS
    assert 0 < r.result["nmi"] < 1 and 0.1 < r.result["purity"] <= 1
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    steps = 6                                                    # 600 // 100 per epoch
    assert ckpt["global_step"] == steps * (1 + 2 + 2) and ckpt["phase"] == "train" and ckpt["epoch"] == 1
    assert set(ckpt) >= {"model", "optimizer", "global_step", "phase", "epoch", "config", "rng"}
    assert ckpt["config"]["latent_dim"] == 10
    assert ckpt["model"]["embeddings"].shape == (8, 8, 10)
    acc = tags(str(tmp_path / "run"))
    scalars = set(acc.Tags()["scalars"])
    for tag in ["pretrain/elbo", "pretrain/nll", "pretrain/kl", "pretrain/lr", "pretrain/val_elbo", "som_init/loss",
                "som_init/lr", "train/loss", "train/elbo", "train/cah", "train/som", "train/val_loss", "eval/nmi",
                "eval/purity", "eval/ami"]:
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars("pretrain/elbo")] == [3, 6]
    assert [e.step for e in acc.Scalars("som_init/loss")] == [9, 12, 15, 18]
    lrs = [e.value for e in acc.Scalars("som_init/lr")]
    assert lrs[:2] == pytest.approx([0.9, 0.9]) and lrs[2:] == pytest.approx([0.1, 0.1])
    assert acc.Scalars("eval/nmi")[-1].value == pytest.approx(r.result["nmi"], rel=1e-6)


@pytest.fixture(scope="module")
def saved_pretrain(tmp_path_factory, data_dir):
    """The file of a run that stopped after SOM initialisation with save_pretrain=True."""
    folder = tmp_path_factory.mktemp("pretrain")
    run(folder, data_dir, save_pretrain=True, num_epochs=0, logdir=str(folder / "a"))
    return folder / "pre.pt"


def test_save_and_use_saved_pretrain(tmp_path, data_dir, saved_pretrain):
    saved = torch.load(saved_pretrain, weights_only=False)
    assert saved["phase"] == "som_init" and saved["global_step"] == 6 * 3
    r = run(tmp_path, data_dir, use_saved_pretrain=True, num_epochs=1, logdir=str(tmp_path / "b"),
            pretrain_path=str(saved_pretrain))
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ckpt["global_step"] == 6 * 3 + 6                      # continued the global step
    assert "pretrain/elbo" not in tags(str(tmp_path / "b")).Tags()["scalars"]
    assert set(r.result) == METRICS


@pytest.mark.parametrize("key,value", [("data_set", "CIFAR"), ("som_dim", [8]), ("som_dim", [0, 8]),
                                       ("batch_size", 5000), ("beta", -1.0), ("gamma", -2), ("alpha", 0.0),
                                       ("prior_var", 0), ("dropout", 1.0), ("adam", "sgd"), ("amp", "yes"),
                                       ("compile", 1), ("more_runs", "false"), ("save_pretrain", "no"),
                                       ("use_saved_pretrain", "false"), ("deterministic", "false"),
                                       ("leaky_logits", "false"), ("device", "gpu"), ("som_dim", 8),
                                       ("checkpoint_every", -1), ("checkpoint_every", "60")])
def test_bad_config_fails_before_training(tmp_path, data_dir, key, value):
    with pytest.raises(dpsom.SetupError, match=f"config {key}="):
        run(tmp_path, data_dir, **{key: value})
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_command_line(cli_run):
    out = subprocess.run([sys.executable, "dpsom.py", "print_config", "with", "quick", "conv"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "latent_dim = 32" in out.stdout and "convolution = True" in out.stdout and "seed = 2020" in out.stdout
    out, folder, _ = cli_run                                              # `-F FOLDER with` TINY's words
    assert "nmi:" in out.stdout and "purity:" in out.stdout
    assert os.path.exists(folder / "sacred" / "1" / "metrics.json")


def test_setup_errors_are_one_message_without_traceback(tmp_path, data_dir):
    (tmp_path / "file").write_text("")
    cases = [(["som_dim=8"], "config som_dim=8: must be two positive integers"),
             (["device=gpu"], "config device='gpu': not a device"),
             (["more_runs=false"], "config more_runs='false': must be True or False"),
             ([f"data_dir={tmp_path / 'file' / 'mnist'}"], "data: missing MNIST files and cannot write")]
    started = [Started([sys.executable, "dpsom.py", "-F", str(tmp_path / f"sacred{i}"), "with", *args,   # at once
                        f"logdir={tmp_path / 'run'}"], cwd=ROOT, env=one_thread()) for i, (args, _) in enumerate(cases)]
    for (args, says), process in zip(cases, started):
        out = process.wait()
        assert out.returncode == 1 and says in out.stderr, (args, out.stderr[-1500:])
        assert "Traceback" not in out.stderr, out.stderr


def test_saved_pretrain_of_another_model_is_refused(tmp_path, data_dir, saved_pretrain):
    with pytest.raises(dpsom.SetupError, match=r"pretrain_path=.*another model \(latent_dim: saved 10, now 12\)"):
        run(tmp_path, data_dir, use_saved_pretrain=True, latent_dim=12, logdir=str(tmp_path / "b"),
            pretrain_path=str(saved_pretrain))


def test_more_runs_are_the_single_runs_of_their_seeds(tmp_path, data_dir):
    both = run(tmp_path, data_dir, more_runs=True, n_runs=2, seed=5, num_epochs=1, logdir=str(tmp_path / "m"))
    for i, seed in enumerate((5, 6)):
        single = run(tmp_path, data_dir, seed=seed, num_epochs=1, logdir=str(tmp_path / f"s{seed}"))
        assert both.result["runs"][i] == single.result, seed
    assert both.result["nmi"] == pytest.approx((both.result["runs"][0]["nmi"] + both.result["runs"][1]["nmi"]) / 2)


def test_runs_never_share_a_folder(tmp_path, data_dir):
    run(tmp_path, data_dir, num_epochs=0, som_learning_rates=[])
    before = os.path.getmtime(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(dpsom.SetupError, match=r"holds another run; continue it with resume="):
        run(tmp_path, data_dir, num_epochs=0, som_learning_rates=[])
    assert os.path.getmtime(tmp_path / "run" / "checkpoint.pt") == before
    folders = {dpsom.ex.run("print_config", options={"--loglevel": "ERROR"}).config["logdir"] for _ in range(3)}
    assert len(folders) == 3                                              # same second, still three folders


def test_amp_on_a_cpu_without_bf16_units_warns(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True})   # no AMX, no AVX512-BF16
    run(tmp_path, data_dir, amp=True, epochs_pretrain=0, som_learning_rates=[], num_epochs=0, device="cpu")
    assert "no bf16 arithmetic" in capsys.readouterr().err
