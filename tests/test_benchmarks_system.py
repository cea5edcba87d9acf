"""The system benchmarks (`benchmarks/system/`) in their `--quick` modes, as their docs run them (`python -m`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_module(module: str, *args, timeout=600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` from the repository root."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_conversion_memory_benchmark_runs(tmp_path):
    """The benchmark behind the converter's memory figure: a sharded checkpoint, import-only and convert peaks."""
    result = run_module("benchmarks.system.convert_memory", "--quick", "--out", tmp_path / "mem.md")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "mem.json").read_text())["result"]
    assert data["shards"] > 2 and data["output_shards"] >= 1
    assert data["peak_rss_mb"] > data["baseline_rss_mb"] > 0
    ratio = (data["peak_rss_mb"] - data["baseline_rss_mb"]) / data["largest_shard_mb"]
    assert data["above_baseline_over_largest_shard"] == pytest.approx(ratio)
    assert f"**{ratio:.2f} × the largest source shard**" in (tmp_path / "mem.md").read_text()


@pytest.mark.slow
def test_tp_memory_quick_halves_the_parameters_per_rank(tmp_path):
    """TP=2 under torchrun: each rank holds about half the parameter bytes and gives the one-process logits."""
    result = run_module("benchmarks.system.tp_memory", "--quick", "--models", "diff-v1", "--out", tmp_path / "tp.md")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "tp.json").read_text())
    row = data["rows"]["Diff V1"]
    ranks = row["tp"]["ranks"]
    assert len(ranks) == 2 and sum(r["param_bytes"] for r in ranks) >= row["one"]["param_bytes"]
    assert all(0.45 < r["param_bytes"] / row["one"]["param_bytes"] < 0.55 for r in ranks)
    assert all(r["max_logit_diff"] < 1e-4 for r in ranks)
    assert data["chart"]["series"] == {"1 process": [row["one"]["param_bytes"] / 2**20],
                                       "TP=2, rank 0": [ranks[0]["param_bytes"] / 2**20]}
