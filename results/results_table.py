"""The seed's table, measured: every finished full run in results/results_table.csv, and the README's table from it.

    python results/results_table.py collect OUT [OUT ...]   # add the finished runs of sweep folders to the CSV
    python results/results_table.py readme                  # rewrite the README's table from the CSV
    python results/results_table.py show                    # print it

`collect` reads each run of a `sweep.py --preset results_table` folder that has a result.json: its cell and
seed (the run's words), NMI, purity and AMI, the split and the encoding (posterior mean, or a sample with
eval_sample=True), the hardware (CPU model and thread count, or GPU, from Sacred's record of the run), the wall
time over every attempt, the commits it ran (Sacred's records of the attempts, found by the run's name and begun
after its first attempt; "-dirty" with uncommitted changes) and the sweep command that reruns it. A run already
in the CSV (every column the same but wall_h and command) is replaced where it stands; new runs are added at the
end in the order they finished, and the table takes each seed's last row: collect runs in the order they
finished.
`readme` puts the table between the README's results-table markers: this port's dense and conv columns as
mean ± std (n) over the seeds of each cell (the sample standard deviation; one run has none), beside the
seed's Torch and TF columns, and the spread of the MNIST dense seeds.
"""
import argparse
import csv
import datetime
import glob
import json
import os
import shlex
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sweep_tables import CELLS, SEED_TABLE, write_csv as write_rows  # noqa: E402

CSV = os.path.join(ROOT, "results", "results_table.csv")
README = os.path.join(ROOT, "README.md")
COLUMNS = ["cell", "seed", "nmi", "purity", "ami", "split", "encoding", "hardware", "wall_h", "commit", "command"]
KEY = tuple(c for c in COLUMNS if c not in ("wall_h", "command"))   # one run: collected again, the same key
OWN_KEYS = ("seed", "logdir", "device", "resume", "data_dir", "pretrain_path", "checkpoint")   # a run's, not a setting
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
ROWS = [("MNIST", "NMI", "mnist", "nmi"), ("MNIST", "purity", "mnist", "purity"),
        ("Fashion-MNIST", "NMI", "fmnist", "nmi"), ("Fashion-MNIST", "purity", "fmnist", "purity")]


def read_csv(path: str = CSV) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(rows: list[dict], path: str = CSV) -> None:
    write_rows(path, rows, COLUMNS)


def cell_of(name: str) -> str | None:
    """The cell of a preset run's folder name (mnist_conv_seed=7 -> mnist_conv), or None."""
    return next((c for c in CELLS if name.startswith(c + "_")), None)


def sacred_records(out: str, logdir: str, since: float | None = None) -> list[dict]:
    """Sacred's run.json of every attempt of the run in `logdir`, oldest first, with its config.json as "config" and
    info.json as "info" (the sweep's observer keeps them in OUT/sacred). since: the first attempt's start
    in seconds since the epoch; a record begun before it is of an earlier run in a folder of the same name (one
    deleted and run again) and is left out."""
    records = []
    folders = [d for d in glob.glob(os.path.join(out, "sacred", "*")) if os.path.basename(d).isdigit()]
    for folder in sorted(folders, key=lambda d: int(os.path.basename(d))):   # Sacred's run ids count up
        if not os.path.exists(os.path.join(folder, "config.json")):
            continue
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        if os.path.basename(os.path.normpath(config.get("logdir", ""))) != os.path.basename(logdir):
            continue                                            # by the run's name: OUT may have moved since
        with open(os.path.join(folder, "run.json")) as f:
            record = dict(json.load(f), config=config)
        begun = datetime.datetime.fromisoformat(record["start_time"]).replace(tzinfo=datetime.timezone.utc)
        if since is not None and begun.timestamp() < since:     # Sacred writes its start time in UTC
            continue
        records.append(record)
        if os.path.exists(os.path.join(folder, "info.json")):   # the run's own notes (_run.info): its threads
            with open(os.path.join(folder, "info.json")) as f:
                records[-1]["info"] = json.load(f)
    if not records:
        raise FileNotFoundError(f"no Sacred record of {logdir} in {out}/sacred")
    return records


def in_order(values: list[str]) -> str:
    """What every attempt had, or what the attempts had in the order they ran, joined by "..", a value equal to the
    one before not repeated: a..b..a ended on a."""
    return "..".join(v for i, v in enumerate(values) if i == 0 or v != values[i - 1])


