"""Shared test settings: offline, deterministic, small thread count, tiny configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import modeling_diff  # noqa: E402,F401  (registers the Auto classes)
from modeling_diff import DiffTransformerConfig  # noqa: E402

# two threads as on CI; OMP_NUM_THREADS=1 keeps a run usable on a machine shared with other jobs
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


def tiny_config(diff_version=1, heads=8, kv_heads=4, **overrides):
    """A small DiffTransformer config; heads/kv_heads follow Llama's counting."""
    values = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        diff_version=diff_version,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return DiffTransformerConfig(**values)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    # benchmark scripts run in-process set their own thread count: later tests that compare bit for bit with a
    # subprocess need the suite's count back
    torch.set_num_threads(threads)
