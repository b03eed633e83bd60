"""Never lose a run: signals, resume in every phase, atomic checkpoints, fallbacks, refusals, determinism."""
import errno
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import dpsom
import mnist_data
import plan_runner
from conftest import ROOT, Started, one_thread
from test_end_to_end import TINY, run
import training

ARGS = [f"{k}={v}" for k, v in TINY.items()]   # 6 steps an epoch: pretrain 1-6, som_init 7-18, train 19-30


def cli(tmp_path, data_dir, logdir, *extra, stop_at=None, args=ARGS, wait=True):
    """dpsom.py in a fresh process; stop_at: a global step or interrupt_at.py's MOMENT to send SIGTERM at.
    wait=False: started on one thread beside others, to wait for later."""
    moment = f"step:{stop_at}" if isinstance(stop_at, int) else stop_at
    script = ["tests/interrupt_at.py", moment] if stop_at else ["dpsom.py"]
    cmd = [sys.executable, *script, "-F", str(tmp_path / "sacred"), "with", *args, f"data_dir={data_dir}",
           f"logdir={logdir}", *extra]
    if not wait:
        return Started(cmd, cwd=ROOT, env=one_thread())
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def resume(logdir, *extra):
    """`python dpsom.py with resume=LOGDIR` and nothing else of the run's config, on one thread."""
    return subprocess.run([sys.executable, "dpsom.py", "with", f"resume={logdir}", *extra], cwd=ROOT,
                          capture_output=True, text=True, env=one_thread(), timeout=300)


def weights(path):
    return torch.load(path, weights_only=False)["model"]


# The default model (latent 100, batch 300, 8x8 map) on a few batches: the size at which the CPU kernels run
# multi-threaded. Sampled codes make the target pass draw from training's random stream too (target_sample, the
# default; eval_sample for the evaluations between).
FULL = dict(max_train_samples=600, epochs_pretrain=1, som_epochs=1, som_learning_rates=[0.9, 0.1], num_epochs=11,
            val_epochs=True, validation=True, max_eval_samples=300, log_every=2, seed=3, eval_sample=True,
            checkpoint_every=0)                   # a checkpoint every epoch: the moments below count its writes
FULL_ARGS = [f"{k}={v}" for k, v in FULL.items()]   # 2 steps an epoch: pretrain 1-2, som_init 3-6, train 7-28


