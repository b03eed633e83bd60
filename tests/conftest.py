import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Set (as .ci/run does) to make missing MNIST files or golden TF outputs fail the tests instead of skipping them.
REQUIRED = os.environ.get("DPSOM_REQUIRE_FIXTURES") == "1"


def one_thread() -> dict:
    """The environment of a process that runs beside others: one thread each, so that two share two cores
    instead of four threads waiting on each other (and runs compared bit for bit need the same thread count)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Started:
    """A command started in the background, its output going to temporary files (a pipe could fill while the
    test waits on another process). wait() returns what subprocess.run would have."""

    def __init__(self, cmd: list[str], timeout: float = 300, **popen):
        self.cmd, self.timeout = cmd, timeout
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, text=True, **popen)

    def wait(self) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=self.timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.out.seek(0), self.err.seek(0)
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, self.out.read(), self.err.read())


def find_data_dir(environ=os.environ, root: str = ROOT) -> tuple[str | None, list[str]]:
    """The first folder holding mnist/train-images-idx3-ubyte(.gz): DPSOM_DATA_DIR, the quick start's data/,
    the shared folder beside the repository. Returns it (or None) and the places looked at."""
    places = [environ["DPSOM_DATA_DIR"]] if environ.get("DPSOM_DATA_DIR") else []
    places += [os.path.join(root, "data"), os.path.join(root, "..", "shared", "data")]
    for place in places:
        if any(os.path.exists(os.path.join(place, "mnist", "train-images-idx3-ubyte" + ext)) for ext in (".gz", "")):
            return place, places
    return None, places


def missing(what: str) -> None:
    """Skip, or fail where DPSOM_REQUIRE_FIXTURES=1 demands the files."""
    (pytest.fail if REQUIRED else pytest.skip)(what)


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The canonical MNIST / Fashion-MNIST IDX files (see find_data_dir)."""
    path, places = find_data_dir()
    if path is None:
        missing(f"MNIST IDX files not found in {', '.join(places)}: run `python dpsom.py with quick` once (it "
                f"downloads them into data/), or set DPSOM_DATA_DIR to a folder holding mnist/")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir):
    """One seconds-long run through the Sacred entry point, shared by the tests of its TensorBoard folder
    (test_tb_logging) and of the evaluate command (test_eval): its Sacred Run and its folder."""
    import dpsom
    from test_end_to_end import TINY
    folder = tmp_path_factory.mktemp("eval")
    config = {**TINY, "max_train_samples": 300, "som_learning_rates": [0.9], "num_epochs": 1, "log_every": 3,
              "max_eval_samples": 300, "eval_sample": True, "data_dir": data_dir, "logdir": str(folder / "run"),
              "pretrain_path": str(folder / "pre.pt")}
    return dpsom.ex.run(config_updates=config, options={"--loglevel": "ERROR"}), folder / "run"


def cli_words() -> list[str]:
    """The words of cli_run's run, as a sweep gives them: the cell's, TINY's and the seed last."""
    from test_end_to_end import TINY
    return (["validation=True"] + [f"{k}={v}" for k, v in TINY.items() if k not in ("validation", "seed")]
            + [f"seed={TINY['seed']}"])


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory, data_dir):
    """One `python dpsom.py -F ... with ...` run of TINY in a fresh process, laid out as a sweep's run (OUT/sacred,
    OUT/runs/mnist_dense_seed=1, one thread): shared by the tests of the command line (test_end_to_end), its
    progress lines (test_training) and a sweep run's table row (test_results_table). Its CompletedProcess, OUT
    and the run's folder."""
    out = tmp_path_factory.mktemp("cli") / "out"
    logdir = out / "runs" / "mnist_dense_seed=1"
    done = subprocess.run([sys.executable, "dpsom.py", "-F", str(out / "sacred"), "with", *cli_words(),
                           f"data_dir={data_dir}", f"logdir={logdir}"], cwd=ROOT, capture_output=True, text=True,
                          env=one_thread(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out, logdir
