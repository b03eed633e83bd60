"""Many dpsom.py (or tdpsom.py) runs at once on Ray: a grid of settings times seeds, on this machine or a Ray
cluster, collected into results.csv and a summary.

    python sweep.py OUT --grid alpha=5,10 --seeds 3 with quick
    python sweep.py OUT --script tdpsom.py --grid kappa=1,5 --seeds 3 with data_path=stays.npz
    python sweep.py OUT --preset results_table --cells mnist_dense --seeds 1
    python sweep.py OUT --address HOST:6379 ...          # a running Ray cluster (or set RAY_ADDRESS)

Every run is an ordinary Sacred run of the experiment in a process of its own. Its folder OUT/runs/<name> holds its
TensorBoard events, checkpoints, result.json, stdout.txt and stderr.txt; Sacred's file observer records every
run in OUT/sacred. A run whose process dies (killed, out of memory, node lost) is retried up to --retries
times and resumes from its checkpoint; a run that fails on its config or data is not retried. The same
command again skips finished runs and resumes unfinished ones; Ctrl-C stops every run after its current
step, with a checkpoint, and the same command continues them.
"""
import argparse
import ctypes
import fcntl
import functools
import glob
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import ray
from tqdm import tqdm

from sweep_tables import CELLS, print_summary, write_tables

HERE = os.path.dirname(os.path.abspath(__file__))   # the experiments lie here, at this path on every node
MAX_SEED_COUNT = 100                                   # --seeds N above it is refused: a seed meant as a count
SCRIPTS = ("dpsom.py", "tdpsom.py")                  # --script: DPSOM's experiment or T-DPSOM's (same exits, result.json)
SETUP_ERROR, INTERRUPTED = 1, 130      # dpsom.py's exit statuses: config or data error, stopped by a signal
STOP = "stop-requested"                 # written into OUT by a stopped sweep; every run's task watches for it
ATTEMPTS = "attempts.json"              # in a run's folder: start, seconds and exit status of each attempt
IDENTITY = "sweep.json"                 # in a run's folder: the words and device it was started with
OWN_WORDS = ("seed", "logdir", "device", "resume")   # set by the sweep for each run


class RunDied(RuntimeError):
    """dpsom.py ended without a result and without saying why (killed, out of memory): worth a retry."""


def split_values(text: str) -> list[str]:
    """'5,10' -> ['5', '10']; commas inside brackets or quotes stay: '[6,10],[8,8]' -> ['[6,10]', '[8,8]']."""
    values, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += ch
    return values + [current]


def plan(grid: list[tuple[str, list[str]]], seeds: list[int], words: list[str], cells: list[str] | None) -> list[dict]:
    """Every run: its name, the settings that tell it apart, its seed and its words after dpsom.py's `with`."""
    runs = []
    for cell in cells or [None]:
        for values in itertools.product(*[v for _, v in grid]):
            for seed in seeds:
                settings = ({"cell": cell} if cell else {}) | {k: v for (k, _), v in zip(grid, values)}
                name = "_".join(f"{k}={v}" for k, v in settings.items() if k != "cell")
                name = re.sub(r"[^\w.=,+-]", "", "_".join(filter(None, [cell, name, f"seed={seed}"])))
                runs.append({"name": name, "settings": settings, "seed": seed,
                             "words": (CELLS[cell] if cell else []) + words
                             + [f"{k}={v}" for k, v in zip((k for k, _ in grid), values)] + [f"seed={seed}"]})
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise SystemExit(f"sweep: two runs would share a folder name: {sorted(n for n in names if names.count(n) > 1)[0]}")
    return runs


def word_value(words: list[str], key: str, default: str | None = None) -> str | None:
    """The value of KEY=VALUE in dpsom.py's words (the last one, as Sacred takes it), or default."""
    return next((w.split("=", 1)[1] for w in reversed(words) if w.startswith(key + "=")), default)


