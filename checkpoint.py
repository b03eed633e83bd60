"""Never lose a run: atomic checkpoints with a fallback, the resume check, and stop-on-signal."""
import copy
import os
import signal
import sys
import tempfile
import threading

import torch


def on_host(obj):
    """`obj` with every tensor in it (in dicts, lists and tuples) copied to the CPU; CPU tensors are kept as they
    are. torch.save tags each tensor with its device: a GPU's tensors saved as they are open only where that GPU
    exists (a plain torch.load on a laptop fails), so a checkpoint holds host copies."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)          # its type and attributes: a state dict's _metadata (layer versions) stays
        out.update((k, on_host(v)) for k, v in obj.items())
        return out
    if type(obj) in (list, tuple):
        return type(obj)(on_host(v) for v in obj)
    return obj


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically (temp file, fsync, rename) and keep the previous checkpoint as `<path>.prev`. Tensors are
    saved from the CPU, whatever device holds them (on_host)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = on_host(state)
    with tempfile.NamedTemporaryFile(dir=folder, delete=False, suffix=".tmp") as f:
        try:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            os.unlink(f.name)
            raise
    if os.path.exists(path):
        os.replace(path, path + ".prev")
    os.replace(f.name, path)


def checkpoint_state(model, opt, c, global_step, plan_index, batch, phase, epoch, targets=None) -> dict:
    """A plain dict; training continues at batch `batch` of epoch `plan_index` of the recipe's
    plan (training.epoch_plan(config) for DPSOM).

    `targets` (P of the train split and of the monitoring batch) is stored only mid-epoch, where it
    cannot be recomputed from the weights.
    """
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "global_step": global_step,
            "plan_index": plan_index, "batch": batch, "phase": phase, "epoch": epoch, "config": c,
            "targets": targets, "rng": rng_state(next(model.parameters()).device)}


def accelerator(device: torch.device):
    """The torch module of a device type that is not the CPU (torch.cuda for CUDA), or None for the CPU."""
    return None if device.type == "cpu" else torch.get_device_module(device.type)


def rng_state(device: torch.device) -> dict:
    """The random streams training draws on: the CPU's, and the training device's own (CUDA's) where it has one."""
    acc = accelerator(device)
    return {"torch": torch.get_rng_state(), "device_type": device.type,
            "cuda": None if acc is None else acc.get_rng_state(device.index or 0)}


def restore_rng(rng: dict, device: torch.device, saved_device: str = "auto") -> bool:
    """Continue the random streams a checkpoint saved, onto `device`. False where the checkpoint was written on
    another device type: the CPU's state is restored, but the device's own stream was not saved, so it goes on
    from this process's seed and the run cannot repeat an uninterrupted one.

    Every state is a CPU byte tensor, wherever the checkpoint was loaded. Checkpoints before rng_state kept
    every visible GPU's state in a list; the run trained on the one its config named (index 0 by default).
    """
    saved = rng.get("cuda")
    if isinstance(saved, (list, tuple)):
        index = torch.device(saved_device).index if saved_device.startswith("cuda") else None
        saved = saved[index or 0] if saved else None
    written = rng.get("device_type", "cpu" if saved is None else "cuda")
    torch.set_rng_state(rng["torch"].cpu())
    if written != device.type:
        return False
    acc = accelerator(device)
    if acc is not None and saved is not None:
        acc.set_rng_state(saved.cpu(), device.index or 0)
    return True


def load_checkpoint(path: str) -> dict:
    """Load `path` (a checkpoint file or the run folder holding checkpoint.pt) onto the CPU; on failure fall back
    to the previous checkpoint kept beside it, saying which file failed and why.

    Always onto the CPU, whatever device wrote it or will use it: the RNG states must stay CPU byte tensors,
    and load_state_dict moves weights and optimiser state onto the parameters' device (PyTorch's Adam keeps
    its step count on the CPU, where reading it costs no device sync)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    failures = []
    for candidate in (path, path + ".prev"):
        if not os.path.exists(candidate):
            failures.append(f"{candidate}: does not exist")
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or not {"model", "optimizer", "config", "plan_index"} <= set(state):
                raise ValueError("not a DPSOM checkpoint")
        except Exception as e:   # truncated zip, unpickling error, wrong content
            failures.append(f"{candidate}: {type(e).__name__}: {e}")
            print(f"cannot load checkpoint {candidate} ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if failures:
            print(f"falling back to the previous checkpoint {candidate}", file=sys.stderr)
        state["path"] = candidate
        return state
    raise FileNotFoundError("no usable checkpoint: " + "; ".join(failures))


# Keys a resumed run may change; every other key keeps the checkpoint's value.
RESUMABLE_CHANGES = {"resume", "logdir", "device", "compile", "data_dir", "data_path", "log_every", "num_epochs", "val_epochs",
                     "seed", "save_pretrain", "pretrain_path", "deterministic", "checkpoint", "checkpoint_every"}


def resumed_config(saved: dict, c: dict, given: set[str]) -> dict:
    """The config a resumed run continues with: the checkpoint's own, with the keys given on the command line
    that may change (RESUMABLE_CHANGES). A given key that may not change and differs is refused, by name."""
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {c[k]!r}" for k in sorted(given & c.keys())
            if k not in RESUMABLE_CHANGES and k in saved and saved[k] != c[k]]
    if diff:
        raise ValueError(f"config resume={c['resume']!r}: the checkpoint was written with another config ("
                         + "; ".join(diff) + "). Leave these keys out: the run continues with the checkpoint's "
                         f"values. Keys that may change: {', '.join(sorted(RESUMABLE_CHANGES - {'resume', 'checkpoint'}))}.")
    resumed = {**c, **saved}                                    # keys the checkpoint predates keep today's defaults
    if "target_sample" not in saved:                            # but P's codes: eval_sample chose them before
        resumed["target_sample"] = saved.get("eval_sample", False)
    resumed.update({k: c[k] for k in given & RESUMABLE_CHANGES})
    resumed.update(resume=c["resume"], more_runs=False)         # a run of a more_runs set continues on its own
    return resumed


def resumed_folder(checkpoint_path: str, c: dict, given: set[str]) -> str:
    """The folder a resumed run continues in: its checkpoint's. A logdir given beside resume (a sweep gives both)
    must name that folder; another one is refused rather than ignored."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    if "logdir" in given and os.path.realpath(c["logdir"]) != os.path.realpath(folder):
        raise ValueError(f"config logdir={c['logdir']!r}: a resumed run continues in its checkpoint's folder "
                         f"{folder}; leave logdir out (to continue elsewhere, copy that folder and resume the copy)")
    return folder


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step; a second signal aborts at once.

    hint: what to tell a user whose second signal aborted the run (where its last checkpoint is).
    """

    def __init__(self, hint: str = ""):
        self.hint = hint

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise Aborted(f"aborted by a second {signal.Signals(signum).name} before this step's checkpoint was "
                          f"written; {self.hint}")
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal after writing a checkpoint; Sacred records the run as INTERRUPTED."""
    STATUS = "INTERRUPTED"


class Aborted(Interrupted):
    """Stopped by a second signal without writing a checkpoint: the last one written stays."""
