"""Run the Sacred entry point, sending this process a real SIGTERM right after global step N.

    python tests/interrupt_at.py N <dpsom.py command-line arguments>
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dpsom  # noqa: E402

stop_at, step = int(sys.argv.pop(1)), {"n": 0}
real_train, real_step = dpsom.train, dpsom.train_step


def counting_train(c, data, device, logdir, run, resume=None):
    step["n"] = resume["global_step"] if resume else 0
    return real_train(c, data, device, logdir, run, resume)


def killing_step(*args):
    parts = real_step(*args)
    step["n"] += 1
    if step["n"] == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return parts


dpsom.train, dpsom.train_step = counting_train, killing_step
sys.argv[0] = "dpsom.py"
try:
    dpsom.ex.run_commandline()
except dpsom.Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(130)
