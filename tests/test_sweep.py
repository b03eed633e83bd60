"""sweep.py on a real local Ray with real dpsom.py processes: results, retries with resume, skips, refusals,
resource accounting, and Ray staying on the loopback interface."""
import csv
import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from conftest import ROOT, Started, one_thread
from test_end_to_end import TINY

# Ray started by the tests listens on 127.0.0.1 only and writes no token file (never set by sweep.py itself:
# that would keep users off clusters).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
os.environ.update(RAY_ENV)
WORDS = [f"{k}={v}".replace(" ", "") for k, v in TINY.items() if k != "seed"]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the sweeps whose test is not about starting one (sweep.py --address joins it): a start
    costs seconds. Its own process owns it, apart from the Ray that a test starts in this one; closing its
    stdin shuts it down."""
    host = ("import sys, ray\nray.init(include_dashboard=False, log_to_driver=False)\n"
            "print(ray.get_runtime_context().gcs_address, flush=True)\nsys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", host], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    started, _, _ = select.select([proc.stdout], [], [], 180)
    address = proc.stdout.readline().strip() if started else ""
    if not address:
        proc.kill()
        pytest.fail("the process meant to host Ray printed no address within 3 minutes")
    yield address
    proc.stdin.close()
    proc.wait(timeout=120)


def sweep(out, *args, data_dir, timeout=600, wait=True, extra=()):
    cmd = [sys.executable, "sweep.py", str(out), *args, "with", *WORDS, *extra, f"data_dir={data_dir}"]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def sacred_runs(out):
    folder = out / "sacred"
    return {d: json.load(open(folder / d / "run.json")) for d in os.listdir(folder) if d.isdigit()}


def test_grid_times_seeds_collects_every_run_and_runs_nothing_twice(tmp_path, data_dir, ray_address):
    out = tmp_path / "sweep"
    grid = ("--grid", "alpha=5,10", "--seeds", "2", "--address", ray_address)
    done = sweep(out, *grid, data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sacred_runs(out)
    assert len(runs) == 4 and {r["status"] for r in runs.values()} == {"COMPLETED"}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["alpha"], r["seed"]) for r in rows) == [("10", "2020"), ("10", "2021"), ("5", "2020"), ("5", "2021")]
    for row in rows:
        own = json.load(open(out / "runs" / row["name"] / "result.json"))
        assert row["status"] == "done" and {k: float(row[k]) for k in own} == own
        assert float(row["wall_s"]) > 0
    summary = list(csv.DictReader(open(out / "summary.csv")))
    for entry in summary:
        values = [float(r["purity"]) for r in rows if r["alpha"] == entry["alpha"]]
        assert int(entry["n"]) == 2
        assert float(entry["purity_mean"]) == pytest.approx(np.mean(values), rel=1e-12)
        assert float(entry["purity_std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-12)   # the sample std
        assert f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" in done.stdout  # the summary is printed
    again = sweep(out, *grid, data_dir=data_dir)
    assert again.returncode == 0 and len(sacred_runs(out)) == 4               # finished runs are skipped
    kept = list(csv.DictReader(open(out / "results.csv")))                    # with the time they took
    assert [(r["wall_s"], r["attempts"]) for r in kept] == [(r["wall_s"], "1") for r in rows]
    other = sweep(out, *grid, data_dir=data_dir, extra=["gamma=10"])
    assert other.returncode == 1 and "4 of the 4 runs exist" in other.stderr and "gamma=10" in other.stderr
    assert len(sacred_runs(out)) == 4 and list(csv.DictReader(open(out / "results.csv"))) == kept   # untouched


def test_t_dpsom_runs_sweep_like_dpsom_runs(tmp_path, ray_address):
    """--script tdpsom.py: the same runs, folders and tables, with T-DPSOM's numbers per label column."""
    from test_tdpsom_end_to_end import TINY as T_TINY, stays
    out = tmp_path / "sweep"
    words = [f"{k}={v}".replace(" ", "") for k, v in T_TINY.items() if k != "seed"]
    done = subprocess.run([sys.executable, "sweep.py", str(out), "--script", "tdpsom.py", "--grid", "kappa=0,2",
                           "--address", ray_address, "with", *words, f"data_path={stays(tmp_path / 'stays.npz')}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["kappa"] for r in rows) == ["0", "2"] and {r["status"] for r in rows} == {"done"}
    for row in rows:
        own = json.load(open(out / "runs" / row["name"] / "result.json"))
        assert {k: float(row[k]) for k in own} == own and "nmi/state" in own and "pred_ze" in own
    assert [r["experiment"]["name"] for r in sacred_runs(out).values()] == ["tdpsom"] * 2
    refused = subprocess.run([sys.executable, "sweep.py", str(out), "--script", "tdpsom.py", "--preset",
                              "results_table"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "the seed's table is DPSOM's" in refused.stderr


def test_a_config_error_is_reported_once_and_not_retried(tmp_path, data_dir, ray_address):
    out = tmp_path / "sweep"
    done = sweep(out, "--grid", "gamma=-1", "--retries", "3", "--address", ray_address, data_dir=data_dir)
    assert done.returncode == 1
    assert "failed: gamma=-1_seed=2020: " in done.stderr and "config gamma=-1" in done.stderr
    log = open(out / "runs" / "gamma=-1_seed=2020" / "stderr.txt").read()
    assert log.count("--- attempt") == 1


def test_a_killed_run_is_retried_and_resumes_to_the_uninterrupted_result(tmp_path, data_dir, ray_address):
    out = tmp_path / "sweep"
    # the uninterrupted run on the other core meanwhile, with the one thread the sweep gives its run
    straight = Started([sys.executable, "dpsom.py", "with", *WORDS, "num_epochs=10", f"data_dir={data_dir}",
                        "seed=2020", f"logdir={tmp_path / 'straight'}", "device=cpu"], timeout=600, cwd=ROOT,
                       env=one_thread())
    proc = sweep(out, "--seeds", "1", "--retries", "2", "--address", ray_address, data_dir=data_dir, wait=False,
                 extra=["num_epochs=10"])
    logdir = out / "runs" / "seed=2020"
    deadline = time.time() + 240
    first_seen = None
    while not (logdir / "checkpoint.pt").exists():                            # the end of the first epoch
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        first_seen = first_seen or ((logdir / "stderr.txt").exists() and time.time())
        time.sleep(0.2)
    victim = next(p for p in psutil.process_iter(["cmdline"])
                  if f"logdir={logdir}" in " ".join(p.info["cmdline"] or []) and "dpsom.py" in " ".join(p.info["cmdline"]))
    victim.send_signal(signal.SIGKILL)
    killed_after = time.time() - (first_seen or time.time())                  # the first attempt ran at least this
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    attempts = [line for line in open(logdir / "stderr.txt") if line.startswith("--- attempt")]
    assert len(attempts) == 2 and f"resume={logdir}" in attempts[1]
    spent = json.load(open(logdir / "attempts.json"))                         # both attempts count in wall_s
    assert [a["exit"] for a in spent] == [-signal.SIGKILL, 0] and spent[0]["seconds"] >= killed_after
    assert spent[0]["at"] + spent[0]["seconds"] <= spent[1]["at"] < time.time()   # each attempt's start, in order
    sys.path.insert(0, os.path.join(ROOT, "results"))
    import results_table                        # both attempts' Sacred records begin after the first's start
    assert len(results_table.sacred_records(str(out), str(logdir), since=spent[0]["at"])) == 2
    row, = csv.DictReader(open(out / "results.csv"))
    assert float(row["wall_s"]) == round(spent[0]["seconds"] + spent[1]["seconds"], 1) and row["attempts"] == "2"
    straight = straight.wait()
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert json.load(open(logdir / "result.json")) == json.load(open(tmp_path / "straight" / "result.json"))


def test_fractional_gpus_are_accounted_and_ray_stays_on_loopback():
    ray = pytest.importorskip("ray")
    import sweep
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)   # one logical GPU
    try:
        @ray.remote
        def occupy():
            start = time.time()
            time.sleep(1.0)
            return start, time.time()

        spans = ray.get([occupy.options(**sweep.task_options(0.5, 0.25, 0)).remote() for _ in range(8)])
        most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
        assert most == 4                                                      # 4 x 0.25 of one GPU at a time
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
        assert listening, "found no listening socket of Ray's processes"
        ipv4 = lambda ip: getattr(ipaddress.ip_address(ip), "ipv4_mapped", None) or ipaddress.ip_address(ip)
        assert {str(ipv4(c.laddr.ip)) for c in listening} == {"127.0.0.1"}, listening   # '::ffff:127.0.0.1' too
    finally:
        ray.shutdown()


def test_a_request_no_node_can_meet_is_refused_instead_of_waiting_for_ever(tmp_path, data_dir):
    done = sweep(tmp_path / "out", "--gpus-per-run", "0.25", data_dir=data_dir, timeout=120)   # no GPU here
    assert done.returncode == 1 and "no node can run one run with --cpus-per-run 1 --gpus-per-run 0.25" in done.stderr
    assert not list((tmp_path / "out" / "runs").iterdir())


def test_ctrl_c_stops_the_runs_with_checkpoints_and_the_same_command_continues(tmp_path, data_dir, ray_address):
    out = tmp_path / "sweep"
    args = ("--seeds", "2", "--address", ray_address)
    words = [*WORDS, "num_epochs=30", f"data_dir={data_dir}"]                 # long enough to be caught running
    proc = subprocess.Popen([sys.executable, "sweep.py", str(out), *args, "with", *words], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as at a terminal
    deadline = time.time() + 240
    while len(list(out.glob("runs/*/checkpoint.pt"))) < 2:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "the same command continues" in stderr, stderr[-2000:]
    assert [r["status"] for r in sacred_runs(out).values()] == ["INTERRUPTED"] * 2
    for name in ("seed=2020", "seed=2021"):
        assert torch.load(out / "runs" / name / "checkpoint.pt", weights_only=False)["global_step"] < 6 * 33
    again = subprocess.run([sys.executable, "sweep.py", str(out), *args, "with", *words], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in ("seed=2020", "seed=2021"):
        log = open(out / "runs" / name / "stderr.txt").read()
        assert log.count("--- attempt") == 2 and f"resume={out / 'runs' / name}" in log


def test_grid_values_cells_and_the_seed_table(capsys):
    import sweep
    import sweep_tables
    assert sweep.split_values("[6,10],[8,8]") == ["[6,10]", "[8,8]"] and sweep.split_values("5,'a,b'") == ["5", "'a,b'"]
    runs = sweep.plan([("alpha", ["5", "10"])], [1, 2], ["quick"], ["mnist_conv"])
    assert [r["name"] for r in runs] == ["mnist_conv_alpha=5_seed=1", "mnist_conv_alpha=5_seed=2",
                                         "mnist_conv_alpha=10_seed=1", "mnist_conv_alpha=10_seed=2"]
    assert runs[0]["words"] == ["conv", "validation=True", "quick", "alpha=5", "seed=1"]
    sweep_tables.print_summary([{"cell": "mnist_conv", "n": 2, "nmi_mean": 0.7, "nmi_std": 0.01, "purity_mean": 0.95,
                          "purity_std": 0.02}], preset=True)
    printed = capsys.readouterr().out
    assert "0.9500 ± 0.0200 (n=2)" in printed and "0.9833" in printed and "0.9676" in printed   # the seed's conv numbers
    sweep_tables.print_summary([{"cell": "fmnist_dense", "n": 0}], preset=True)   # every run failed: no numbers at all
    assert "no finished run" in capsys.readouterr().out


# ---- the task's and the driver's bookkeeping, without Ray: a stand-in for dpsom.py that exits as told ----------
FAKE_RUN = """import os, signal, sys, time
how, stop = os.environ["FAKE_EXIT"], os.environ.get("FAKE_STOP")
if stop:   # the sweep is stopped while this run trains: its task sends SIGTERM
    if how == "130":   # dpsom.py's handler: a checkpoint, then status 130
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))
    open(stop, "w").close()
    time.sleep(30)
if how == "term":
    os.kill(os.getpid(), signal.SIGTERM)
sys.exit(int(how))
"""


@pytest.mark.parametrize("code, stop_file, expected", [
    ("0", False, "done"), ("1", False, "failed"), ("130", True, "interrupted"), ("term", True, "interrupted"),
    ("130", False, "retry"), ("75", False, "retry"), ("term", False, "retry")])
def test_each_exit_status_is_done_failed_interrupted_or_retried(tmp_path, monkeypatch, code, stop_file, expected):
    import sweep
    script, out = tmp_path / "fake.py", tmp_path / "out"
    script.write_text(FAKE_RUN)
    logdir = out / "runs" / "seed=1"
    logdir.mkdir(parents=True)
    if code == "0":
        (logdir / "result.json").write_text('{"purity": 0.5}')
    if stop_file:
        monkeypatch.setenv("FAKE_STOP", str(out / sweep.STOP))
    monkeypatch.setenv("FAKE_EXIT", code)
    run = {"name": "seed=1", "words": ["seed=1"]}
    with open(logdir / ".lock", "w") as lock:
        if expected == "retry":   # killed, out of memory (75), or someone else's SIGTERM (preempted): resumed later
            with pytest.raises(sweep.RunDied):
                sweep.attempt(run, str(logdir), str(out), 1, "cpu", str(tmp_path), str(script), lock.fileno())
        else:
            assert sweep.attempt(run, str(logdir), str(out), 1, "cpu", str(tmp_path), str(script),
                                 lock.fileno())["status"] == expected
    exit_code = json.load(open(logdir / "attempts.json"))[0]["exit"]
    assert exit_code == (-signal.SIGTERM if code == "term" else int(code)) and not (logdir / ".running").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_run_does_not_outlive_its_task(tmp_path):
    # the task's process is killed (as when Ray's worker dies): its dpsom.py gets SIGTERM, checkpoints and stops,
    # instead of training on beside the retry
    child = ("import signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (open({str(tmp_path / 'got_term')!r}, 'w').close(), sys.exit(130)))\n"
             "time.sleep(60)\n")
    task = ("import functools, subprocess, sys, time\nsys.path.insert(0, sys.argv[1])\nimport sweep\n"
            f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True,\n"
            "                 preexec_fn=functools.partial(sweep.child_setup, sweep.libc_prctl()))\n"
            f"time.sleep(2)\nopen({str(tmp_path / 'started')!r}, 'w').close()\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", task, str(ROOT)])
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():     # sweep's imports (Ray), then the child's start
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.1)
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while not (tmp_path / "got_term").exists():
        assert time.time() < deadline, "the run kept running after its task died"
        time.sleep(0.1)


def test_a_rerun_with_other_settings_is_refused_by_each_run(tmp_path):
    import sweep
    logdir = tmp_path / "seed=1"
    logdir.mkdir()
    assert sweep.check_identity(str(logdir), ["quick", "seed=1"], "cpu") is None         # recorded
    assert json.load(open(logdir / sweep.IDENTITY)) == {"words": ["quick", "seed=1"], "device": "cpu"}
    assert sweep.check_identity(str(logdir), ["quick", "seed=1"], "cpu") is None         # the same: continues
    told = sweep.check_identity(str(logdir), ["quick", "num_epochs=100", "seed=1"], "cpu")
    assert "`with quick seed=1` on cpu" in told and "`with quick num_epochs=100 seed=1` on cpu" in told
    assert "on cuda" in sweep.check_identity(str(logdir), ["quick", "seed=1"], "cuda")


def test_tables_keep_every_row_when_runs_report_different_numbers(tmp_path):
    import sweep_tables
    runs = [{"name": f"seed={s}", "settings": {}, "seed": s, "words": []} for s in (1, 2, 3)]
    records = {"seed=1": {"status": "done", "wall_s": 2.0, "attempts": 1, "result": {"nll": 60.0, "purity": 0.9}},
               "seed=2": {"status": "done", "wall_s": 3.0, "attempts": 1, "result": {"nll": 62.0}},   # no labels
               "seed=3": {"status": "failed", "error": "config gamma=-1: ...", "wall_s": 1.0, "attempts": 1}}
    rows, summary = sweep_tables.write_tables(str(tmp_path), runs, records)
    assert [r["status"] for r in csv.DictReader(open(tmp_path / "results.csv"))] == ["done", "done", "failed"]
    entry, = summary
    assert entry["n"] == 2 and entry["nll_mean"] == 61.0 and entry["nll_std"] == pytest.approx(2 ** 0.5)
    assert entry["purity_mean"] == 0.9 and entry["purity_std"] == ""       # one run reports it: no spread
    assert sweep_tables.mean_std(entry, "purity") == "0.9000" and sweep_tables.mean_std(entry, "nll") == "61.0000 ± 1.4142"


def test_one_sweep_at_a_time_on_a_folder_and_options_it_cannot_honour(tmp_path, capsys):
    import fcntl
    import sweep
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    with open(out / ".sweep.lock", "w") as held:    # another sweep's driver
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="another sweep is running on"):
            sweep.main([str(out), "--seeds", "1", "with", "quick"])
    for argv, told in ((["--grid", "seed=1,2"], "seeds go in --seeds"), (["with", "device=cuda"], "--gpus-per-run"),
                       (["--seeds", "0"], "1 or more"), (["--seeds", "2020"], "write --seeds 2020,"),
                       (["--retries", "-1"], "0 or more"),
                       (["--cpus-per-run", "0.5"], "at least 1"), (["--gpus-per-run", "2"], "one GPU")):
        with pytest.raises(SystemExit):
            sweep.parse([str(out), *argv])
        assert told in capsys.readouterr().err


def test_runs_that_would_all_save_one_pretrain_file_are_refused():
    import sweep
    for grid, seeds, path, refused in (([], [1, 2], [], True), ([], [1], [], False),
                                       ([("alpha", ["5", "10"])], [1], [], True),
                                       ([("alpha", ["5", "10"])], [1], ["pretrain_path=a.pt"], True),
                                       ([("pretrain_path", ["a.pt", "b.pt"])], [1, 2], [], True),
                                       ([("pretrain_path", ["a.pt", "b.pt"])], [1], [], False)):
        runs = sweep.plan(grid, seeds, ["quick", "save_pretrain=True", *path], None)
        if refused:
            with pytest.raises(SystemExit, match="would write the same pretrain_path"):
                sweep.shared_pretrain(runs)
        else:
            sweep.shared_pretrain(runs)
    sweep.shared_pretrain(sweep.plan([], [1, 2], ["quick", "use_saved_pretrain=True"], None))   # reading is fine
    sweep.shared_pretrain(sweep.plan([], [1, 2], ["quick", "save_pretrain=False"], None))
