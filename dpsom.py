"""Train and evaluate DPSOM: a Sacred experiment with three phases sharing one optimiser and one step count.

    python dpsom.py with quick data_dir=path/to/idx_files
    python dpsom.py print_config
    tensorboard --logdir runs

Phases: 1 autoencoder pretraining (ELBO), 2 SOM initialisation (only the prototypes learn),
3 joint training (ELBO + KL(P||Q) + SOM loss, target distribution P recomputed every epoch).

This file is the experiment: config, named configs, data, and the commands (a training run, evaluate,
assign). The config's checks are config_checks.py's, the loop plan_runner.py's, DPSOM's recipe for it and the
evaluation training.py's, TensorBoard tb_logging.py's.
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
from sacred.randomness import set_global_seed
from sacred.utils import apply_backspaces_and_linefeeds

from checkpoint import load_checkpoint, resumed_config, resumed_folder
from config_checks import DATA_KEY_DEFAULTS, SetupError, check_config, pick_device
from dpsom_model import MNIST_SHAPE, check_conv_shape
from mnist_data import DataError, load_data
from user_data import Preprocessing, load_for_assign, load_user_data
from tb_logging import component_planes
from plan_runner import TransientFailure, is_transient, run_commandline, write_result
from training import LABEL_METRICS, amp_on, build_model, evaluate_model, place, train

ex = Experiment("dpsom")
ex.captured_out_filter = apply_backspaces_and_linefeeds


@ex.config
def config():
    data_set = "MNIST"               # "MNIST" or "fMNIST"
    data_dir = "data"                # holds mnist/ and fashion-mnist/ with the 4 IDX .gz files each
    data_path = None                 # your own data instead of data_set: a .npz (x, optional y, x_test, y_test), .npy or .csv
    label_column = None              # the .csv column holding labels (None: no labels)
    channels = "auto"                # images (N, a, b, c): channels "first", "last", or "auto" (the smaller of a and c)
    likelihood = "bernoulli"         # "bernoulli" (values in [0, 1]) or "gaussian" (real values, unit variance)
    normalize = "max"                # "max" (each sample by its maximum, MNIST's), "minmax", "standard" (per feature), "none"
    component_planes = None          # vector data: features (names or indices) pictured over the map (None: the first 8)
    validation = False               # evaluate and monitor on the validation split (True) or the test set
    max_train_samples = None         # use only the first N training images (None: all 51,000)
    max_eval_samples = None          # evaluate and monitor on the first N images of the evaluation set only
    convolution = False              # convolutional encoder/decoder instead of the dense one
    latent_dim = 100                 # dimension of the latent space
    som_dim = [8, 8]                 # SOM grid, rows x columns
    toroidal = True                  # SOM neighbourhood wraps around the edges (the reference's grid)
    alpha = 10.0                     # Student's t degrees of freedom of the soft assignment q (not a loss weight)
    beta = 0.25                      # weight of the SOM loss
    gamma = 20                       # weight of the clustering loss KL(P||Q)
    theta = 1                        # weight of the ELBO
    prior = 0.5                      # weight of the KL term inside the ELBO
    prior_var = 1                    # standard deviation of the N(0, prior_var^2 I) prior
    dropout = 0.0                    # dropout after dense encoder layers 1 and 2 (the reference's was inactive)
    batch_size = 300                 # the last partial batch of each epoch is dropped
    epochs_pretrain = 15             # phase 1 epochs
    learning_rate_pretrain = 0.001   # phase 1 learning rate
    som_learning_rates = [0.9, 0.3, 0.1, 0.01]  # phase 2: one block of som_epochs per rate
    som_epochs = 5                   # phase 2 epochs per block
    num_epochs = 300                 # phase 3 epochs
    learning_rate = 0.001            # phase 3 learning rate
    decay_factor = 0.99              # lr *= decay_factor every decay_steps global steps (staircase)
    decay_steps = 1000               # the reference's effective value: its configured 5000 was never passed on
    val_epochs = False               # evaluate every 10 joint epochs as well as at the end
    seed = 2020                      # the reference's seed; Sacred seeds Python, NumPy and torch from it
    more_runs = False                # repeat the whole training n_runs times with seeds seed, seed+1, ...
    n_runs = 10                      # runs when more_runs is set; mean and std are reported
    # The training numerics are the reference's (docs/results.md, How the default was found: on dense MNIST they reach the
    # published purity, the diagonal posterior and the standard layers do not); `standard_layers` gives the modern
    # layers. Conv keeps the diagonal posterior: unmeasured here, and a full covariance is a 12544 x 5150 head.
    posterior = "diag" if convolution else "tril"   # "tril" (the reference's full covariance) or "diag" (mu, logvar)
    batchnorm = "frozen"             # "frozen" (the reference's: BN after the activation, stats 0/1) or "standard"
    leaky_logits = True              # LeakyReLU on the dense decoder's logits, as the reference had
    adam = "tf1"                     # "tf1" (TF1's bias correction over the global step) or "torch"
    target_sample = True             # DEC target P from one posterior sample (the reference's) instead of the mean
    eval_sample = False              # evaluate on one posterior sample (the reference's) instead of the mean
    device = "auto"                  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    compile = False                  # torch.compile each phase's loss (compiling takes a while at each phase's start)
    amp = False                      # bf16 products (encoder, decoder, head) on bf16 hardware; SOM, losses float32
    log_every = 50                   # steps between logged scalars (the only host syncs in the loop)
    checkpoint_every = 60            # seconds: an epoch ends with a checkpoint once this long has passed since the last
                                     # (0: every epoch); every phase ends with one, and so does a stop signal
    arch = "conv" if convolution else "dense"
    data_name = os.path.splitext(os.path.basename(data_path))[0] if isinstance(data_path, str) else data_set  # for names
    logdir = os.path.join("runs", f"{datetime.now():%Y%m%d-%H%M%S}_{data_name}_{arch}_{uuid.uuid4().hex[:6]}")  # run folder
    save_pretrain = False            # save model and optimiser after phase 2 to pretrain_path
    use_saved_pretrain = False       # skip phases 1-2 by loading pretrain_path
    resume = None                    # checkpoint file or run folder to continue, with the checkpoint's config
    deterministic = False            # deterministic algorithms only (for GPUs; CPU runs already repeat bit for bit)
    som_grid = "x".join(map(str, som_dim)) if isinstance(som_dim, (list, tuple)) else som_dim  # for file names
    pretrain_path = os.path.join("runs", "pretrained", f"{data_name}_{arch}_{latent_dim}_{som_grid}.pt")
    checkpoint = None                # the evaluate command: checkpoint file or run folder to evaluate


@ex.named_config
def fmnist():
    data_set = "fMNIST"
    beta = 0.4      # the reference README's value for Fashion-MNIST


@ex.named_config
def conv():
    convolution = True


@ex.named_config
def quick():
    # About 5 minutes on a 2-core CPU: all training images, short phases, validation split, a 32-dim latent space
    # (seed 2020: purity 0.906, NMI 0.639; docs/results.md, quick). A joint lr of 0.002, which helped the standard
    # layers, makes the reference's numerics diverge here within 20 steps. The diagonal posterior: the full
    # covariance overtakes it only after about 90 joint epochs (here 7 min 20 s, purity 0.884, NMI 0.615)
    validation = True
    posterior = "diag"
    latent_dim = 32
    epochs_pretrain = 5
    som_epochs = 1
    num_epochs = 20


@ex.named_config
def tf_original():
    # the reference's numerics, to compare a run with the TensorFlow code
    posterior = "tril"
    batchnorm = "frozen"
    dropout = 0.0
    leaky_logits = True
    adam = "tf1"
    target_sample = True
    eval_sample = True


@ex.named_config
def standard_layers():
    # the port's first default: standard BatchNorm, dropout, plain logits, PyTorch's Adam, P from the posterior
    # mean, the diagonal posterior. Measured 0.03 purity below the reference's numerics on MNIST with the same
    # posterior, 0.04 below the default (docs/results.md, How the default was found)
    posterior = "diag"
    batchnorm = "standard"
    dropout = 0.4
    leaky_logits = False
    adam = "torch"
    target_sample = False
    eval_sample = False


def given_keys(run) -> set[str]:
    """The config keys set on the command line (or by config_updates), whatever their value."""
    updates = run.meta_info.get("options", {}).get("UPDATE") or []
    return set(run.config_modifications.modified) | {u.split("=", 1)[0] for u in updates if "=" in u}


def load_data_or_explain(c: dict, **sizes) -> dict:
    """x_train, y_train, x_eval, y_eval (labels None without them) and the Preprocessing: MNIST's, or the data_path
    file's, with the statistics c["preprocessing"] holds (a checkpoint's) or those of this training split."""
    try:
        if c["data_path"] is None:
            data = load_data(c["data_set"], c["data_dir"], c["validation"], **sizes)
            data["preprocessing"] = Preprocessing(MNIST_SHAPE, "max")
        else:
            data = load_user_data(c["data_path"], c["validation"], c["likelihood"], c["normalize"], c["channels"],
                                  c["label_column"], stored_preprocessing(c), **sizes)
    except DataError as e:
        raise SetupError(f"data: {e}") from None
    if c["convolution"]:
        try:
            check_conv_shape(data["preprocessing"].shape)
        except ValueError as e:
            raise SetupError(f"config {e}") from None
    return data


def stored_preprocessing(c: dict) -> Preprocessing | None:
    """The preprocessing a checkpoint's (or pretrain file's) config holds, or None before a run has one."""
    return Preprocessing.from_dict(c["preprocessing"]) if c.get("preprocessing") else None


def data_description(c: dict, pre: Preprocessing) -> str:
    return c["data_set"] if c["data_path"] is None else f"{c['data_path']} ({pre.describe()})"


def report_metrics(metrics: dict, labelled: bool) -> None:
    for name, value in metrics.items():
        print(f"  {name:<20}{value:>10.4f}" if isinstance(value, float) else f"  {name:<20}{value:>10}")
    if not labelled:
        print(f"  no labels: {LABEL_METRICS} skipped")


def saved_run(_config: dict, what: str) -> tuple[torch.device, dict]:
    """The device and the checkpoint that `checkpoint=` names, for the evaluate and assign commands."""
    if _config["checkpoint"] is None:
        raise SetupError(f"config checkpoint=None: give the checkpoint file or run folder {what}")
    device = pick_device(_config["device"])
    try:
        return device, load_checkpoint(_config["checkpoint"])
    except FileNotFoundError as e:
        raise SetupError(f"config checkpoint={_config['checkpoint']!r}: {e}") from None


@ex.command
def evaluate(_config: dict, _run) -> dict:
    """Evaluate a saved model without training: python dpsom.py evaluate with checkpoint=PATH [data_dir=...].

    The model and the evaluation settings (data set, validation or test set, max_eval_samples, eval_sample,
    batch size) are the checkpoint's own, so the numbers are its run's; device is this command's, and data_dir
    too where given (else the run's). `validation` and `eval_sample`, where given, choose another set (a run
    monitored on the validation split, evaluated on the test set) or the posterior mean instead of a sample.
    Prints every number and writes evaluation_<set>.json (the numbers) and evaluation_<set>.npz (per-sample
    bmu and label) into the checkpoint's run folder; "_mean" or "_sample" is added to the name where
    eval_sample differs from the run's.
    """
    device, state = saved_run(_config, "to evaluate")
    chosen = {k: _config[k] for k in ("validation", "eval_sample") if k in given_keys(_run)}
    ignored = sorted(k for k in given_keys(_run) - {"checkpoint", "data_dir", "data_path", "device", *chosen}
                     if state["config"].get(k, _config[k]) != _config[k])
    if ignored:
        print("evaluate uses the checkpoint's own config; ignored: "
              + ", ".join(f"{k}={_config[k]!r} (checkpoint: {state['config'][k]!r})" for k in ignored))
    moved = {k: _config[k] for k in ("data_dir", "data_path") if k in given_keys(_run)}   # the files may have moved
    c = {**_config, **DATA_KEY_DEFAULTS, **state["config"], **moved, **chosen}   # keys the checkpoint predates
    model = build_model({**c, "amp": amp_on(c, device)}).to(device)               # keep their defaults
    model.load_state_dict(state["model"])
    data = load_data_or_explain(c, max_eval_samples=c["max_eval_samples"])
    x = torch.as_tensor(data["x_eval"], device=device)
    metrics, bmu = evaluate_model(model, x, data["y_eval"], c["batch_size"], c["eval_sample"])
    split = "validation" if c["validation"] else "test"
    code = "a posterior sample" if c["eval_sample"] else "the posterior mean"
    print(f"{state['path']}: phase {state['phase']}, global step {state['global_step']}, "
          f"{len(x)} {data_description(c, data['preprocessing'])} {split} samples, encoded as {code}")
    report_metrics(metrics, data["y_eval"] is not None)
    own = c["eval_sample"] == state["config"].get("eval_sample", c["eval_sample"])
    name = f"evaluation_{split}" + ("" if own else "_sample" if c["eval_sample"] else "_mean")
    stem = os.path.join(os.path.dirname(os.path.abspath(state["path"])), name)
    with open(stem + ".json", "w") as f:
        json.dump({"checkpoint": os.path.abspath(state["path"]), "global_step": state["global_step"], "set": split,
                   "eval_sample": c["eval_sample"], "samples": len(x), "metrics": metrics}, f, indent=2)
    np.savez(stem + ".npz", bmu=bmu, **({} if data["y_eval"] is None else {"label": data["y_eval"]}))
    print(f"wrote {stem}.json and {stem}.npz")
    return metrics


@ex.command
def assign(_config: dict, _run) -> dict:
    """Place samples on a trained map: python dpsom.py assign with checkpoint=RUN data_path=FILE.

    Every sample of the file's x is transformed with the checkpoint's stored preprocessing and encoded as the
    run's evaluation does (posterior mean, or its seeded sample with eval_sample). Writes assignments.csv (per
    sample: BMU index, grid row and column, Euclidean distance to the BMU, q of the BMU, label where the file has
    labels) and assignments.npz (the same with the whole soft assignment q, (N, nodes)) into the checkpoint's run
    folder.
    """
    if _config["data_path"] is None:
        raise SetupError("config data_path=None: give the file holding the samples to place (.npz, .npy or .csv)")
    device, state = saved_run(_config, "of the trained map")
    c = {**_config, **DATA_KEY_DEFAULTS, **state["config"]}
    pre = stored_preprocessing(c) or Preprocessing(MNIST_SHAPE, "max")   # checkpoints older than own data: MNIST
    given = given_keys(_run)
    channels = _config["channels"] if "channels" in given else c["channels"]
    # the run's label column, where the new file has it too; a label_column given here must exist
    label_column = _config["label_column"] if "label_column" in given else c["label_column"]
    try:
        x, y = load_for_assign(_config["data_path"], pre, c["likelihood"], channels, label_column,
                               label_optional="label_column" not in given)
    except DataError as e:
        raise SetupError(f"data: {e}") from None
    model = build_model({**c, "amp": amp_on(c, device)}).to(device)
    model.load_state_dict(state["model"])
    out = place(model, torch.as_tensor(x, device=device), c["batch_size"], c["eval_sample"])
    q = out.pop("q")                                                           # (N, H*W)
    labels = {} if y is None else {"label": y}
    stem = os.path.join(os.path.dirname(os.path.abspath(state["path"])), "assignments")
    np.savez(stem + ".npz", **out, q=q, **labels, source=os.path.abspath(_config["data_path"]))
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", *out, *labels])
        columns = [out["bmu"], out["row"], out["column"], out["distance"].tolist(), out["q_bmu"].tolist(),
                   *labels.values()]
        writer.writerows(zip(range(len(x)), *columns))
    print(f"placed {len(x)} samples of {_config['data_path']} on the {model.som_dim[0]}x{model.som_dim[1]} map of "
          f"{state['path']}; {int((np.bincount(out['bmu'], minlength=q.shape[1]) > 0).sum())} nodes hit; wrote "
          f"{stem}.csv and {stem}.npz")
    return {"samples": len(x), "path": stem}


@ex.main
def main(_config: dict, _run) -> dict:
    c = dict(_config)
    resume = None
    if c["resume"] is not None:   # the run continues with its checkpoint's config, in its own folder
        if c["more_runs"] is True and "more_runs" in given_keys(_run):
            raise SetupError("config resume: cannot be combined with more_runs=True; resume one run's folder")
        try:
            resume = load_checkpoint(c["resume"])
        except FileNotFoundError as e:
            raise SetupError(f"config resume={c['resume']!r}: {e}") from None
        try:
            given = given_keys(_run)
            c = resumed_config(resume["config"], c, given)
            c["logdir"] = resumed_folder(resume["path"], c, given)
        except ValueError as e:
            raise SetupError(str(e)) from None
        print(f"resuming {resume['path']}: phase {resume['phase']}, global step {resume['global_step']}")
    check_config(c)
    device = pick_device(c["device"])
    _run.info.update(threads=torch.get_num_threads(), device=str(device),   # in Sacred's record: what repeats a run
                     device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                     cpu_capability=torch.backends.cpu.get_cpu_capability())   # the CPU kernels torch chose
    if c["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it before its first call
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    runs = [("", c["seed"])] if not c["more_runs"] else [(f"run{i}", c["seed"] + i) for i in range(c["n_runs"])]
    for sub, _ in runs:
        taken = os.path.join(c["logdir"], sub, "checkpoint.pt")
        if resume is None and os.path.exists(taken):
            raise SetupError(f"config logdir={c['logdir']!r}: {taken} holds another run; continue it with "
                             f"resume={os.path.dirname(taken)}, or choose another logdir (the default is a new folder)")
    if resume is None and c["use_saved_pretrain"]:   # pretrained weights keep the normalisation they learnt with
        saved = torch.load(c["pretrain_path"], map_location="cpu", weights_only=False)["config"]
        c["preprocessing"] = saved.get("preprocessing")
    data = load_data_or_explain(c, max_train_samples=c["max_train_samples"], max_eval_samples=c["max_eval_samples"])
    check_config(c, n_train=len(data["x_train"]))
    pre = data["preprocessing"]
    c["input_shape"], c["preprocessing"] = pre.shape, pre.to_dict()   # kept in the checkpoint with the config
    if not pre.is_image:
        try:
            component_planes(c, pre.shape[0])                         # a wrong feature name fails now, not later
        except ValueError as e:
            raise SetupError(f"config {e}") from None
    print(f"DPSOM on {data_description(c, pre)} ({c['arch']}), {len(data['x_train'])} training samples, "
          f"{len(data['x_eval'])} {'validation' if c['validation'] else 'test'} samples, device {device}, "
          f"logdir {c['logdir']}")
    if data["y_eval"] is None:
        print(f"no labels for the evaluation set: the run reports reconstruction, quantization and topographic "
              f"error and map usage; {LABEL_METRICS} are skipped")
    results = []
    for i, (sub, seed) in enumerate(runs):
        logdir = os.path.join(c["logdir"], sub) if sub else c["logdir"]
        hint = None
        if c["more_runs"]:   # each run is exactly the single run with its seed
            set_global_seed(seed)
            later = ", ".join(str(s) for _, s in runs[i + 1:])
            hint = (f"continue this run ({i + 1} of {len(runs)}, seed {seed}) with: python dpsom.py with resume={logdir}"
                    + (f"; the runs with seeds {later} were not started" if later else ""))
        try:
            results.append(train({**c, "seed": seed}, data, device, logdir, _run, resume, hint))
        except (RuntimeError, OSError) as e:
            if not is_transient(e):
                raise
            raise TransientFailure(f"{type(e).__name__}: {e}\nthe last checkpoint in {logdir} is kept; "
                                   f"{hint or f'continue with: python dpsom.py with resume={logdir}'}") from e
    result = results[0]
    if c["more_runs"]:
        result = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
        result.update({f"{k}_std": float(np.std([r[k] for r in results])) for k in results[0]})
        result["runs"] = results
    write_result(c["logdir"], result)
    print("  ".join(f"{k}: {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    if data["y_eval"] is None:
        print(f"no labels: {LABEL_METRICS} skipped")
    return result


if __name__ == "__main__":
    run_commandline(ex)
