"""The GPU path without a GPU: every phase, evaluation, assign, checkpoints and resume (also across devices) on
a stand-in device (tests/fake_gpu.py) that refuses CPU tensors meeting device tensors, keeps a random stream of
its own that only a CPU byte tensor restores, and counts host syncs.

With DPSOM_TEST_DEVICE=cuda (benchmarks/gpu_check.sh on a GPU) the same tests run on the GPU: runs are then
deterministic=True so that a resume can repeat them, syncs are caught by CUDA's sync debug mode, and the
GPU's evaluation is compared with the CPU's within rounding (other kernels) instead of bit for bit.
"""
import contextlib
import json
import os
import sys

import numpy as np
import psutil
import pytest
import torch

import fake_gpu  # noqa: F401  (registers the stand-in device `fakegpu` in this process)
import checkpoint
import dpsom
from conftest import ROOT, Started, find_data_dir, one_thread
from fake_gpu import SYNCS
import plan_runner
import training

GPU = os.environ.get("DPSOM_TEST_DEVICE", "fakegpu")
REAL = GPU != "fakegpu"
DEVICE = torch.device(GPU)
stand_in_only = pytest.mark.skipif(REAL, reason="checks the stand-in device itself")

# 6 steps an epoch: pretrain 1-6, som_init 7-18, train 19-30; sampled codes draw on the device's stream
TINY = dict(max_train_samples=600, batch_size=100, epochs_pretrain=1, som_epochs=1, som_learning_rates=[0.9, 0.1],
            num_epochs=2, latent_dim=10, validation=True, log_every=3, max_eval_samples=1000, seed=1,
            target_sample=True, eval_sample=True)
ARGS = [f"{k}={v}" for k, v in TINY.items()] + (["deterministic=True"] if REAL else [])


def cli(tmp_path, data_dir, *words, device=GPU, stop_at=None, command=(), wait=True):
    """An entry point in a fresh process with the stand-in device installed; stop_at: SIGTERM after that step.
    One thread, as every run here, so that runs started together (wait=False) share the cores."""
    script = ["tests/interrupt_at.py", f"step:{stop_at}"] if stop_at else ["dpsom.py"]
    cmd = [sys.executable, "tests/fake_gpu.py", *script, *command, "with", *words, f"data_dir={data_dir}",
           f"device={device}"]
    started = Started(cmd, cwd=ROOT, env=one_thread())
    return started.wait() if wait else started


def train_cli(tmp_path, data_dir, logdir, *extra, **kw):
    return cli(tmp_path, data_dir, *ARGS, f"logdir={logdir}", *extra, **kw)


def copy_run(src, dst):
    """A copy of a stopped run's checkpoint to resume, so that the stopped run stays for other tests."""
    dst.mkdir()
    (dst / "checkpoint.pt").write_bytes((src / "checkpoint.pt").read_bytes())
    return dst


def weights_equal(a, b) -> list[str]:
    """The names of the model and optimiser tensors that differ between two checkpoints."""
    a, b = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert a["global_step"] == b["global_step"]
    ta = {**a["model"], **{f"opt{i}{k}": v for i, s in a["optimizer"]["state"].items() for k, v in s.items()}}
    tb = {**b["model"], **{f"opt{i}{k}": v for i, s in b["optimizer"]["state"].items() for k, v in s.items()}}
    assert ta.keys() == tb.keys() and len(ta) > 40
    return [k for k in ta if not torch.equal(ta[k], tb[k])]


@contextlib.contextmanager
def no_host_sync():
    """Fail on a host sync inside: counted on the stand-in device, refused by CUDA's sync debug mode."""
    before = SYNCS["count"]
    if DEVICE.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert SYNCS["count"] == before, SYNCS["ops"][before:]