def shared_pretrain(runs: list[dict]) -> None:
    """Refuse runs that would all write one pretrain_path at once (`save_pretrain=True` without a path per run)."""
    saving = [r for r in runs if word_value(r["words"], "save_pretrain", "False").lower() not in ("false", "0")]
    paths = [word_value(r["words"], "pretrain_path") for r in saving]
    if len(saving) > 1 and (None in paths or len(set(paths)) < len(paths)):
        raise SystemExit(f"sweep: {len(saving)} runs with save_pretrain=True would write the same pretrain_path at "
                         f"once; save it once with dpsom.py (num_epochs=0 save_pretrain=True) and sweep with "
                         f"use_saved_pretrain=True, or give each run its own path (--grid pretrain_path=A,B,...)")


@ray.remote
def run_dpsom(run: dict, out: str, threads: int, device: str, cwd: str, script: str) -> dict:
    """One dpsom.py run in its own process, resumed from its checkpoint if an earlier attempt left one."""
    logdir = os.path.join(out, "runs", run["name"])
    for path, what in ((script, "dpsom.py"), (cwd, "the folder the sweep was started in")):
        if not os.path.exists(path):
            return {"status": "failed", **time_spent(logdir), "error": f"{what} {path} does not exist on node "
                    f"{socket.gethostname()}: every node needs the code, the data and OUT at the driver's paths"}
    os.makedirs(logdir, exist_ok=True)
    mismatch = check_identity(logdir, run["words"], device)
    if mismatch:
        return {"status": "failed", "error": mismatch, **time_spent(logdir)}
    with open(os.path.join(logdir, ".lock"), "w") as lock:
        # held by this task and its dpsom.py: a process of an earlier attempt that outlived its task (its
        # worker was killed; it gets SIGTERM and writes a checkpoint) finishes before this attempt starts
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(logdir, "result.json")):
            return finished(logdir, "done")
        if stop_requested(out):                           # the sweep was stopped before this run started
            return finished(logdir, "interrupted")
        return attempt(run, logdir, out, threads, device, cwd, script, lock.fileno())


