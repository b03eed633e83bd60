import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Set (as .ci/run does) to make missing MNIST files or golden TF outputs fail the tests instead of skipping them.
REQUIRED = os.environ.get("DPSOM_REQUIRE_FIXTURES") == "1"


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