# ---- the stand-in device itself ----------------------------------------------------------------------------
@stand_in_only
def test_the_stand_in_device_is_as_strict_as_a_gpu():
    x = torch.ones(3, device=DEVICE)
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(3)                                    # a CPU tensor meeting a device tensor
    assert torch.equal((x + torch.tensor(2.0)).cpu(), torch.full((3,), 3.0))   # a 0-dim CPU tensor may
    state = torch.get_device_module(DEVICE.type).get_rng_state()
    assert state.device.type == "cpu" and state.dtype == torch.uint8
    with pytest.raises(TypeError, match="ByteTensor"):       # what torch.cuda.set_rng_state says to a GPU tensor
        torch.get_device_module("fakegpu").set_rng_state(state.to(DEVICE))
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.set_rng_state(state.to(DEVICE))
    torch.manual_seed(5)                                     # seeds the device's stream too, apart from the CPU's
    a = torch.randn(4, device=DEVICE).cpu()
    torch.get_device_module("fakegpu").manual_seed(5)
    assert torch.equal(torch.randn(4, device=DEVICE).cpu(), a)
    before = SYNCS["count"]
    float(x.sum()), x.tolist(), x.cpu()
    assert SYNCS["count"] - before == 3


@stand_in_only
def test_the_old_way_of_loading_a_checkpoint_fails_on_the_stand_in_device(tmp_path):
    # the defect: torch.load(map_location=device) put the RNG states on the GPU, and every resume crashed
    model = training.build_model({**dpsom.config(), "latent_dim": 4, "som_dim": [2, 2], "posterior": "diag"}).to(DEVICE)
    path = str(tmp_path / "c.pt")
    checkpoint.save_checkpoint(path, checkpoint.checkpoint_state(model, plan_runner.make_optimizer(model, dpsom.config()),
                                                                 {}, 0, 0, 0, "pretrain", 0))
    on_device = torch.load(path, weights_only=False)["rng"]["torch"].to(DEVICE)   # where map_location=cuda put it
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.set_rng_state(on_device)
    rng = checkpoint.load_checkpoint(path)["rng"]
    assert rng["device_type"] == "fakegpu" and {rng["torch"].device.type, rng["cuda"].device.type} == {"cpu"}
    assert checkpoint.restore_rng(rng, DEVICE)


