"""Shared fixtures: one tiny lifecycle run per test session.

CI runs the README's first command (`llm-lifecycle run --preset tiny`) and points the tests at what it made with
`LLM_LIFECYCLE_TEST_RUN_DIR`, so the lifecycle runs once. Without it, the first test that needs the run makes one in a
temporary directory; under pytest-xdist one worker makes it and the others wait for it (a file lock)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("MPLBACKEND", None)  # a non-inline backend set outside would keep figures out of executed notebooks

from pathlib import Path

import pytest
import torch

from llm_lifecycle.cli import present_stages, run_lifecycle
from llm_lifecycle.core import load_json, stage_config, stage_done, usable_cpus

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:  # n workers share the cores, and so do the kernels they start
    os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // _workers))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def check_tiny_run(run_dir: Path) -> Path:
    "`run_dir` if it holds a complete run of the tiny preset with its defaults; else a clear error."
    info = load_json(run_dir/"run.json") if (run_dir/"run.json").exists() else {}
    if info.get("preset") != "tiny":
        raise pytest.UsageError(f"LLM_LIFECYCLE_TEST_RUN_DIR={run_dir} is not a run of the tiny preset "
                                f"(make one with: llm-lifecycle run --preset tiny --run-dir {run_dir})")
    missing = [s.notebook for s in present_stages() if not stage_done(run_dir, s)]
    if missing: raise pytest.UsageError(f"the run in {run_dir} has not done {', '.join(missing)}")
    changed = [f"{name}: {k}" for name, st in info.get("stages", {}).items() for k, v in st.get("params", {}).items()
               if stage_config(name, "tiny").get(k, v) != v]
    if changed: raise pytest.UsageError(f"the run in {run_dir} changed knobs of the tiny preset ({', '.join(changed)}); "
                                        "the tests' thresholds are for the preset's own run")
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    "Every present stage, executed in order on the tiny preset with its defaults; returns the run directory."
    given = os.environ.get("LLM_LIFECYCLE_TEST_RUN_DIR")
    if given: return check_tiny_run(Path(given).resolve())
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process
        run_dir = tmp_path_factory.mktemp("tiny-run")
        run_lifecycle("tiny", run_dir, progress=False)
        return run_dir
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this session
    run_dir = shared/"tiny-run"
    with FileLock(str(shared/"tiny-run.lock")):
        if not (run_dir/"done").exists():
            run_lifecycle("tiny", run_dir, progress=False)
            (run_dir/"done").write_text("")
    return run_dir


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (minutes each; optional extras)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available(): item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slow" in item.keywords and not config.getoption("--slow"): item.add_marker(pytest.mark.skip(reason="slow: run with --slow"))
