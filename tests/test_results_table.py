"""results/results_table.py: a run's row from the files a sweep leaves, and the README's table from the rows."""
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, cli_words

sys.path.insert(0, os.path.join(ROOT, "results"))
import results_table  # noqa: E402
import sweep  # noqa: E402


def test_a_finished_runs_row_from_what_the_sweep_and_sacred_record(tmp_path, cli_run):
    # what `sweep.py OUT --preset results_table --cells mnist_dense --seeds 1, with ...` leaves for one run
    _, out, logdir = cli_run
    (logdir / "sweep.json").write_text(json.dumps({"words": cli_words(), "device": "cpu"}))
    (logdir / "attempts.json").write_text(json.dumps([{"seconds": 1800.0}, {"seconds": 5400.0}]))
    csv_path = tmp_path / "table.csv"
    assert results_table.collect([str(out)], path=str(csv_path)) == []   # a short run is not the default's
    assert not csv_path.exists() or results_table.read_csv(str(csv_path)) == []
    rows = results_table.collect([str(out)], path=str(csv_path), changed=True)
    result = json.load(open(logdir / "result.json"))
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    row = rows[0]
    assert len(rows) == 1 and row["cell"] == "mnist_dense" and row["seed"] == "1"
    assert (row["nmi"], row["purity"], row["ami"]) == tuple(f"{result[k]:.4f}" for k in ("nmi", "purity", "ami"))
    assert row["split"] == "validation" and row["encoding"] == "mean" and row["wall_h"] == "2.00"
    # the CPU's kernels, thread count and torch build the run itself recorded
    assert row["hardware"].endswith(f" ({torch.backends.cpu.get_cpu_capability()}), 1 thread, torch {torch.__version__}")
    assert row["commit"].split("-")[0] == head.stdout.strip()
    assert row["command"].startswith("python sweep.py OUT --preset results_table --cells mnist_dense --seeds 1, "
                                     "--cpus-per-run 1 with ")
    # pasted into a shell, the command reruns this cell and seed with the run's own words, no other
    args, again = sweep.parse(shlex.split(row["command"])[2:])
    assert args.cells == "mnist_dense" and args.cpus_per_run == 1 and sweep.seed_list(args.seeds, again) == [1]
    assert sweep.plan([], [1], again, ["mnist_dense"])[0]["words"] == cli_words()
    results_table.collect([str(out)], path=str(csv_path), changed=True)   # again: replaced, not added
    assert len(results_table.read_csv(str(csv_path))) == 1


def test_a_runs_row_leaves_out_the_sacred_records_of_an_earlier_run_in_a_folder_of_its_name(tmp_path, cli_run,
                                                                                             monkeypatch):
    # the run's folder was deleted and run again in the same OUT: Sacred still holds the old run's record, begun
    # before the new folder's first attempt, on another commit
    out = tmp_path / "out"
    shutil.copytree(cli_run[1], out)
    logdir = out / "runs" / "mnist_dense_seed=1"
    (logdir / "sweep.json").write_text(json.dumps({"words": cli_words(), "device": "cpu"}))
    ids = sorted(int(d.name) for d in (out / "sacred").iterdir() if d.name.isdigit())
    shutil.copytree(out / "sacred" / str(ids[-1]), out / "sacred" / "0")   # the old run: an earlier id
    old = json.load(open(out / "sacred" / "0" / "run.json"))
    begun = datetime.datetime.fromisoformat(old["start_time"]).replace(tzinfo=datetime.timezone.utc).timestamp()
    an_hour_before = datetime.datetime.fromtimestamp(begun - 3600, datetime.timezone.utc)
    old["start_time"] = an_hour_before.replace(tzinfo=None).isoformat()          # as Sacred writes it: UTC, naive
    old["experiment"]["repositories"][0].update(commit="b" * 40, dirty=False)
    (out / "sacred" / "0" / "run.json").write_text(json.dumps(old))
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    (logdir / "attempts.json").write_text(json.dumps([{"at": begun - 2, "seconds": 60.0}]))
    zone = os.environ.get("TZ")
    monkeypatch.setenv("TZ", "Asia/Kolkata")    # UTC+5:30: Sacred's UTC start time read as local time would
    time.tzset()                                # put the new record before the attempt that started it
    try:
        row, _ = results_table.run_row(str(out), str(logdir))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert os.environ.get("TZ") == zone
    assert row["commit"].split("-")[0] == head.stdout.strip()            # the old record is not an attempt of it
    (logdir / "attempts.json").write_text(json.dumps([{"seconds": 60.0}]))   # a sweep's record before "at"
    row, _ = results_table.run_row(str(out), str(logdir))
    assert row["commit"].startswith("bbbbbbb..")                           # by name alone: both runs' records


