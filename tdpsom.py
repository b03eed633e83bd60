"""Train and evaluate T-DPSOM: a Sacred experiment with four phases sharing one optimiser and one step count.

    python tdpsom.py with data_path=stays.npz
    python tdpsom.py with eicu data_path=eICU_data.csv        # the reference's HDF5 file, not normalised again
    python tdpsom.py evaluate with checkpoint=RUN
    python tdpsom.py assign with checkpoint=RUN data_path=FILE
    tensorboard --logdir runs

Phases: 1 VAE pretraining (ELBO), 2 SOM initialisation (only the prototypes learn), 3 joint training (per
batch a step of ELBO + KL(P||Q) + SOM + smoothness + prediction, then one of the prediction loss; P recomputed
over every step of the training stays each epoch), 4 fine-tuning of the LSTM on the prediction loss.

This file is the experiment: config, named configs, the config's checks, data, and the commands. The model is
tdpsom_model.py's, the recipe and evaluation tdpsom_training.py's, the loop plan_runner.py's.
"""
import csv
import json
import os
import uuid
import warnings
from datetime import datetime

import numpy as np
import torch
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")   # raised inside Sacred 0.8.7
from sacred import Experiment  # noqa: E402
from sacred.utils import apply_backspaces_and_linefeeds

from checkpoint import load_checkpoint, resumed_config, resumed_folder
from config_checks import SetupError, pick_device
from plan_runner import TransientFailure, is_transient, run_commandline, write_result
from sequence_data import NORMALIZATIONS, load_all_sequences, load_sequences
from tb_logging import component_planes
from tdpsom_model import LAST_STEP_TARGETS, LSTM_GATES
from tdpsom_training import build_model, epoch_plan, evaluate_model, place, train
from user_data import Preprocessing

ex = Experiment("tdpsom")
ex.captured_out_filter = apply_backspaces_and_linefeeds


@ex.config
def config():
    data_path = None                 # stays (N, T, D): the reference's HDF5 (x, y), a .npz (x, optional y, label_names) or .npy
    normalize = "standard"           # per feature over the training stays' steps: "standard", "minmax" or "none"
    component_planes = None          # features (names or indices) pictured over the map (None: the first 8)
    validation = False               # evaluate on the validation stays (True) or the test stays (the last 15 %)
    train_ratio = 1.0                # keep the first fraction of the training stays (the reference's option)
    max_train_stays = None           # use only the first N training stays
    max_eval_stays = None            # evaluate on the first N stays of the evaluation set only
    latent_dim = 50                  # dimension of the latent space
    som_dim = [16, 16]               # SOM grid, rows x columns
    lstm_dim = 200                   # LSTM state size
    toroidal = True                  # SOM neighbourhood wraps around the edges (the reference's grid)
    alpha = 10.0                     # Student's t degrees of freedom of q and of the smoothness kernel
    beta = 10.0                      # weight of the SOM loss
    gamma = 50.0                     # weight of the clustering loss KL(P||Q)
    kappa = 1.0                      # weight of the smoothness loss
    theta = 1.0                      # weight of the ELBO
    eta = 1.0                        # weight of the prediction loss inside the joint loss
    prior = 1e-5                     # weight of the KL term inside the ELBO
    batchnorm = "frozen"             # "frozen" (the reference's: BN after the activation, stats 0/1) or "standard"
    dropout = 0.0                    # dropout after each encoder layer (the reference's was inactive)
    lstm_gates = "hard_sigmoid"      # the reference's Keras v1 LSTM gates, or "sigmoid" (PyTorch's, Keras 2's)
    last_step_target = "drop"        # "drop": only real transitions are forecast; "self": the reference's last step predicts itself
    batch_size = 300                 # stays per batch; the last partial batch of each epoch is dropped
    epochs_pretrain = 50             # phase 1 epochs
    som_learning_rates = [0.1, 0.01, 0.01]   # phase 2: one block of som_epochs per rate (the reference's)
    som_epochs = None                # phase 2 epochs per block (None: epochs_pretrain // 3, the reference's)
    num_epochs = 100                 # phase 3 epochs
    epochs_finetune = 50             # phase 4 epochs (hard-coded 50 in the reference)
    learning_rate = 0.001            # phases 1, 3 and 4
    decay_factor = 0.99              # lr *= decay_factor every decay_steps global steps (staircase)
    decay_steps = 2000               # the reference's effective value: its script never passes one
    forecast_steps = 6               # the evaluation forecasts the last steps of each stay from the ones before
    val_epochs = False               # evaluate every 10 joint epochs as well as at the end
    seed = 2020                      # Sacred seeds Python, NumPy and torch from it (the reference sets none)
    adam = "tf1"                     # "tf1" (TF1's bias correction over the global step) or "torch"
    target_sample = True             # P from one posterior sample per step (the reference's) instead of the mean
    eval_sample = False              # evaluate on samples (the reference's) instead of means
    device = "auto"                  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    compile = False                  # torch.compile each op's loss
    log_every = 50                   # steps between logged scalars (the only host syncs in the loop)
    checkpoint_every = 60            # seconds: an epoch ends with a checkpoint once this long has passed since the last
                                     # (0: every epoch); every phase ends with one, and so does a stop signal
    data_name = os.path.splitext(os.path.basename(data_path))[0] if isinstance(data_path, str) else "none"
    logdir = os.path.join("runs", f"{datetime.now():%Y%m%d-%H%M%S}_tdpsom_{data_name}_{uuid.uuid4().hex[:6]}")
    save_pretrain = False            # save model and optimiser after phase 2 to pretrain_path
    use_saved_pretrain = False       # skip phases 1-2 by loading pretrain_path
    som_grid = "x".join(map(str, som_dim)) if isinstance(som_dim, (list, tuple)) else som_dim
    pretrain_path = os.path.join("runs", "pretrained", f"tdpsom_{data_name}_{latent_dim}_{som_grid}.pt")
    resume = None                    # checkpoint file or run folder to continue, with the checkpoint's config
    checkpoint = None                # the evaluate and assign commands: checkpoint file or run folder


