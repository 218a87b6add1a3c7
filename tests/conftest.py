"Shared fixtures: one tiny lifecycle run per test session, in a temporary run directory."
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("MPLBACKEND", None)  # a non-inline backend set outside would keep figures out of executed notebooks

import pytest
import torch

from llm_lifecycle.cli import run_lifecycle


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    "Every present stage notebook, executed in order with papermill on the tiny preset; returns the run directory."
    run_dir = tmp_path_factory.mktemp("tiny-run")
    run_lifecycle("tiny", run_dir, progress=False)
    return run_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords: item.add_marker(skip)