def test_split_and_encoding_come_from_the_runs_config_hardware_and_threads_from_every_attempt(tmp_path, cli_run):
    out = tmp_path / "out"
    shutil.copytree(cli_run[1], out)
    logdir = out / "runs" / "mnist_dense_seed=1"
    (logdir / "sweep.json").write_text(json.dumps({"words": cli_words(), "device": "cpu"}))
    (logdir / "attempts.json").write_text(json.dumps([{"seconds": 60.0}]))
    record, = [d for d in (out / "sacred").iterdir() if d.name.isdigit()]
    config = json.load(open(record / "config.json"))
    config["eval_sample"] = True                     # as `with tf_original` sets it: no eval_sample= among the words
    (record / "config.json").write_text(json.dumps(config))
    row, extra = results_table.run_row(str(out), str(logdir))
    assert "eval_sample=True" not in cli_words() and row["encoding"] == "sample" and row["split"] == "validation"
    assert extra == [w for w in cli_words() if w not in ("validation=True", "seed=1")] + ["eval_sample=True"]

    # a run of an older default: its recorded config differs from today's where no word set it
    config.update(posterior="diag", eval_sample=False)
    del config["amp"]                                # a key its code did not have yet counts as today's
    (record / "config.json").write_text(json.dumps(config))
    assert results_table.run_row(str(out), str(logdir))[1][-1] == "posterior='diag'"
    assert results_table.off_default({**config, "posterior": "tril"}, cli_words()) == []
    assert results_table.off_default({**config, "posterior": "tril", "beta": 0.4}, cli_words()) == ["beta=0.4"]
    fmnist = {**config, "posterior": "tril", "beta": 0.4, "data_set": "fMNIST", "data_name": "fMNIST"}
    assert results_table.off_default(fmnist, ["fmnist", *cli_words()]) == []      # what its words give

    def rec(cpu, threads):
        return {"host": {"cpu": cpu}, "info": {"threads": threads}}
    assert results_table.hardware_of([rec("X", 1), rec("X", 1)], "cpu", None) == ("X, 1 thread", "1")
    # begun on 2 threads, continued on 1: both said, and no --cpus-per-run repeats it
    assert results_table.hardware_of([rec("X", 2), rec("X", 1)], "cpu", None) == ("X, 2..1 threads", "")
    assert results_table.hardware_of([rec("X", 2), rec("Y", 2)], "cpu", None) == ("X..Y, 2 threads", "2")
    assert results_table.hardware_of([{"host": {"cpu": "X"}}], "cpu", 4) == ("X, 4 threads", "4")
    assert results_table.hardware_of([{"info": {"device_name": "H100"}}], "cuda", None) == ("H100", "")
    # an attempt stopped before Sacred's first notes says nothing of threads; the kernels and the torch build
    assert results_table.hardware_of([rec("X", 1), {"host": {"cpu": "X"}}], "cpu", None) == ("X, 1 thread", "1")
    noted = {"host": {"cpu": "X"}, "info": {"threads": 2, "cpu_capability": "AVX2"},
             "experiment": {"dependencies": ["numpy==2.3.5", "torch==2.13.0+cpu"]}}
    assert results_table.hardware_of([noted], "cpu", None) == ("X (AVX2), 2 threads, torch 2.13.0+cpu", "2")