def tensors(state, prefix=""):
    """Every tensor of a nested checkpoint dict, by path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def assert_same_checkpoint(a, b):
    a, b = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert a["global_step"] == b["global_step"]
    ta, tb = tensors({k: a[k] for k in ("model", "optimizer")}), tensors({k: b[k] for k in ("model", "optimizer")})
    assert ta.keys() == tb.keys() and len(ta) > 40
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} of {len(ta)} tensors differ, e.g. {different[:5]}"


# The default, dense with the full-covariance posterior, is proved by the next test: its uninterrupted run and the
# same run stopped and resumed in six fresh processes end bit for bit alike, which no difference between two runs
# of one seed would let pass.
@pytest.mark.parametrize("arch", ["conv", "dense standard_layers"])
def test_same_seed_is_bit_identical_at_full_size(tmp_path, data_dir, arch):
    # conv and standard_layers (BatchNorm's statistics, dropout): the diagonal posterior
    extra = {"conv": ["convolution=True", "num_epochs=1"],
             "dense standard_layers": ["standard_layers", "num_epochs=2"]}[arch]
    for name in ("a", "b"):
        out = cli(tmp_path, data_dir, tmp_path / name, *extra, args=FULL_ARGS)
        assert out.returncode == 0, out.stderr[-2000:]
    assert_same_checkpoint(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")


def test_sigterm_at_any_moment_then_resume_gives_identical_results(tmp_path, data_dir):
    straight = cli(tmp_path, data_dir, tmp_path / "straight", args=FULL_ARGS)
    assert straight.returncode == 0, straight.stderr[-2000:]
    logdir = tmp_path / "interrupted"
    # (moment of the signal, global step of the checkpoint it leaves, its phase): the run stops after the step
    # that follows the signal, wherever the signal came.
    moments = [("step:2", 2, "pretrain"),                # right after the last step of an epoch
               ("log_pictures:1", 3, "som_init"),        # pictures at the end of pretraining
               ("save:2", 7, "train"),                   # writing the checkpoint at the end of SOM initialisation
               ("target_distribution:2", 9, "train"),    # joint epoch 1's target pass (second of its two sets)
               ("evaluate_model:1", 27, "train")]        # the evaluation after joint epoch 10 (val_epochs)
    for i, (moment, step, phase) in enumerate(moments):
        out = cli(tmp_path, data_dir, logdir, *([f"resume={logdir}"] if i else []), stop_at=moment, args=FULL_ARGS)
        assert out.returncode == 130, (moment, out.stderr[-2000:])
        assert f"in phase {phase}" in out.stderr and f"global step {step};" in out.stderr, (moment, out.stderr[-500:])
        assert f"resume={logdir}" in out.stderr                      # says how to continue
        runs = sorted(os.listdir(tmp_path / "sacred"), key=lambda d: int(d) if d.isdigit() else -1)
        assert json.load(open(tmp_path / "sacred" / runs[-1] / "run.json"))["status"] == "INTERRUPTED"
    out = cli(tmp_path, data_dir, logdir, f"resume={logdir}", args=FULL_ARGS)
    assert out.returncode == 0, out.stderr[-2000:]
    assert_same_checkpoint(logdir / "checkpoint.pt", tmp_path / "straight" / "checkpoint.pt")
    assert out.stdout.splitlines()[-1] == straight.stdout.splitlines()[-1]     # the printed numbers


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, data_dir):
    """The tiny runs that the tests below stop on their way, all started by the first of them (one thread each:
    they share the cores): name -> (run folder, started process)."""
    tmp = tmp_path_factory.mktemp("stopped")
    plans = {"alone": (["num_epochs=3"], 20),                          # 3 joint epochs, not the default 300
             "more_runs": (["more_runs=True", "n_runs=2", "num_epochs=1"], 3),
             "twice": ([], "twice:step:8"),
             "full_disk": ([], "full:save:2")}                         # the second checkpoint's write fails
    return {name: (tmp / name / "run", cli(tmp / name, data_dir, tmp / name / "run", *extra, stop_at=at, wait=False))
            for name, (extra, at) in plans.items()}


def test_resume_alone_continues_with_the_checkpoints_config(stopped):
    logdir, started = stopped["alone"]
    out = started.wait()
    assert out.returncode == 130 and f"continue with: python dpsom.py with resume={logdir}" in out.stderr
    refused = resume(logdir, "latent_dim=12")
    assert refused.returncode == 1 and "latent_dim: checkpoint 10, now 12" in refused.stderr
    assert "Traceback" not in refused.stderr
    moved = resume(logdir, f"logdir={logdir.parent / 'elsewhere'}")           # refused, not silently ignored
    assert moved.returncode == 1 and "a resumed run continues in its checkpoint's folder" in moved.stderr
    assert not (logdir.parent / "elsewhere").exists() and "Traceback" not in moved.stderr
    done = resume(logdir, "log_every=5", f"logdir={logdir}/")                  # its own folder, as a sweep gives it
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = torch.load(logdir / "checkpoint.pt", weights_only=False)
    assert ckpt["global_step"] == 6 * (1 + 2 + 3) and ckpt["config"]["log_every"] == 5   # its 3 epochs, not 300


def test_an_interrupted_more_runs_run_says_how_to_continue(stopped):
    logdir, started = stopped["more_runs"]
    out = started.wait()
    assert out.returncode == 130
    assert (f"continue this run (1 of 2, seed 1) with: python dpsom.py with resume={logdir / 'run0'}; "
            f"the runs with seeds 2 were not started") in out.stderr
    done = resume(logdir / "run0")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_second_signal_aborts_at_once_and_keeps_the_last_checkpoint(stopped):
    logdir, started = stopped["twice"]
    out = started.wait()
    assert out.returncode == 130, out.stderr[-2000:]
    assert "aborted by a second SIGTERM" in out.stderr and "Traceback" not in out.stderr
    assert f"resume={logdir}" in out.stderr
    assert torch.load(logdir / "checkpoint.pt", weights_only=False)["global_step"] == 6   # end of pretraining


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path, data_dir, monkeypatch):
    real = training.phase_loss
    monkeypatch.setattr(training, "phase_loss", lambda *a: (lambda t, p: (t * float("nan"), {"elbo": t * float("nan")}))(
        *real(*a)))
    with pytest.raises(plan_runner.NonFiniteLoss, match="global step 1 .*no checkpoint had been written yet"):
        run(tmp_path, data_dir)


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
        state = checkpoint.load_checkpoint(path)
        assert state["global_step"] == 1 and state["path"] == path + ".prev"
        assert f"cannot load checkpoint {path}" in capsys.readouterr().err
    with open(path, "wb") as f:
        f.write(blob)
    assert checkpoint.load_checkpoint(str(tmp_path))["global_step"] == 2   # a run folder works too


def test_full_disk_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = two_checkpoints(tmp_path)

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_checkpoint(path, {"x": 1})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["global_step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.prev"]     # no stray temp file


def test_a_full_disk_stops_the_run_with_the_status_a_sweep_retries(stopped):
    logdir, started = stopped["full_disk"]
    done = started.wait()
    assert done.returncode == plan_runner.TRANSIENT == 75, done.stderr[-2000:]
    assert "OSError: [Errno 28] No space left on device" in done.stderr
    assert f"the last checkpoint in {logdir} is kept; continue with: python dpsom.py with resume={logdir}" in done.stderr
    assert torch.load(logdir / "checkpoint.pt", weights_only=False)["global_step"] == 6   # the end of pretraining


def test_resume_refuses_another_config_naming_the_keys(tmp_path, data_dir):
    run(tmp_path, data_dir, num_epochs=0, som_learning_rates=[])
    with pytest.raises(ValueError, match=r"som_dim: checkpoint \[8, 8\], now \[4, 4\].*convolution|convolution.*som_dim"):
        run(tmp_path, data_dir, resume=str(tmp_path / "run"), som_dim=[4, 4], convolution=True)
    with pytest.raises(ValueError, match=r"config resume=.*does not exist"):
        run(tmp_path, data_dir, resume=str(tmp_path / "nowhere"))


def test_the_docs_name_every_key_a_resume_may_change():
    """README's and docs/runs.md's lists of keys `resume` may change are checkpoint.RESUMABLE_CHANGES, less resume
    itself and `checkpoint` (the evaluate command's)."""
    keys = checkpoint.RESUMABLE_CHANGES - {"resume", "checkpoint"}
    for doc, start in (("README.md", "With `resume` you may change"), ("docs/runs.md", "Keys given with `resume` may")):
        text = " ".join(open(os.path.join(ROOT, doc)).read().split())
        listed = text.split(start, 1)[1].split("; any other", 1)[0]
        assert set(re.findall(r"`(\w+)`", listed)) == keys, doc


def test_resume_after_non_finite_loss(tmp_path, data_dir, monkeypatch):
    real = training.phase_loss
    poison = {"on": True}

    def poisoned(model, phase, x, p):
        total, parts = real(model, phase, x, p)
        if poison["on"] and phase == "som_init":
            parts = {"loss": parts["loss"] * float("inf")}
            total = parts["loss"]
        return total, parts

    monkeypatch.setattr(training, "phase_loss", poisoned)
    with pytest.raises(plan_runner.NonFiniteLoss, match="phase som_init, epoch 0, global step 7 \\(terms: loss\\)"):
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


def test_a_checkpoint_older_than_target_sample_keeps_its_targets():
    from checkpoint import resumed_config
    now = {**dpsom.config(fixed={}), "resume": "r"}                  # today's defaults: P from a sample
    for eval_sample in (False, True):                                # before the key, eval_sample chose P's codes
        old = {k: v for k, v in now.items() if k != "target_sample"} | {"eval_sample": eval_sample}
        assert resumed_config(old, now, {"resume"})["target_sample"] is eval_sample
    assert resumed_config({**now, "target_sample": False}, now, {"resume"})["target_sample"] is False