def commit_of(records: list[dict]) -> str:
    """The commits the attempts ran, in order ("-dirty" with uncommitted changes)."""
    return in_order([r["experiment"]["repositories"][0]["commit"][:7]
                     + ("-dirty" if r["experiment"]["repositories"][0].get("dirty") else "")
                     for r in records if r["experiment"].get("repositories")]) or "unknown"


def hardware_of(records: list[dict], device: str, threads: int | None) -> tuple[str, str]:
    """The CPU model (with the kernels torch chose for it, where recorded) and thread count, or the GPU, the
    attempts ran on, in order, and the torch build where recorded; and the thread count if every attempt had the
    same (a run begun on 2 threads and continued on 1 is no run of `--cpus-per-run 1`). An attempt that left no
    notes (stopped within Sacred's first 10 s, before training) says nothing of threads."""
    torch_builds = in_order([d.split("==", 1)[1] for r in records
                             for d in r.get("experiment", {}).get("dependencies", []) if d.startswith("torch==")])
    build = f", torch {torch_builds}" if torch_builds else ""
    if device != "cpu":
        return in_order([r.get("info", {}).get("device_name", "GPU") for r in records]) + build, ""
    noted = [r for r in records if r.get("info", {}).get("threads")]
    counts = [str(r["info"]["threads"]) for r in noted] or [str(threads or "?")]
    plural = "" if set(counts) == {"1"} else "s"
    same = counts[0] if len(set(counts)) == 1 and counts[0].isdigit() else ""
    cpus = in_order([r["host"]["cpu"] + (f" ({r['info']['cpu_capability']})" if r.get("info", {}).get("cpu_capability")
                                         else "") for r in (noted or records)])
    return f"{cpus}, {in_order(counts)} thread{plural}{build}", same


def config_of(words: list[str]) -> dict:
    """Today's config of a run's words (`with` ...), as Sacred resolves them."""
    import contextlib
    import io
    from sacred.arg_parser import get_config_updates
    import dpsom
    updates, named = get_config_updates(words)
    with contextlib.redirect_stdout(io.StringIO()):
        return dpsom.ex.run("print_config", config_updates=updates, named_configs=named,
                            options={"--loglevel": "ERROR"}).config


def off_default(config: dict, words: list[str]) -> list[str]:
    """The settings by which a run's recorded config differs from what its words give today (a run of an older
    default, or of words whose meaning has changed since), as words that would give them; a key the run's code
    did not have yet counts as today's."""
    today = config_of(words)
    return [f"{k}={config[k]!r}" for k in sorted(today)
            if k not in OWN_KEYS and k in config and config[k] != today[k]]


def finished_at(logdir: str) -> float:
    """When the run finished: its last attempt's start plus its seconds (the result file's time for sweeps that
    did not record starts)."""
    with open(os.path.join(logdir, "attempts.json")) as f:
        last = json.load(f)[-1]
    if "at" in last:
        return last["at"] + last["seconds"]
    return os.path.getmtime(os.path.join(logdir, "result.json"))