@ex.named_config
def tf_original():
    # the reference's numerics everywhere, to compare a run with the TensorFlow code
    normalize = "none"
    batchnorm = "frozen"
    dropout = 0.0
    lstm_gates = "hard_sigmoid"
    last_step_target = "self"
    adam = "tf1"
    target_sample = True
    eval_sample = True


@ex.named_config
def eicu():
    # the reference's eICU file: already scaled by its preprocessing, so no normalisation here
    normalize = "none"


@ex.named_config
def standard_layers():
    # modern layers: standard BatchNorm before the activation, dropout, sigmoid gates, PyTorch's Adam, P from means
    batchnorm = "standard"
    dropout = 0.5
    lstm_gates = "sigmoid"
    adam = "torch"
    target_sample = False


@ex.named_config
def quick():
    # a few minutes on a laptop CPU: short phases, smaller batches, an 8x8 map, the validation stays
    validation = True
    som_dim = [8, 8]
    batch_size = 32
    epochs_pretrain = 6
    num_epochs = 10
    epochs_finetune = 3


BOOLEAN_KEYS = ("validation", "toroidal", "val_epochs", "target_sample", "eval_sample", "compile", "save_pretrain",
                "use_saved_pretrain")
ARCHITECTURE_KEYS = ("input_dim", "latent_dim", "som_dim", "lstm_dim", "batchnorm", "dropout", "lstm_gates", "normalize",
                     "adam")   # what a saved pretraining's weights and optimiser state were made for


