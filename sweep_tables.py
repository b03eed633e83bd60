"""What a sweep writes and prints: OUT/results.csv (a row per run), OUT/summary.csv (mean, sample standard
deviation and n of every number per setting) and the summary, beside the seed's table for the preset. The seed's
table itself (its cells and their reference numbers) lives here too, without Ray, for results/results_table.py.
"""
import csv
import os

import numpy as np

CELLS = {"mnist_dense": ["validation=True"], "mnist_conv": ["conv", "validation=True"],
         "fmnist_dense": ["fmnist", "validation=True"], "fmnist_conv": ["fmnist", "conv", "validation=True"]}
# The seed's table (single runs, validation=True): (NMI, purity) of the PyTorch port it lists and of the
# TensorFlow original. Source: the project's specification, section 7, which quotes elin-d/dpsom's README
# (whose own evaluation ran on the test set).
SEED_TABLE = {"mnist_dense": ((0.6946, 0.9609), (0.6919, 0.9626)), "mnist_conv": ((0.7267, 0.9833), (0.6988, 0.9676)),
              "fmnist_dense": ((0.5673, 0.7738), (0.5667, 0.7809)), "fmnist_conv": ((0.5712, 0.7766), (0.5667, 0.7809))}


def write_tables(out: str, runs: list[dict], records: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """results.csv (a row per run) and summary.csv (mean, sample std and n of every number per setting)."""
    keys = list(dict.fromkeys(k for r in runs for k in r["settings"]))
    numbers = list(dict.fromkeys(k for rec in records.values() for k, v in rec.get("result", {}).items()
                                 if isinstance(v, (int, float))))
    rows = []
    for r in runs:
        rec = records.get(r["name"], {"status": "not run"})
        rows.append({**{k: r["settings"].get(k, "") for k in keys}, "seed": r["seed"], "name": r["name"],
                     **{k: rec.get("result", {}).get(k, "") for k in numbers},
                     "wall_s": round(rec.get("wall_s", 0.0), 1), "attempts": rec.get("attempts", 0),
                     "status": rec["status"], "error": rec.get("error", "")})
    write_csv(os.path.join(out, "results.csv"), rows)
    summary = []
    for setting in dict.fromkeys(tuple(row[k] for k in keys) for row in rows):
        done = [row for row in rows if tuple(row[k] for k in keys) == setting and row["status"] == "done"]
        entry = dict(zip(keys, setting)) | {"n": len(done)}
        for k in numbers:   # over the runs that report k (a run without labels has no purity, for example)
            values = np.array([row[k] for row in done if row[k] != ""], dtype=float)
            entry[f"{k}_mean"] = float(values.mean()) if len(values) else ""
            entry[f"{k}_std"] = float(values.std(ddof=1)) if len(values) > 1 else ""   # the sample std, as the README
        summary.append(entry)
    write_csv(os.path.join(out, "summary.csv"), summary)
    return rows, summary


def write_csv(path: str, table: list[dict], columns: list[str] | None = None) -> None:
    """The rows under `columns` (default: the first row's keys)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or (list(table[0]) if table else []))
        writer.writeheader()
        writer.writerows(table)


def mean_std(entry: dict, key: str) -> str:
    """'0.9500 ± 0.0200' over several runs, '0.9500' over one (no spread to show)."""
    std = entry[f"{key}_std"]
    return f"{entry[f'{key}_mean']:.4f}" + (f" ± {std:.4f}" if std != "" else "")


def print_summary(summary: list[dict], preset: bool) -> None:
    if not summary:
        return
    keys = [k for k in summary[0] if k != "n" and not k.endswith(("_mean", "_std"))]
    shown = [k for k in ("nmi", "purity", "ami", "nll", "nodes_used") if f"{k}_mean" in summary[0]]
    print("\n" + "  ".join(keys + ["n"] + shown))
    for e in summary:
        cells = [mean_std(e, k) if e[f"{k}_mean"] != "" else "-" for k in shown]
        print("  ".join([str(e[k]) for k in keys] + [str(e["n"])] + cells))
    if preset:
        print("\nThe seed's table beside this sweep (validation split; mean ± std over n seeds):")
        print(f"{'cell':<14}{'metric':<8}{'this sweep':>22}{'seed: Torch':>13}{'seed: TF':>10}")
        for e in summary:
            for i, k in enumerate(("nmi", "purity")):
                mine = (f"{mean_std(e, k)} (n={e['n']})"
                        if e.get(f"{k}_mean", "") != "" else "no finished run")   # absent: no run reported any
                torch_ref, tf_ref = (t[i] for t in SEED_TABLE[e["cell"]])
                print(f"{e['cell'] if i == 0 else '':<14}{k:<8}{mine:>22}{torch_ref:>13.4f}{tf_ref:>10.4f}")
