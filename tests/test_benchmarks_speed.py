"""Smoke test of the speed / memory benchmarks in their tiny `--quick` modes.

Checks only that the scripts run end to end and write well-formed tables with positive numbers and a PNG. No
timing thresholds: the speed targets of issue 6 are checked by the benchmarks themselves, never in tests.
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)")

pytest.importorskip("matplotlib")


def load(name):
    """Import benchmarks/<name>.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown table rows whose first cell starts with `first_cell`."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| " + first_cell):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def assert_positive_cells(cells: list[str]):
    for cell in cells:
        numbers = [float(x) for x in NUMBER.findall(cell)]
        assert numbers, f"no number in cell {cell!r}"
        assert all(x > 0 for x in numbers), f"non-positive number in {cell!r}"


def test_speed_quick(tmp_path):
    out = tmp_path / "speed.md"
    result = load("speed").main(["--quick", "--out", str(out)])
    text = out.read_text()
    assert "| measure | Llama | DiffLlama | Diff V1 | Diff V2 |" in text
    expected = [
        "training step fwd+bwd, T=32", "training step fwd+bwd, T=64", "prefill latency, T=32", "prefill latency, T=64",
        "decode tok/s", "generate() tok/s", "peak training memory (allocated tensors), T=32",
        "peak training RSS increase, T=32", "peak RSS of the process",
        "KV-cache bytes", "parameters",
    ]
    for label in expected:
        rows = table_rows(text, label)
        assert len(rows) == 1, label
        assert len(rows[0]) == 5, rows[0]
        assert_positive_cells(rows[0][1:])
        assert rows[0][1].startswith("1.000×"), rows[0]  # Llama is the reference column
    # KV-cache bytes: the same numbers give the same cache in all four models (exact, not a timing)
    assert all(cell.startswith("1.000×") for cell in table_rows(text, "KV-cache bytes")[0][1:])
    assert "## Targets (issue 6)" in text and re.search(r"\| (PASS|MISS) \|", text)
    assert (tmp_path / "speed.png").stat().st_size > 1000
    assert (tmp_path / "speed.json").stat().st_size > 100
    for name, values in result["results"].items():
        assert all(value > 0 for value in values.values()), (name, values)


def test_attention_kernels_quick(tmp_path):
    out = tmp_path / "attention_kernels.md"
    result = load("attention_kernels").main(["--quick", "--out", str(out)])
    text = out.read_text()
    for prefix in ("Llama core", "(a) zero-padded", "(a') as (a)", "(b) 4 sdpa calls", "(c) 2 sdpa calls",
                   "(d) materialised"):
        rows = table_rows(text, prefix)
        assert len(rows) == 1, prefix
        assert len(rows[0]) == 4, rows[0]  # T=32, T=64, decode S=32
        assert_positive_cells(rows[0][1:])
    # every scheme computes the same function as the materialised reference
    assert all(value < 1e-4 for value in result["differences"].values()), result["differences"]
    assert (tmp_path / "attention_kernels.png").stat().st_size > 1000


def test_memory_generate_quick(tmp_path):
    out = tmp_path / "memory_generate.md"
    load("memory_generate").main(["--quick", "--models", "llama", "diff-v1", "--out", str(out)])
    text = out.read_text()
    for label in ("Llama", "Diff V1"):
        rows = table_rows(text, label + " ")
        assert len(rows) == 1, label
        assert_positive_cells(rows[0][1:])
    assert (tmp_path / "memory_generate.png").stat().st_size > 1000


def test_peak_allocated_memory_is_reproducible_and_counts_activations():
    """The allocator peak is the same on a second identical step, and grows with the sequence length."""
    speed = load("speed")
    args = speed.parse_args(["--quick"])
    model = speed.build_model("diff-v1", speed.config_numbers(args))
    short, long = (speed.random_ids(args.vocab, length, seed=0) for length in (32, 64))
    first = speed.peak_allocated_mib(model, short)
    assert first > 0
    assert speed.peak_allocated_mib(model, short) == pytest.approx(first, rel=0.01)
    assert speed.peak_allocated_mib(model, long) > 1.5 * first


def test_decode_profile_quick(tmp_path):
    out = tmp_path / "decode_profile.md"
    result = load("decode_profile").main(["--quick", "--out", str(out)])
    text = out.read_text()
    for label in ("Llama", "Diff V1", "Diff V2"):
        rows = table_rows(text, label + " ")
        assert len(rows) == 1, label
        assert_positive_cells(rows[0][1:])
    # V1 runs operators Llama does not (the padded query, λ, the head norm): its difference table is not empty
    v1_section = text.split("## Diff V1 against Llama")[1].split("## Diff V2")[0]
    assert len(table_rows(v1_section, "`aten::")) > 0
    assert set(result["per_token_seconds"]) == {"llama", "diff-v1", "diff-v2"}


def test_v1_recompute_quick(tmp_path):
    """Recomputing a1 - λ·a2 and the head norm in backward keeps fewer bytes than plain autograd (deterministic)."""
    out = tmp_path / "v1_recompute.md"
    results = load("v1_recompute").main(["--quick", "--out", str(out)])
    memory = results[32]["memory_mib"]
    assert memory["v1-recompute"] < memory["v1-keep"]
    rows = table_rows(out.read_text(), "peak training memory")
    assert len(rows) == 1 and len(rows[0]) == 4
    assert_positive_cells(rows[0][1:])
