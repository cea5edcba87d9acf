"""Shared test settings: offline, deterministic, small thread count; the `slow` marker."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import modeling_diff  # noqa: E402,F401  (registers the Auto classes)

# two threads as on CI; OMP_NUM_THREADS=1 keeps a run usable on a machine shared with other jobs
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))

@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    # benchmark scripts run in-process set their own thread count: later tests that compare bit for bit with a
    # subprocess need the suite's count back
    torch.set_num_threads(threads)
