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
