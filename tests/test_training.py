"""The training loop and evaluation (training.py): which parameters a phase moves, the stop on a non-finite loss,
the progress lines, the seeded evaluation sample, the placement on the map, freed memory handed back, and the
one-way imports between the modules."""
import ast
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from dpsom_model import DPSOM
import plan_runner
from test_end_to_end import METRICS, run
import training


# ---- the phases and the loop ----------------------------------------------------------------------
def test_som_init_changes_only_the_prototypes(tmp_path, data_dir):
    run(tmp_path, data_dir, num_epochs=0, som_learning_rates=[], logdir=str(tmp_path / "a"))
    before = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    torch.manual_seed(0)
    run(tmp_path, data_dir, num_epochs=0, som_learning_rates=[0.5], logdir=str(tmp_path / "b"))
    after = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    for name in before:
        same = torch.equal(before[name], after[name])
        if name == "embeddings":
            assert not same
        elif "running" in name or "num_batches" in name:
            continue                                             # BN statistics follow the forward passes
        else:
            assert same, name


@pytest.mark.parametrize("every, kept", [(0, ("train", 24)),            # joint epoch 0's
                                         (3600, ("som_init", 18))])      # the last phase's end
def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, data_dir, monkeypatch, every, kept):
    calls = {"n": 0}
    real = training.phase_loss

    def poisoned(model, phase, x, p):
        total, parts = real(model, phase, x, p)
        if phase == "train" and model.training:
            calls["n"] += 1
            if calls["n"] == 8:                                  # second joint epoch, second step
                parts = {**parts, "som": parts["som"] * float("nan")}
                total = total + parts["som"]
        return total, parts

    monkeypatch.setattr(training, "phase_loss", poisoned)
    with pytest.raises(plan_runner.NonFiniteLoss, match=r"phase train, epoch 1, global step 26 \(terms: som\)"):
        run(tmp_path, data_dir, log_every=100, checkpoint_every=every)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert (ckpt["phase"], ckpt["global_step"]) == kept
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_progress_lines_without_a_terminal(cli_run):
    out, folder, _ = cli_run                                              # TINY through the command line
    captured = open(folder / "sacred" / "1" / "cout.txt").read()         # Sacred's captured output
    for text in (out.stdout, captured):
        lines = [line for line in text.splitlines() if " epoch " in line and "samples/s" in line]
        assert [line.split()[:3] for line in lines] == [["pretrain", "epoch", "1/1"], ["som_init", "epoch", "1/2"],
                                                        ["som_init", "epoch", "2/2"], ["train", "epoch", "1/2"],
                                                        ["train", "epoch", "2/2"]], text
        assert "step 30/30" in lines[-1] and "ETA 0:00:00" in lines[-1]


# ---- inference and evaluation ---------------------------------------------------------------------
def test_evaluation_sample_is_repeatable_and_leaves_the_global_rng():
    torch.manual_seed(0)
    model = DPSOM(latent_dim=4, som_dim=(2, 5))                                # 10 nodes, 10 classes: accuracy
    x, y = torch.rand(40, 784), np.arange(40) % 10
    state = torch.get_rng_state()
    first, bmu = training.evaluate_model(model, x, y, 16, sample=True)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert training.evaluate_model(model, x, y, 16, sample=True)[0] == first
    assert set(first) == METRICS | {"accuracy"} and bmu.shape == (40,)
    encoded = training.infer(model, x, 16, sample=True, decode=False)            # the pictures' pass: same codes
    assert set(encoded) == {"z", "dist"} and np.array_equal(encoded["dist"].argmin(1).numpy(), bmu)
    mean = training.infer(model, x, 16, sample=False)
    model.eval()
    assert torch.allclose(mean["z"], model.encode(x)[0]) and not torch.equal(mean["z"], encoded["z"])
    assert mean["nll"].mean().item() == pytest.approx(model.nll(x, model.decode(mean["z"])).item())


def test_place_names_each_samples_node_its_distance_and_q():
    torch.manual_seed(0)
    model = DPSOM(latent_dim=4, som_dim=(2, 3))
    x = torch.rand(10, 784)
    out = training.place(model, x, 4, sample=False)
    dist = training.infer(model, x, 4, sample=False, decode=False)["dist"].numpy()          # (N, H*W)
    assert set(out) == {"bmu", "row", "column", "distance", "q_bmu", "q"} and out["q"].shape == (10, 6)
    assert np.array_equal(out["bmu"], dist.argmin(1)) and np.array_equal(out["row"] * 3 + out["column"], out["bmu"])
    assert np.allclose(out["distance"] ** 2, dist.min(1), rtol=1e-5)
    assert np.allclose(out["q"].sum(1), 1) and np.array_equal(out["q_bmu"], out["q"][np.arange(10), out["bmu"]])
    assert np.array_equal(out["q"].argmax(1), out["bmu"])       # q falls with the distance


