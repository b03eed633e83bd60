import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The canonical MNIST / Fashion-MNIST IDX files: DPSOM_DATA_DIR, else the shared folder beside the repo."""
    path = os.environ.get("DPSOM_DATA_DIR", os.path.join(ROOT, "..", "shared", "data"))
    if not os.path.exists(os.path.join(path, "mnist", "train-images-idx3-ubyte.gz")):
        pytest.fail(f"MNIST IDX files not found under {path}; set DPSOM_DATA_DIR")
    return path
