import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests run against the source tree whether or not the package is installed.
sys.path.insert(0, os.path.join(ROOT, "python"))
# Without a GPU the Triton kernels run on the interpreter; it must be chosen
# before the first @triton.jit decorator runs, i.e. before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _float64_and_seed():
    torch.manual_seed(1234)
    yield
