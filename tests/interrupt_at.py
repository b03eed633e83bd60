"""Run the Sacred entry point, sending this process a real SIGTERM at a chosen moment.

    python tests/interrupt_at.py MOMENT <dpsom.py command-line arguments>

MOMENT is `step:N`, right after global step N (counted over the whole run, resumes included), or
`PLACE:K`, inside the K-th call in this process of one of PLACES: the target-distribution pass, the
evaluation, the pictures, or the write of a checkpoint (the signal arrives before its bytes are written).
`twice:MOMENT` sends two signals at that moment, as an impatient second Ctrl-C would; `full:PLACE:K` raises
a full disk's OSError there instead of a signal.
"""
import errno
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dpsom  # noqa: E402
import plan_runner  # noqa: E402
import training  # noqa: E402

PLACES = {"target_distribution": training, "evaluate_model": training, "log_pictures": training, "save": torch}
moment = sys.argv.pop(1)
signals = 2 if moment.startswith("twice:") else 1
disk_full = moment.startswith("full:")
where, count = moment.removeprefix("twice:").removeprefix("full:").split(":")
count, calls = int(count), {"n": 0}


def sigterm():
    if disk_full:
        raise OSError(errno.ENOSPC, "No space left on device")
    for _ in range(signals):
        os.kill(os.getpid(), signal.SIGTERM)


if where == "step":
    real_train, real_step = dpsom.train, plan_runner.train_step

    def counting_train(c, data, device, logdir, run, resume=None, *rest):
        calls["n"] = resume["global_step"] if resume else 0
        return real_train(c, data, device, logdir, run, resume, *rest)

    def killing_step(*args):
        parts = real_step(*args)
        calls["n"] += 1
        if calls["n"] == count:
            sigterm()
        return parts

    dpsom.train, plan_runner.train_step = counting_train, killing_step   # where main and run_plan look them up
else:
    owner = PLACES[where]
    real = getattr(owner, where)

    def killing_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            sigterm()
        return real(*args, **kwargs)

    setattr(owner, where, killing_call)   # torch.save: checkpoint.save_checkpoint's only call of it

sys.argv[0] = "dpsom.py"
plan_runner.run_commandline(dpsom.ex)   # the entry point's own exit statuses (130, TRANSIENT)