def test_a_checkpoint_saved_from_the_device_holds_host_tensors(tmp_path):
    # torch.save tags a CUDA tensor with its device; a file of such tensors opens only where that GPU exists
    c = {**dpsom.config(), "latent_dim": 4, "som_dim": [2, 2], "posterior": "diag"}
    model = training.build_model(c).to(DEVICE)
    opt = plan_runner.make_optimizer(model, c)
    x = torch.rand(8, 784, device=DEVICE)
    plan_runner.train_step(model, opt, "pretrain", x, None, 1e-3, training.phase_loss)    # optimiser state made
    targets = (torch.rand(8, 4, device=DEVICE), torch.rand(8, 4, device=DEVICE))
    path = str(tmp_path / "c.pt")
    checkpoint.save_checkpoint(path, checkpoint.checkpoint_state(model, opt, c, 1, 0, 1, "pretrain", 0, targets))
    saved = torch.load(path, weights_only=False)                        # no map_location, as a user would
    tensors = [*saved["model"].values(), *saved["targets"],
               *(t for s in saved["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t))]
    assert len(tensors) > len(saved["model"]) + 2 and {t.device.type for t in tensors} == {"cpu"}
    assert {p.device.type for p in model.parameters()} == {DEVICE.type}   # the training copies stay on the device
    model.load_state_dict(saved["model"])                                # and the file loads back onto it
    assert torch.equal(next(model.parameters()).cpu(), next(iter(saved["model"].values())))


# ---- no host syncs between log points ----------------------------------------------------------------------
@pytest.mark.parametrize("adam", ["tf1", "torch"])
def test_training_steps_make_no_host_sync(tmp_path, adam):
    c = {**dpsom.config(), "latent_dim": 8, "som_dim": [3, 3], "adam": adam}
    model = training.build_model(c).to(DEVICE)
    opt = plan_runner.make_optimizer(model, c)
    x = torch.rand(20, 784, device=DEVICE)
    p = torch.softmax(torch.randn(20, 9), 1).to(DEVICE)
    plan_runner.train_step(model, opt, "pretrain", x, None, 1e-3, training.phase_loss)             # optimiser state made
    path = str(tmp_path / "c.pt")                                       # the state through a checkpoint, as a resume
    checkpoint.save_checkpoint(path, checkpoint.checkpoint_state(model, opt, c, 1, 0, 0, "pretrain", 0))
    opt = plan_runner.make_optimizer(model, c)
    opt.load_state_dict(checkpoint.load_checkpoint(path)["optimizer"])
    stats = {phase: plan_runner.StepStats() for phase in ("pretrain", "som_init", "train")}   # as between log points
    with no_host_sync():
        for step, (phase, target) in enumerate([("pretrain", None), ("som_init", None), ("train", p)] * 2):
            stats[phase].add(plan_runner.train_step(model, opt, phase, x, target, 1e-3, training.phase_loss), step)
    if adam == "torch":   # the check can fail: Adam's step count on the device costs syncs every step
        for s in opt.state.values():
            s["step"] = s["step"].to(DEVICE)
        with pytest.raises((AssertionError, RuntimeError)):
            with no_host_sync():
                plan_runner.train_step(model, opt, "train", x, p, 1e-3, training.phase_loss)


# ---- the entry points on the stand-in device -------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """A straight run on the stand-in GPU, and runs stopped at step 22 (joint epoch 1) on it and on the CPU."""
    tmp = tmp_path_factory.mktemp("gpu")
    started = {"straight": train_cli(tmp, data_dir, tmp / "straight", wait=False),       # the three at once
               "gpu_stopped": train_cli(tmp, data_dir, tmp / "gpu_stopped", stop_at=22, wait=False),
               "cpu_stopped": train_cli(tmp, data_dir, tmp / "cpu_stopped", device="cpu", stop_at=22, wait=False)}
    outs = {name: process.wait() for name, process in started.items()}
    for name, out in outs.items():
        assert out.returncode == (0 if name == "straight" else 130), (name, out.stderr[-3000:])
    return tmp, outs


def test_three_phases_and_a_resume_on_the_gpu_repeat_bit_for_bit(runs, data_dir):
    tmp, outs = runs
    ckpt = torch.load(tmp / "straight" / "checkpoint.pt", weights_only=False)
    assert ckpt["global_step"] == 30 and ckpt["rng"]["device_type"] == DEVICE.type
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())    # readable on any machine
    logdir = copy_run(tmp / "gpu_stopped", tmp / "gpu_resumed")
    stopped = torch.load(logdir / "checkpoint.pt", weights_only=False)
    assert stopped["global_step"] == 22 and stopped["targets"] is not None   # mid-epoch: P kept
    out = cli(tmp, data_dir, f"resume={logdir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "another kind of device" not in out.stderr
    assert weights_equal(logdir / "checkpoint.pt", tmp / "straight" / "checkpoint.pt") == []
    assert out.stdout.splitlines()[-1] == outs["straight"].stdout.splitlines()[-1]


@pytest.mark.parametrize("written, resumed", [("cpu", GPU), (GPU, "cpu")])
def test_a_checkpoint_written_on_one_device_resumes_on_the_other(runs, data_dir, written, resumed):
    tmp, _ = runs
    logdir = copy_run(tmp / ("cpu_stopped" if written == "cpu" else "gpu_stopped"), tmp / f"{written}_to_{resumed}")
    out = cli(tmp, data_dir, f"resume={logdir}", device=resumed)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "written on another kind of device" in out.stderr     # its random stream cannot continue
    ckpt = torch.load(logdir / "checkpoint.pt", weights_only=False)
    assert ckpt["global_step"] == 30 and ckpt["rng"]["device_type"] == torch.device(resumed).type
    assert json.load(open(logdir / "result.json"))["nodes_used"] >= 1


def test_evaluate_and_assign_give_the_cpus_numbers_on_the_gpu(runs, data_dir):
    tmp, _ = runs
    run = tmp / "straight"
    results, bmus = {}, {}
    for device in ("cpu", GPU):   # eval_sample: the seeded noise is drawn on the CPU for every device
        out = cli(tmp, data_dir, f"checkpoint={run}", device=device, command=["evaluate"])
        assert out.returncode == 0, out.stderr[-3000:]
        results[device] = json.load(open(run / "evaluation_validation.json"))["metrics"]
        bmus[device] = np.load(run / "evaluation_validation.npz")["bmu"]
    if REAL:   # the GPU's kernels round otherwise: a near tie may move a sample's BMU
        assert (bmus[GPU] == bmus["cpu"]).mean() >= 0.99
        assert results[GPU]["purity"] == pytest.approx(results["cpu"]["purity"], abs=0.01)
    else:
        assert results[GPU] == results["cpu"]
    x = np.random.default_rng(0).random((30, 28, 28), dtype=np.float32)
    np.save(tmp / "new.npy", x)
    out = cli(tmp, data_dir, f"checkpoint={run}", f"data_path={tmp / 'new.npy'}", command=["assign"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert np.load(run / "assignments.npz")["bmu"].shape == (30,)


def test_device_names_are_checked_before_anything_runs():
    n = torch.get_device_module(DEVICE.type).device_count()
    with pytest.raises(dpsom.SetupError, match=rf"has {n} {DEVICE.type.upper()} device\(s\), {DEVICE.type}:0 to"):
        dpsom.pick_device(f"{DEVICE.type}:{n}")
    assert dpsom.pick_device(f"{DEVICE.type}:0") == torch.device(DEVICE.type, 0)
    with pytest.raises(dpsom.SetupError, match="not a device"):
        dpsom.pick_device("gpu7")


def test_device_failures_that_pass_are_transient():
    assert plan_runner.is_transient(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert plan_runner.is_transient(RuntimeError("CUDA error: out of memory"))              # context creation
    assert plan_runner.is_transient(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert plan_runner.is_transient(OSError(28, "No space left on device"))
    assert not plan_runner.is_transient(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not plan_runner.is_transient(ValueError("out of memory"))


@stand_in_only
def test_rng_states_of_older_checkpoints_restore_onto_the_device_that_trained():
    # before rng_state, checkpoints kept every visible GPU's state in a list, restored by index
    gen = torch.get_device_module("fakegpu")
    gen.manual_seed(1)
    one = gen.get_rng_state()
    gen.manual_seed(2)
    two = gen.get_rng_state()
    old = {"torch": torch.get_rng_state(), "cuda": [two, one]}
    assert checkpoint.restore_rng({**old, "device_type": "fakegpu"}, DEVICE, "cuda:1")
    assert torch.equal(gen.get_rng_state(), one)
    assert not checkpoint.restore_rng(old, DEVICE, "cuda:1")   # no device_type: written on CUDA, not this device
    assert not checkpoint.restore_rng(old, torch.device("cpu"))
    assert checkpoint.restore_rng({"torch": torch.get_rng_state(), "cuda": None}, torch.device("cpu"))   # a CPU run's


# ---- benchmarks/gpu_check.sh, rehearsed on the CPU ---------------------------------------------------------
STAGES = ("env", "switches", "gpu_path", "bench", "dense_run", "sweep_pack", "dense_amp")
REHEARSAL = "test_gpu_check_rehearses_every_stage_on_the_cpu_and_reruns_in_its_folder"


def rehearse(out, data_dir: str) -> Started:
    """`GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh OUT` in a session of its own, one thread a process."""
    env = {**one_thread(), "GPU_CHECK_DEVICE": "cpu", "DPSOM_DATA_DIR": data_dir, "PYTHON": sys.executable,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    return Started(["bash", "benchmarks/gpu_check.sh", str(out)], timeout=900, cwd=ROOT, env=env,
                   start_new_session=True)


@pytest.fixture(scope="module", autouse=True)
def rehearsal(request, tmp_path_factory):
    """The rehearsal's first call, started with this module's first test when the rehearsal's test is to run:
    its minute on one core goes beside the module's other tests (one core a run) instead of after them."""
    data_dir, _ = find_data_dir()
    if REAL or data_dir is None or not any(item.name == REHEARSAL for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("gpu_check") / "check"
    first = rehearse(out, data_dir)
    yield out, first
    if first.proc.poll() is None:   # its test never waited for it (the session stopped early): stop its stages
        for p in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if os.getsid(p.pid) == first.proc.pid:
                    p.terminate()
        first.wait()


@stand_in_only
def test_gpu_check_rehearses_every_stage_on_the_cpu_and_reruns_in_its_folder(rehearsal, tmp_path, data_dir):
    out, first = rehearsal or (tmp_path / "check", rehearse(tmp_path / "check", data_dir))
    first = first.wait()
    summary = (out / "summary.txt").read_text()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    for stage in STAGES:
        assert f"stage {stage}: exit 0" in summary, (stage, summary)
    assert "2 run(s) on one CPU" in summary and "2 of 2 completed" in summary
    assert summary.count("nmi: ") == 2                               # both full runs' numbers
    again = rehearse(out, data_dir).wait()                           # the same folder: every stage done already
    assert again.returncode == 0
    lines = (out / "summary.txt").read_text()[len(summary):]
    assert all(f"stage {stage}: done in an earlier call" in lines for stage in STAGES), lines


# ---- T-DPSOM on the device ------------------------------------------------------------------------------------
def test_t_dpsom_ops_take_no_host_sync_and_a_run_evaluates_and_assigns_on_the_device(tmp_path):
    """Every T-DPSOM op's step stays on the device; a whole run, evaluate and assign run there (a CPU tensor meeting
    a device tensor would raise) and evaluate repeats the run's numbers."""
    import tdpsom
    from test_tdpsom_end_to_end import TINY as T_TINY, stays
    from tdpsom_training import phase_loss
    c = {**dict(tdpsom.ex.configurations[0]()), **T_TINY, "input_dim": 5}
    torch.manual_seed(0)
    model = tdpsom.build_model(c).to(DEVICE)
    opt = plan_runner.make_optimizer(model, c)
    x = torch.randn(8, 8, 5, device=DEVICE)
    p = torch.softmax(torch.randn(64, 12, device=DEVICE), 1)
    stats = plan_runner.StepStats()
    for op in ("pretrain", "som_init", "joint", "prediction", "joint"):
        with no_host_sync():
            parts = plan_runner.train_step(model, opt, op, x, p, 1e-3, phase_loss)
            stats.add({"loss": next(iter(parts.values()))}, 1)
    data = stays(tmp_path / "stays.npz")
    words = {**T_TINY, "data_path": data, "device": GPU, "logdir": str(tmp_path / "run")}
    run = tdpsom.ex.run(config_updates=words, options={"--loglevel": "ERROR"})
    ev = tdpsom.ex.run("evaluate", config_updates={"checkpoint": str(tmp_path / "run"), "device": GPU},
                       options={"--loglevel": "ERROR"})
    assert ev.result == run.result and np.isfinite(run.result["pred_ze"])
    tdpsom.ex.run("assign", config_updates={"checkpoint": str(tmp_path / "run"), "data_path": data, "device": GPU},
                  options={"--loglevel": "ERROR"})
    assert np.load(tmp_path / "run" / "assignments.npz")["bmu"].shape == (48, 8)