# ---- memory ---------------------------------------------------------------------------------------
PROBE_START = """
import json, torch, dpsom, plan_runner, training
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
"""   # a fresh process that reads its RSS in MB
HEAP_PROBE = PROBE_START + """
base = rss()
big = torch.ones(4_000_000); del big       # a freed 16 MB mmap: glibc raises its mmap threshold above 12 MB
bigs, keep = [], []
for i in range(20):
    bigs.append(torch.ones(3_000_000))     # 12 MB each, now on the heap
    keep.append(torch.ones(65_536))        # a 256 KB survivor after each
del bigs                                   # 240 MB of holes the survivors keep from the top of the heap
before = rss()
released = plan_runner.release_freed_memory()
print(json.dumps({"base": base, "before": before, "after": rss(), "released": released}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from Linux's /proc")
def test_freed_heap_goes_back_to_the_system():
    """The pattern of a long CPU run (12 MB temporaries freed between small survivors) in a fresh process:
    glibc keeps the holes; release_freed_memory gives them back, down to the 5 MB of survivors and at most one
    12 MB hole. A no-op would leave the 240 MB."""
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.splitlines()[-1])
    if not m["released"]:
        pytest.skip("no glibc malloc_trim here")
    if m["before"] - m["base"] < 200:
        pytest.skip(f"this allocator kept {m['before'] - m['base']:.0f} of 240 MB freed (MALLOC_MMAP_THRESHOLD_ set?)")
    assert m["after"] - m["base"] <= 5 + 12, m


def test_every_epoch_ends_by_releasing_freed_memory(tmp_path, data_dir, monkeypatch):
    calls = []
    real = plan_runner.release_freed_memory
    monkeypatch.setattr(plan_runner, "release_freed_memory", lambda: calls.append(1) or real())
    run(tmp_path, data_dir)
    assert len(calls) == 1 + 2 + 2   # TINY: 1 pretraining, 2 SOM-initialisation and 2 joint epochs


TARGET_PASS_PROBE = PROBE_START + """
torch.manual_seed(0)
model = training.build_model(dpsom.config(fixed={}))   # the default dense model, full-covariance posterior
x = torch.rand(51000, 784)                          # MNIST's training split, in shape
before = rss()
p = training.target_distribution(model, x, 300, True)
print(json.dumps({"grown": rss() - before, "rows": float(p.sum())}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from Linux's /proc")
def test_the_target_pass_at_full_size_keeps_no_freed_batches():
    """One target pass of the default model over 51,000 images grows the RSS by what it returns (z, distances,
    q and p: 60 MB) and one batch's temporaries (the 12 MB full-covariance tensors: under 100 MB), not by its
    170 batches' leftovers: with per-batch results kept between the freed temporaries it grew 1.7 GB."""
    out = subprocess.run([sys.executable, "-c", TARGET_PASS_PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.splitlines()[-1])
    assert abs(m["rows"] - 51000) < 1                 # a distribution per image
    assert m["grown"] < 60 + 100 + 100, m              # a further 100 MB for the allocator's and torch's pools


# ---- the seams ------------------------------------------------------------------------------------
MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


def local_imports(module: str) -> set[str]:
    """The project's modules that `module` imports, from its source."""
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return {name.split(".")[0] for name in names} & set(MODULES)


def test_the_modules_import_one_way():
    """No module reaches back into the experiment, and the import graph has no cycle: the loop and the logging
    take a config dict and a device, so a second model can reuse them."""
    graph = {m: local_imports(m) for m in MODULES}
    assert not any("dpsom" in graph[m] for m in MODULES), graph
    assert graph["tb_logging"] <= {"dpsom_model", "utils"} and "training" in graph["dpsom"]
    done, visiting = set(), []

    def visit(m):
        assert m not in visiting, f"import cycle: {' -> '.join(visiting + [m])}"
        if m not in done:
            visiting.append(m)
            for n in graph[m]:
                visit(n)
            visiting.pop()
            done.add(m)
    for m in MODULES:
        visit(m)