def test_collect_names_each_cell_adds_runs_in_the_order_they_finished_and_leaves_out_what_is_not_a_finished_run(
        tmp_path, monkeypatch, capsys):
    # a conv and an fmnist_conv run (names that share a prefix), an unfinished run and a stray folder
    out = tmp_path / "out"
    for name in ("mnist_conv_seed=7", "fmnist_conv_seed=7", "fmnist_dense_seed=8", "notes", "mnist_dense_seed=9",
                 "mnist_conv_seed=6"):
        (out / "runs" / name).mkdir(parents=True)
    for name in ("mnist_conv_seed=7", "fmnist_conv_seed=7", "mnist_dense_seed=9", "mnist_conv_seed=6"):
        (out / "runs" / name / "result.json").write_text(json.dumps({"nmi": 0.7, "purity": 0.97, "ami": 0.6}))
    (out / "runs" / "notes" / "result.json").write_text("{}")
    assert [results_table.cell_of(n) for n in ("mnist_conv_seed=7", "fmnist_conv_seed=7", "fmnist_dense_seed=8",
                                               "mnist_dense_seed=1", "notes")] == [
        "mnist_conv", "fmnist_conv", "fmnist_dense", "mnist_dense", None]
    # finished: fmnist_conv 7 last, mnist_conv 6 (sorted first by name) after mnist_conv 7
    for name, at in (("mnist_conv_seed=7", 100.0), ("fmnist_conv_seed=7", 900.0), ("mnist_conv_seed=6", 500.0)):
        (out / "runs" / name / "sweep.json").write_text("{}")
        (out / "runs" / name / "attempts.json").write_text(json.dumps([{"at": at, "seconds": 60.0}]))

    def row(cell, seed, purity):
        return {**{k: "x" for k in results_table.COLUMNS}, "cell": cell, "seed": seed, "purity": purity,
                "split": "validation", "encoding": "mean"}
    seen = []   # run_row's files are the first test's; here only which folders reach it, under which cell
    monkeypatch.setattr(results_table, "run_row", lambda o, logdir, threads: seen.append(logdir) or (
        row(results_table.cell_of(os.path.basename(logdir)), os.path.basename(logdir)[-1],
            "0.91" if logdir.endswith("mnist_conv_seed=6") else "0.97"), []))
    csv_path = str(tmp_path / "t.csv")
    collected = {**row("mnist_conv", "7", "0.97"), "wall_h": "1.00", "command": "an older command"}   # this run
    results_table.write_csv([row("mnist_dense", "2020", "0.9"), collected, row("mnist_dense", "2021", "0.9")],
                            csv_path)
    new = results_table.collect([str(out)], path=csv_path)
    assert [(r["cell"], r["seed"]) for r in new] == [("mnist_conv", "7"), ("mnist_conv", "6"), ("fmnist_conv", "7")]
    assert len(seen) == 3
    told = capsys.readouterr().out
    assert "fmnist_dense_seed=8: not finished" in told and "notes: not a run of" in told
    assert "mnist_dense_seed=9: not a run of" in told
    table = results_table.read_csv(csv_path)
    assert [(r["cell"], r["seed"]) for r in table] == [("mnist_dense", "2020"), ("mnist_conv", "7"),
                                                       ("mnist_dense", "2021"), ("mnist_conv", "6"),
                                                       ("fmnist_conv", "7")]
    assert table[1]["command"] == "x"                               # collected again: replaced where it stood
    # another run of a seed already in the table (other numbers) is added after it, and the table takes it
    monkeypatch.setattr(results_table, "run_row", lambda o, logdir, threads: (row("mnist_conv", "7", "0.99"), []))
    (out / "runs" / "mnist_conv_seed=6" / "result.json").unlink()
    (out / "runs" / "fmnist_conv_seed=7" / "result.json").unlink()
    results_table.collect([str(out)], path=csv_path)
    table = results_table.read_csv(csv_path)
    assert len(table) == 6 and table[-1]["purity"] == "0.99"
    assert results_table.cell_values(table, "mnist_conv", "purity") == [0.99, 0.91]


