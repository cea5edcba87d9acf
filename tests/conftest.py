"""Shared test settings: offline, deterministic, small thread count, a modules cache of the run's own; the `slow`
marker. The suite runs serially (`python -m pytest tests`) or in pytest-xdist workers (`-n 2`, as CI does)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Torch threads: OMP_NUM_THREADS when set (OMP_NUM_THREADS=1 keeps a run usable on a machine shared with other jobs),
# else two as on CI, shared out between xdist workers (one each for `-n 2` on 2 cores: a thread on a busy core waits
# at every operator). Exported, so that subprocesses run on the same count: tests compare their outputs bit for bit.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, (os.cpu_count() or 1) // _workers))))

# transformers copies a trust_remote_code model's files into HF_MODULES_CACHE, named after the folder; a folder of the
# same name in two workers, or in a user's own cache, must not be overwritten while another process imports it.
# Read when transformers is imported, so set before.
_modules = tempfile.mkdtemp(prefix="modeling-diff-test-modules-")
os.environ["HF_MODULES_CACHE"] = _modules
atexit.register(shutil.rmtree, _modules, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

import modeling_diff  # noqa: E402,F401  (registers the Auto classes)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    # benchmark scripts run in-process set their own thread count: later tests that compare bit for bit with a
    # subprocess need the suite's count back
    torch.set_num_threads(threads)