def run_row(out: str, logdir: str, threads: int | None = None) -> tuple[dict, list[str]]:
    """The CSV row of one finished run of a results_table sweep, and the words it was given beyond its cell's
    and those its recorded config differs by from today's default (none for a run of the default); threads:
    where the run's record lacks them."""
    with open(os.path.join(logdir, "sweep.json")) as f:
        identity = json.load(f)
    with open(os.path.join(logdir, "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(logdir, "attempts.json")) as f:
        attempts = json.load(f)
    seconds = sum(a["seconds"] for a in attempts)
    words, records = identity["words"], sacred_records(out, logdir, attempts[0].get("at"))  # older sweeps: no "at"
    cell = cell_of(os.path.basename(logdir))
    hardware, same_threads = hardware_of(records, identity["device"], threads)
    config = records[-1]["config"]                      # what the words gave, `tf_original`'s eval_sample included
    extra = [w for w in words if w not in CELLS[cell] and not w.startswith("seed=")]
    extra += off_default(config, words)
    gpu = "" if identity["device"] == "cpu" else " --gpus-per-run 1"
    cpus = f" --cpus-per-run {same_threads}" if same_threads else ""
    seed = str(config["seed"])
    row = {"cell": cell, "seed": seed, "nmi": f"{result['nmi']:.4f}",
            "purity": f"{result['purity']:.4f}", "ami": f"{result['ami']:.4f}",
            "split": "validation" if config["validation"] else "test",
            "encoding": "sample" if config["eval_sample"] else "mean",
            "hardware": hardware, "wall_h": f"{seconds / 3600:.2f}",
            "commit": commit_of(records),
            "command": f"python sweep.py OUT --preset results_table --cells {cell} --seeds {seed},"
                       f"{cpus}{gpu}" + (f" with {shlex.join(extra)}" if extra else "")}
    return row, extra


def collect(outs: list[str], path: str = CSV, threads: int | None = None, changed: bool = False) -> list[dict]:
    """Add every finished run of the sweep folders to the CSV, in the order they finished; returns the rows added
    or replaced.

    Only runs of today's default go in: a run given words beyond its cell's (`with amp=True`, a shorter
    schedule), or one whose recorded config differs from today's default (a run of an older default), is left
    out, saying so, unless `changed` (for tests of this script on short runs)."""
    rows, new = read_csv(path), []
    finished = {}
    for out in outs:
        for logdir in sorted(glob.glob(os.path.join(out, "runs", "*"))):
            name = os.path.basename(logdir)
            if not os.path.exists(os.path.join(logdir, "result.json")):
                print(f"left out {logdir}: not finished (no result.json)")
            elif cell_of(name) is None or not os.path.exists(os.path.join(logdir, "sweep.json")):
                print(f"left out {logdir}: not a run of `sweep.py --preset results_table` (no cell name or sweep.json)")
            else:
                row, extra = run_row(out, logdir, threads)
                if extra and not changed:
                    print(f"left out {logdir}: not the default ({' '.join(extra)})")
                    continue
                new.append(row)
                finished[id(row)] = finished_at(logdir)
    new.sort(key=lambda row: finished[id(row)])   # the table takes a seed's last row: the run that finished last
    index = {tuple(r[k] for k in KEY): i for i, r in enumerate(rows)}
    for row in new:                     # a run collected again keeps its place; another run of a seed is added
        key = tuple(row[k] for k in KEY)
        if key in index:
            rows[index[key]] = row
        else:
            index[key] = len(rows)
            rows.append(row)
    write_csv(rows, path)
    return new


def cell_values(rows: list[dict], cell: str, metric: str) -> list[float]:
    """The metric of every seed of a cell (validation split, posterior mean); a seed run twice counts once,
    its latest row."""
    latest = {r["seed"]: float(r[metric]) for r in rows
              if r["cell"] == cell and r["split"] == "validation" and r["encoding"] == "mean"}
    return list(latest.values())


def mean_std(values: list[float]) -> str:
    if not values:
        return "not run yet"
    if len(values) == 1:
        return f"{values[0]:.4f} (1)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({len(values)})"


def table(rows: list[dict]) -> str:
    """The seed's layout with this port's columns (mean ± std (n)) first, and the MNIST dense spread."""
    lines = ["| data set | metric | this port, dense | this port, conv | seed: Torch dense | seed: TF dense "
             "| seed: Torch conv | seed: TF conv |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for name, label, data, metric in ROWS:
        i = 0 if metric == "nmi" else 1
        ours = [mean_std(cell_values(rows, f"{data}_{arch}", metric)) for arch in ("dense", "conv")]
        seed = [f"{SEED_TABLE[f'{data}_{arch}'][j][i]:.4f}" for arch in ("dense", "conv") for j in (0, 1)]
        lines.append(f"| {name} | {label} | {ours[0]} | {ours[1]} | {' | '.join(seed)} |")
    spread = {m: cell_values(rows, "mnist_dense", m) for m in ("purity", "nmi")}
    if len(spread["purity"]) > 1:
        lines.append("")
        lines.append(f"MNIST dense over {len(spread['purity'])} seeds: purity {min(spread['purity']):.4f} to "
                     f"{max(spread['purity']):.4f}, NMI {min(spread['nmi']):.4f} to {max(spread['nmi']):.4f}.")
    return "\n".join(lines)


def update_readme(rows: list[dict], path: str = README) -> None:
    with open(path) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    text = head + START + "\n" + table(rows) + "\n" + END + rest.split(END, 1)[1]
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["collect", "readme", "show"])
    ap.add_argument("outs", nargs="*", help="sweep folders (collect)")
    ap.add_argument("--threads", type=int, help="collect: a CPU run's threads, for runs whose record lacks them "
                    "(the sweep's --cpus-per-run)")
    args = ap.parse_args(argv)
    if args.command == "collect":
        for row in collect(args.outs, threads=args.threads):
            print(f"{row['cell']} seed {row['seed']}: purity {row['purity']}, NMI {row['nmi']} ({row['hardware']}, "
                  f"{row['wall_h']} h, {row['commit']})")
    elif args.command == "readme":
        update_readme(read_csv())
    print(table(read_csv()))


if __name__ == "__main__":
    main(sys.argv[1:])