def check_config(c: dict) -> None:
    """Fail before training, naming the key and the fix, on a config value that cannot work."""
    def need(ok, key, what):
        if not ok:
            raise SetupError(f"config {key}={c[key]!r}: {what}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    need(isinstance(c["data_path"], str), "data_path", "give the file of stays: data_path=<file> (HDF5 with x (N, T, "
         "D) and y, .npz with x and optional y, label_names, or .npy)")
    need(c["normalize"] in NORMALIZATIONS, "normalize", f"must be one of {NORMALIZATIONS}")
    need(isinstance(c["som_dim"], (list, tuple)) and len(c["som_dim"]) == 2
         and all(is_int(v) and v > 0 for v in c["som_dim"]), "som_dim", "must be two positive integers, e.g. [16,16]")
    for key in ("batch_size", "latent_dim", "lstm_dim", "decay_steps", "log_every", "forecast_steps"):
        need(is_int(c[key]) and c[key] > 0, key, "must be a positive integer")
    for key in ("epochs_pretrain", "num_epochs", "epochs_finetune"):
        need(is_int(c[key]) and c[key] >= 0, key, "must be a non-negative integer")
    need(c["som_epochs"] is None or (is_int(c["som_epochs"]) and c["som_epochs"] >= 0), "som_epochs",
         "must be None (epochs_pretrain // 3) or a non-negative integer")
    need(is_number(c["checkpoint_every"]) and c["checkpoint_every"] >= 0, "checkpoint_every",
         "must be a non-negative number of seconds (0: a checkpoint every epoch)")
    for key in ("beta", "gamma", "theta", "kappa", "eta", "prior", "learning_rate"):
        need(is_number(c[key]) and c[key] >= 0, key, "must be a non-negative number")
    need(is_number(c["alpha"]) and c["alpha"] > 0, "alpha", "degrees of freedom must be > 0")
    need(is_number(c["dropout"]) and 0 <= c["dropout"] < 1, "dropout", "must be in [0, 1)")
    need(is_number(c["decay_factor"]) and 0 < c["decay_factor"] <= 1, "decay_factor", "must be in (0, 1]")
    need(is_number(c["train_ratio"]) and 0 < c["train_ratio"] <= 1, "train_ratio", "must be in (0, 1]")
    need(isinstance(c["som_learning_rates"], (list, tuple)) and all(is_number(v) and v >= 0
                                                                     for v in c["som_learning_rates"]),
         "som_learning_rates", "must be a list of non-negative numbers")
    for key in ("max_train_stays", "max_eval_stays"):
        need(c[key] is None or (is_int(c[key]) and c[key] > 0), key, "must be None or a positive integer")
    need(c["batchnorm"] in ("standard", "frozen"), "batchnorm", "must be 'standard' or 'frozen'")
    need(c["lstm_gates"] in LSTM_GATES, "lstm_gates", f"must be one of {LSTM_GATES}")
    need(c["last_step_target"] in LAST_STEP_TARGETS, "last_step_target", f"must be one of {LAST_STEP_TARGETS}")
    need(c["adam"] in ("torch", "tf1"), "adam", "must be 'torch' or 'tf1'")
    for key in BOOLEAN_KEYS:   # Sacred passes `key=false` as the string 'false', which would count as True
        need(isinstance(c[key], bool), key, "must be True or False (Python's spelling)")
    need(not c["use_saved_pretrain"] or os.path.exists(c["pretrain_path"]), "pretrain_path",
         "does not exist; run once with save_pretrain=True first")


def load_data(c: dict, pre: Preprocessing | None = None, training: bool = True) -> dict:
    """The split stays of c["data_path"] (sequence_data.load_sequences), normalised with `pre` (a checkpoint's) or
    with statistics of this training split. Only training needs a batch's worth of training stays."""
    return load_sequences(c["data_path"], c["validation"], c["normalize"], c["batch_size"] if training else 1,
                          c["forecast_steps"], pre, c["train_ratio"], c["max_train_stays"], c["max_eval_stays"])


def stored_preprocessing(c: dict) -> Preprocessing | None:
    return Preprocessing.from_dict(c["preprocessing"]) if c.get("preprocessing") else None


def given_keys(run) -> set[str]:
    """The config keys set on the command line, whatever their value."""
    updates = run.meta_info.get("options", {}).get("UPDATE") or []
    return set(run.config_modifications.modified) | {u.split("=", 1)[0] for u in updates if "=" in u}


def finetune_start(c: dict) -> int:
    """The plan index of the first epoch after joint training."""
    return sum(e.phase != "finetune" for e in epoch_plan(c))


def headline(metrics: dict) -> dict:
    """The numbers without the per-step ones (those are in result.json and TensorBoard)."""
    return {name: value for name, value in metrics.items() if "_step/" not in name}


def report(metrics: dict) -> None:
    for name, value in headline(metrics).items():
        print(f"  {name:<34}{value:>10.4f}" if isinstance(value, float) else f"  {name:<34}{value:>10}")


def saved_run(_config: dict, what: str) -> tuple[torch.device, dict]:
    if _config["checkpoint"] is None:
        raise SetupError(f"config checkpoint=None: give the checkpoint file or run folder {what}")
    device = pick_device(_config["device"])
    try:
        state = load_checkpoint(_config["checkpoint"])
    except FileNotFoundError as e:
        raise SetupError(f"config checkpoint={_config['checkpoint']!r}: {e}") from None
    if "lstm_dim" not in state["config"]:
        raise SetupError(f"config checkpoint={_config['checkpoint']!r}: {state['path']} is not a T-DPSOM checkpoint "
                         f"(a DPSOM run's? use python dpsom.py)")
    return device, state


def saved_model(state: dict, device: torch.device):
    model = build_model(state["config"]).to(device)
    model.load_state_dict(state["model"])
    return model


@ex.command
def evaluate(_config: dict, _run) -> dict:
    """Evaluate a saved model without training: python tdpsom.py evaluate with checkpoint=RUN [data_path=FILE].

    The model and its evaluation settings are the checkpoint's; data_path (the file moved), validation (the
    other set), eval_sample and device may be given. Prints the numbers and writes evaluation_<set>.json and
    evaluation_<set>.npz (per-step bmu (N, T) and labels) into the run folder."""
    device, state = saved_run(_config, "to evaluate")
    chosen = {k: _config[k] for k in ("data_path", "validation", "eval_sample") if k in given_keys(_run)}
    c = {**state["config"], **chosen}
    data = load_data(c, stored_preprocessing(c), training=False)
    model = saved_model(state, device)
    metrics, out = evaluate_model(model, torch.as_tensor(data["x_eval"], device=device), data["y_eval"],
                                  data["label_names"], c)
    split = "validation" if c["validation"] else "test"
    print(f"{state['path']}: phase {state['phase']}, global step {state['global_step']}, {len(data['x_eval'])} "
          f"{split} stays of {c['data_path']}")
    report(metrics)
    stem = os.path.join(os.path.dirname(os.path.abspath(state["path"])), f"evaluation_{split}")
    with open(stem + ".json", "w") as f:
        json.dump({"checkpoint": os.path.abspath(state["path"]), "global_step": state["global_step"], "set": split,
                   "eval_sample": c["eval_sample"], "stays": len(data["x_eval"]), "metrics": metrics}, f, indent=2)
    labels = {} if data["y_eval"] is None else {"label": data["y_eval"], "label_names": np.array(data["label_names"])}
    np.savez(stem + ".npz", bmu=out["dist"].argmin(-1), stay=data["eval_rows"], **labels)
    print(f"wrote {stem}.json and {stem}.npz")
    return headline(metrics)      # evaluation_<set>.json holds every number


@ex.command
def assign(_config: dict, _run) -> dict:
    """Place every step of every stay of a file on a trained map: python tdpsom.py assign with checkpoint=RUN
    data_path=FILE.

    The stays are transformed with the checkpoint's preprocessing and encoded as its evaluation does. Writes
    assignments.csv (a row per step: stay, step, BMU, grid row and column, distance to the BMU's prototype, q of
    the BMU, and the label columns where the file has labels) and assignments.npz (the same as (N, T) arrays,
    with q (N, T, H*W)) into the checkpoint's run folder."""
    if _config["data_path"] is None:
        raise SetupError("config data_path=None: give the file holding the stays to place (HDF5, .npz or .npy)")
    device, state = saved_run(_config, "of the trained map")
    c = state["config"]
    x, y, label_names = load_all_sequences(_config["data_path"], stored_preprocessing(c))
    out = place(saved_model(state, device), torch.as_tensor(x, device=device), c["batch_size"], c["eval_sample"])
    q = out.pop("q")
    N, T = out["bmu"].shape
    labels = {} if y is None else {"label": y, "label_names": np.array(label_names)}
    stem = os.path.join(os.path.dirname(os.path.abspath(state["path"])), "assignments")
    np.savez(stem + ".npz", **out, q=q, **labels, source=os.path.abspath(_config["data_path"]))
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stay", "step", *out, *(label_names if y is not None else [])])
        stay, step = np.divmod(np.arange(N * T), T)
        columns = [stay, step, *(v.reshape(-1).tolist() for v in out.values())]
        columns += [] if y is None else list(y.reshape(N * T, -1).T)
        writer.writerows(zip(*columns))
    print(f"placed {N} stays of {T} steps of {_config['data_path']} on the {c['som_dim'][0]}x{c['som_dim'][1]} map of "
          f"{state['path']}; wrote {stem}.csv and {stem}.npz")
    return {"stays": N, "path": stem}


@ex.main
def main(_config: dict, _run) -> dict:
    c = dict(_config)
    resume = None
    if c["resume"] is not None:   # the run continues with its checkpoint's config, in its own folder
        try:
            resume = load_checkpoint(c["resume"])
            given = given_keys(_run)
            c = resumed_config(resume["config"], c, given)
            c["logdir"] = resumed_folder(resume["path"], c, given)
        except FileNotFoundError as e:
            raise SetupError(f"config resume={c['resume']!r}: {e}") from None
        except ValueError as e:
            raise SetupError(str(e)) from None
        started = resume["plan_index"] + (resume["batch"] > 0)        # epochs begun: a prefix of both plans
        if c["num_epochs"] != resume["config"]["num_epochs"] and started > min(finetune_start(resume["config"]),
                                                                                finetune_start(c)):
            raise SetupError(f"config num_epochs={c['num_epochs']!r}: the run is past joint training; its joint "
                             f"epochs cannot change now (leave num_epochs out)")
        print(f"resuming {resume['path']}: phase {resume['phase']}, global step {resume['global_step']}")
    check_config(c)
    device = pick_device(c["device"])
    _run.info.update(threads=torch.get_num_threads(), device=str(device),
                     cpu_capability=torch.backends.cpu.get_cpu_capability())
    taken = os.path.join(c["logdir"], "checkpoint.pt")
    if resume is None and os.path.exists(taken):
        raise SetupError(f"config logdir={c['logdir']!r}: {taken} holds another run; continue it with "
                         f"resume={c['logdir']}, or choose another logdir (the default is a new folder)")
    saved = None
    if resume is None and c["use_saved_pretrain"]:   # pretrained weights keep the normalisation they learnt with
        saved = torch.load(c["pretrain_path"], map_location="cpu", weights_only=False)["config"]
        c["preprocessing"] = saved.get("preprocessing")
    data = load_data(c, stored_preprocessing(c))
    pre = data["preprocessing"]
    c["input_dim"], c["preprocessing"], c["label_names"] = pre.shape[0], pre.to_dict(), data["label_names"]
    if saved is not None:
        differ = [f"{k}: saved {saved.get(k)!r}, now {c[k]!r}" for k in ARCHITECTURE_KEYS if saved.get(k) != c[k]]
        if differ:
            raise SetupError(f"config pretrain_path={c['pretrain_path']!r}: was saved by another model ("
                             + "; ".join(differ) + "); use those values, or save_pretrain=True with this config")
    try:
        component_planes(c, pre.shape[0])                             # a wrong feature name fails now, not later
    except ValueError as e:
        raise SetupError(f"config {e}") from None
    x_train, x_eval = data["x_train"], data["x_eval"]
    print(f"T-DPSOM on {c['data_path']} ({pre.describe()}): {len(x_train)} training stays, {len(x_eval)} "
          f"{'validation' if c['validation'] else 'test'} stays of {x_train.shape[1]} steps x {x_train.shape[2]} "
          f"features, labels {data['label_names'] or 'none'}; device {device}, logdir {c['logdir']}")
    try:
        result = train(c, data, device, c["logdir"], _run, resume)
    except (RuntimeError, OSError) as e:
        if not is_transient(e):
            raise
        raise TransientFailure(f"{type(e).__name__}: {e}\nthe last checkpoint in {c['logdir']} is kept; continue "
                               f"with: python tdpsom.py with resume={c['logdir']}") from e
    write_result(c["logdir"], result)
    report(result)
    return headline(result)       # what Sacred prints and records; result.json holds every number


if __name__ == "__main__":
    run_commandline(ex)