def test_the_commit_of_attempts_in_the_order_they_ran():
    def rec(commit, dirty=False):
        return {"experiment": {"repositories": [{"commit": commit * 40, "dirty": dirty}]}}
    assert results_table.commit_of([rec("a"), rec("a")]) == "a" * 7
    assert results_table.commit_of([rec("a"), rec("b"), rec("a")]) == "aaaaaaa..bbbbbbb..aaaaaaa"   # ended on a
    assert results_table.commit_of([rec("a"), rec("a", dirty=True)]) == "aaaaaaa..aaaaaaa-dirty"
    assert results_table.commit_of([{"experiment": {}}]) == "unknown"


def rows(cell, values, **other):
    return [{"cell": cell, "seed": str(2020 + i), "nmi": str(v - 0.3), "purity": str(v), "ami": "0.5",
             "split": "validation", "encoding": "mean", **other} for i, v in enumerate(values)]


def test_the_table_in_the_seeds_layout_with_mean_std_and_n():
    table = results_table.table(rows("mnist_dense", [0.90, 0.92, 0.94]) + rows("fmnist_conv", [0.77])
                                + rows("mnist_conv", [0.5], split="test") + rows("mnist_conv", [0.6], encoding="sample"))
    lines = table.splitlines()
    assert lines[2] == ("| MNIST | NMI | 0.6200 ± 0.0200 (3) | not run yet | 0.6946 | 0.6919 | 0.7267 | 0.6988 |")
    assert lines[3].startswith("| MNIST | purity | 0.9200 ± 0.0200 (3) | not run yet | 0.9609 | 0.9626 |")
    assert lines[5].startswith("| Fashion-MNIST | purity | not run yet | 0.7700 (1) | 0.7738 | 0.7809 |")
    assert lines[-1] == "MNIST dense over 3 seeds: purity 0.9000 to 0.9400, NMI 0.6000 to 0.6400."


def test_a_seed_run_twice_counts_once_its_latest_row():
    assert results_table.cell_values(rows("mnist_dense", [0.90]) + rows("mnist_dense", [0.95]), "mnist_dense",
                                     "purity") == [0.95]


def test_the_readme_table_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{results_table.START}\nold\n{results_table.END}\nafter\n")
    results_table.update_readme(rows("mnist_dense", [0.9]), str(readme))
    text = readme.read_text()
    assert "old" not in text and "| MNIST | purity | 0.9000 (1) |" in text and text.endswith(f"{results_table.END}\nafter\n")
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        results_table.update_readme([], str(readme))


def test_the_readmes_table_is_the_one_its_csv_gives():
    # the committed README shows what results/results_table.csv holds: rerun `results_table.py readme` after collect
    text = open(results_table.README).read()
    shown = text.split(results_table.START, 1)[1].split(results_table.END, 1)[0].strip()
    assert shown == results_table.table(results_table.read_csv()), "run: python results/results_table.py readme"


def test_the_committed_csv_has_its_columns_and_each_sweep_rows_command_reruns_its_row():
    # a command holds a comma (`--seeds 2020,`): unquoted, csv reads a twelfth field and cuts the command there
    for row in results_table.read_csv():
        assert list(row) == results_table.COLUMNS, row
        if row["command"].startswith("python sweep.py "):                # a run of the default, as it ran
            args, words = sweep.parse(shlex.split(row["command"])[2:])
            assert args.cells == row["cell"] and sweep.seed_list(args.seeds, words) == [int(row["seed"])]
            assert words == [] and args.preset == "results_table", row
            threads = re.search(r", (\d+) threads?(, |$)", row["hardware"])   # absent: it changed, or a GPU's
            assert (f"--cpus-per-run {threads[1]}" in row["command"]) if threads else (
                "--cpus-per-run" not in row["command"]), row