def attempt(run: dict, logdir: str, out: str, threads: int, device: str, cwd: str, script: str, lock: int) -> dict:
    """Start dpsom.py, watch it and the sweep's stop file, and say how it ended; RunDied asks Ray for a retry."""
    resume = os.path.exists(os.path.join(logdir, "checkpoint.pt")) or os.path.exists(os.path.join(logdir, "checkpoint.pt.prev"))
    cmd = [sys.executable, script, "-F", os.path.join(out, "sacred"), "with", *run["words"],
           f"logdir={logdir}", f"device={device}"] + ([f"resume={logdir}"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    started = time.time()               # "at": the same moment in seconds since the epoch, for any time zone
    attempts = read_attempts(logdir) + [{"started": stamp, "at": started, "seconds": 0.0, "exit": None}]
    with open(os.path.join(logdir, "stdout.txt"), "a") as o, open(os.path.join(logdir, "stderr.txt"), "a") as e:
        e.write(f"--- attempt at {stamp}: {' '.join(cmd)}\n")
        e.flush()
        # its own session: a Ctrl-C at the terminal reaches the run once, through the stop file
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=cwd, start_new_session=True,
                                pass_fds=(lock,), preexec_fn=functools.partial(child_setup, libc_prctl()))
        open(os.path.join(logdir, ".running"), "w").close()
        try:
            while proc.poll() is None:
                if stop_requested(out):                         # the sweep was stopped: the run stops after its
                    proc.send_signal(signal.SIGTERM)            # step and writes a checkpoint
                    proc.wait()
                time.sleep(0.2)
                if time.time() - started - attempts[-1]["seconds"] >= 1:   # an attempt killed with the driver or
                    attempts[-1]["seconds"] = time.time() - started        # its node keeps its time to the second
                    write_attempts(logdir, attempts)
        finally:
            if proc.poll() is None:     # this task is failing or was cancelled: the run stops with a checkpoint
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            os.remove(os.path.join(logdir, ".running"))
    code = proc.returncode
    attempts[-1].update(seconds=time.time() - started, exit=code)
    write_attempts(logdir, attempts)
    if code == 0:
        return finished(logdir, "done")
    if stop_requested(out) and code in (INTERRUPTED, -signal.SIGTERM):   # -SIGTERM: stopped before it could checkpoint
        return finished(logdir, "interrupted")
    if code == SETUP_ERROR:                             # a config or data error, or a bug: a retry cannot help
        return finished(logdir, "failed")
    # killed, out of memory (dpsom.py's status 75), or stopped by someone else's SIGTERM (preempted)
    raise RunDied(f"{run['name']}: dpsom.py ended with status {code}; the retry resumes from its checkpoint")


def stop_requested(out: str) -> bool:
    return os.path.exists(os.path.join(out, STOP))


def libc_prctl():
    """Linux's prctl, looked up before the fork (a ctypes object is not sent to Ray's workers)."""
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def child_setup(prctl) -> None:
    """In dpsom.py's process before it starts: no signal masked (Ray's workers mask some), and SIGTERM when
    the task's process dies, so that a run never outlives its task (Linux)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if prctl is not None:
        prctl(1, signal.SIGTERM)                       # PR_SET_PDEATHSIG


def check_identity(logdir: str, words: list[str], device: str, record: bool = True) -> str | None:
    """A run folder keeps the words and device it was started with; another sweep on the same OUT must give
    the same, or its numbers would mix two settings under one name. Returns what differs, or None; with
    `record`, a new run's folder records them."""
    path = os.path.join(logdir, IDENTITY)
    mine = {"words": words, "device": device}
    if not os.path.exists(path):
        if record and not os.listdir(logdir):          # a new run (folders of older sweeps are left as they are)
            write_json(path, mine)
        return None
    with open(path) as f:
        first = json.load(f)
    if first == mine:
        return None
    return (f"{logdir} was started with `with {' '.join(first['words'])}` on {first['device']}; this sweep gives "
            f"`with {' '.join(words)}` on {device}. Use another OUT for other settings, or the first ones to continue")


def unmet_request(cpus: float, gpus: float) -> str | None:
    """What no node of the Ray cluster can give one run, or None."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return None
    most = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    return (f"no node can run one run with --cpus-per-run {cpus:g} --gpus-per-run {gpus:g} (the largest has "
            f"{most.get('CPU', 0):g} CPUs and {most.get('GPU', 0):g} GPUs)")


def task_options(cpus: float, gpus: float, retries: int) -> dict:
    """Ray's resources of one run (fractions share a GPU) and its retries: a lost node or worker, or RunDied."""
    return dict(num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=[RunDied])


def read_attempts(logdir: str) -> list[dict]:
    path = os.path.join(logdir, ATTEMPTS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def write_attempts(logdir: str, attempts: list[dict]) -> None:
    write_json(os.path.join(logdir, ATTEMPTS), attempts)


def write_json(path: str, value) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)                     # never half a file, whenever the task is killed


def time_spent(logdir: str) -> dict:
    """Wall seconds and attempts of a run over every attempt of every sweep that ran it."""
    attempts = read_attempts(logdir)
    return {"wall_s": sum(a["seconds"] for a in attempts), "attempts": len(attempts)}


def finished(logdir: str, status: str) -> dict:
    """What the driver records of a run: its status, time spent, result, or the end of its error output."""
    record = {"status": status, **time_spent(logdir)}
    if status == "done":
        with open(os.path.join(logdir, "result.json")) as f:
            record["result"] = json.load(f)
    if status == "failed":
        with open(os.path.join(logdir, "stderr.txt")) as f:
            lines = [line.strip() for line in f if line.strip() and not line.startswith("---")]
        record["error"] = lines[-1] if lines else "no output"
    return record


def outcome(ref, run: dict, out: str, lost: str) -> dict:
    """The record a finished task returned, or, where the task itself failed (its retries used up, cancelled),
    `lost` with what is known of the run."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        lines = str(e).strip().splitlines()
        return {"status": lost, "error": lines[-1] if lines else type(e).__name__,
                **time_spent(os.path.join(out, "runs", run["name"]))}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    words = argv[argv.index("with") + 1:] if "with" in argv else []
    argv = argv[:argv.index("with")] if "with" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=
                                 "Words after `with` go to every run exactly as dpsom.py takes them.")
    ap.add_argument("out", help="the sweep's folder: runs/, sacred/, results.csv, summary.csv")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a swept key and its values (repeat for more keys: the runs are the product)")
    ap.add_argument("--seeds", default="1", help="N (seeds seed..seed+N-1, seed from `with` or 2020) or S1,S2,...")
    ap.add_argument("--cpus-per-run", type=float, default=1, help="CPUs Ray reserves per run; a CPU run's threads")
    ap.add_argument("--gpus-per-run", type=float, default=0, help="GPUs per run, fractions share one (0: CPU runs)")
    ap.add_argument("--retries", type=int, default=2, help="new attempts for a run whose process died")
    ap.add_argument("--address", help="a running Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--script", choices=SCRIPTS, default="dpsom.py", help="the experiment each run is (default dpsom.py)")
    ap.add_argument("--preset", choices=["results_table"], help="the seed's table: MNIST and Fashion-MNIST, dense and conv")
    ap.add_argument("--cells", default=",".join(CELLS), help=f"cells of the preset (default all: {','.join(CELLS)})")
    args = ap.parse_args(argv)
    for g in args.grid:
        if "=" not in g:
            ap.error(f"--grid {g!r}: give KEY=V1,V2,...")
        if g.split("=", 1)[0] in OWN_WORDS:
            ap.error(f"--grid {g!r}: the sweep sets {', '.join(OWN_WORDS)} for each run; seeds go in --seeds")
    own = [w for w in words if w.split("=", 1)[0] in OWN_WORDS[1:]]
    if own:
        ap.error(f"`with {own[0]}`: the sweep sets logdir (OUT/runs/<name>), device and resume for each run; "
                 f"use --gpus-per-run for GPUs")
    if args.retries < 0:
        ap.error("--retries: give 0 or more")
    if args.gpus_per_run == 0 and args.cpus_per_run < 1 or args.cpus_per_run <= 0 or args.gpus_per_run < 0:
        ap.error("--cpus-per-run: a CPU run needs at least 1 (its thread count); --gpus-per-run: 0 or more")
    if args.gpus_per_run > 1:
        ap.error(f"--gpus-per-run {args.gpus_per_run:g}: a run trains on one GPU and would leave the others idle; "
                 f"give 1, or a fraction to share one GPU among runs")
    if "," not in args.seeds and (not args.seeds.isdigit() or int(args.seeds) < 1):
        ap.error(f"--seeds {args.seeds!r}: give a count of 1 or more, or a list S1,S2,...")
    if "," not in args.seeds and int(args.seeds) > MAX_SEED_COUNT:   # a seed typed where the count goes
        ap.error(f"--seeds {args.seeds}: a single number is a count of seeds, and {args.seeds} runs per setting is "
                 f"more than {MAX_SEED_COUNT}; for the one seed {args.seeds} write --seeds {args.seeds}, (a list), "
                 f"for many seeds list them")
    bad = [c for c in args.cells.split(",") if c not in CELLS]
    if args.preset and args.script != "dpsom.py":
        ap.error(f"--preset {args.preset}: the seed's table is DPSOM's; leave --script out")
    if args.preset and bad:
        ap.error(f"--cells: unknown {bad}; choose from {list(CELLS)}")
    return args, words


def seed_list(seeds: str, words: list[str]) -> list[int]:
    """--seeds: a list S1,S2,... as given (one seed: S1,), or a count N from `with seed=` (default 2020) on."""
    if "," in seeds:
        return [int(s) for s in seeds.split(",") if s]
    base = int(word_value(words, "seed", "2020"))
    return list(range(base, base + int(seeds)))


def main(argv: list[str]) -> int:
    args, words = parse(argv)
    seeds = seed_list(args.seeds, words)
    words = [w for w in words if not w.startswith("seed=")]
    grid = [(g.split("=", 1)[0], split_values(g.split("=", 1)[1])) for g in args.grid]
    runs = plan(grid, seeds, words, args.cells.split(",") if args.preset else None)
    shared_pretrain(runs)
    out = os.path.abspath(args.out)
    device = "cuda" if args.gpus_per_run > 0 else "cpu"
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    guard = open(os.path.join(out, ".sweep.lock"), "w")     # one sweep at a time on OUT, held until exit
    try:
        fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"sweep: another sweep is running on {out}; wait for it, or stop it (Ctrl-C) and run "
                         f"this command again to continue its runs") from None
    except OSError:                                     # a file system without locks: one sweep at a time is
        pass                                            # up to the user
    if stop_requested(out):                             # left by a stopped sweep: this one continues it
        os.remove(os.path.join(out, STOP))
    for marker in glob.glob(os.path.join(out, "runs", "*", ".running")):   # left by tasks killed with a sweep
        os.remove(marker)
    clashes = [m for r in runs if (m := check_identity(os.path.join(out, "runs", r["name"]), r["words"], device, False))]
    if clashes:                                         # before anything runs or results.csv is rewritten
        raise SystemExit(f"sweep: {len(clashes)} of the {len(runs)} runs exist in {out} with other settings; "
                         f"the first: {clashes[0]}")
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    unmet = unmet_request(args.cpus_per_run, args.gpus_per_run)
    if unmet and not (args.address or os.environ.get("RAY_ADDRESS")):
        ray.shutdown()                                  # it would wait for ever
        raise SystemExit(f"sweep: {unmet}")
    if unmet:                                           # a cluster's autoscaler may still add such a node
        print(f"sweep: warning: {unmet}; the runs wait until the cluster has such a node", file=sys.stderr)
    task = run_dpsom.options(**task_options(args.cpus_per_run, args.gpus_per_run, args.retries))
    threads = max(1, int(args.cpus_per_run))
    pending, records, stopped = {}, {}, False
    bar = tqdm(total=len(runs), desc="runs", unit="run")
    try:
        for r in runs:                                  # paths in the words are relative to the user's folder
            pending[task.remote(r, out, threads, device, os.getcwd(), os.path.join(HERE, args.script))] = r
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2)
            for ref in ready:
                records[pending[ref]["name"]] = outcome(ref, pending[ref], out, "failed")
                del pending[ref]                        # only once its record is kept
                bar.update(1)
            running = sum(os.path.exists(os.path.join(out, "runs", r["name"], ".running")) for r in pending.values())
            failed = sum(rec["status"] == "failed" for rec in records.values())
            bar.set_postfix(done=len(records) - failed, running=running, failed=failed, refresh=False)
    except KeyboardInterrupt:                           # every run stops after its step with a checkpoint
        stopped = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not leave the runs unrecorded
        print("\nstopping the runs; each writes its checkpoint (a few seconds) ...", file=sys.stderr)
        open(os.path.join(out, STOP), "w").close()      # a file, so that runs on other nodes see it too
        for ref, run in pending.items():                # not started yet: cancelled (a started task stops its run)
            if not os.path.exists(os.path.join(out, "runs", run["name"], ".running")):
                ray.cancel(ref)
        for ref, run in pending.items():
            records[run["name"]] = outcome(ref, run, out, "interrupted")
    bar.close()
    ray.shutdown()
    _, summary = write_tables(out, runs, records)
    print_summary(summary, bool(args.preset))
    print(f"\n{out}/results.csv, {out}/summary.csv; tensorboard --logdir {out}/runs")
    failed = {name: rec.get("error", "") for name, rec in records.items() if rec["status"] == "failed"}
    for name, error in failed.items():
        print(f"failed: {name}: {error}", file=sys.stderr)
    if stopped or any(rec["status"] == "interrupted" for rec in records.values()):
        print("stopped: the same command continues the unfinished runs", file=sys.stderr)
        return INTERRUPTED
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
