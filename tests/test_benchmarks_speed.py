"""Smoke test of the speed / memory benchmarks in their tiny `--quick` modes.

Checks only that the scripts run end to end and write well-formed tables with positive numbers and a PNG. No
timing thresholds: the speed targets of issue 6 are checked by the benchmarks themselves, never in tests.
"""

import importlib.util
import re
import shutil
import subprocess
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


def in_git_checkout() -> bool:
    """--before REV reads the model files of REV with git: only from a git checkout with git installed."""
    return shutil.which("git") is not None and (BENCHMARKS.parent / ".git").exists()


@pytest.mark.skipif(not in_git_checkout(), reason="--before needs git and a git checkout")
def test_decode_profile_before_same_revision_has_the_same_operators(tmp_path):
    """--before HEAD builds V1/V2 from HEAD's model files: on a clean tree they run exactly the same operators."""
    changed = subprocess.run(["git", "-C", str(BENCHMARKS.parent), "diff", "--quiet", "HEAD", "--", "modeling_diff"],
                             check=False)
    if changed.returncode != 0:
        pytest.skip("modeling_diff/ has uncommitted changes, so HEAD's model differs from the working tree's")
    result = load("decode_profile").main(["--quick", "--before", "HEAD", "--out", str(tmp_path / "d.md")])
    ops = result["ops"]
    for name in ("diff-v1", "diff-v2"):
        calls = {op: count for op, (count, _) in ops[name].items()}
        assert calls == {op: count for op, (count, _) in ops[f"{name}@HEAD"].items()}, name
    assert "## Diff V1 now against Diff V1 (HEAD)" in (tmp_path / "d.md").read_text()


def test_layouts_quick(tmp_path):
    out = tmp_path / "layouts.md"
    argv = ["--quick", "--out", str(out)] + (["--before", "HEAD"] if in_git_checkout() else [])
    result = load("layouts").main(argv)
    text = out.read_text()
    assert "## DIFF V2's own layout against the H-head Llama" in text
    for label in ("training step fwd+bwd, T=32", "training step fwd+bwd, T=64", "prefill, T=64", "decode tok/s"):
        rows = table_rows(text, label)
        assert len(rows) >= 1, label
        assert len(rows[0]) == 8, rows[0]
        assert_positive_cells(rows[0][1:])
    (study,) = result["results"]
    # --quick: the Llama has 4 query heads, V2 8 query heads on the same 2 KV heads; 4 output heads, a 4-wide gate
    assert study["layouts"]["diff-v2"]["query_heads"] == 8 and study["layouts"]["diff-v2"]["output_heads"] == 4
    # parameters: V2 adds q_proj rows (64 x 64 per layer) and the gate (64 x 4 per layer), 2 layers
    assert study["params"]["diff-v2"] - study["params"]["llama"] == 2 * (64 * 64 + 64 * 4)
    if in_git_checkout():
        assert "### Before / after" in text
    assert (tmp_path / "layouts.png").stat().st_size > 1000
    assert (tmp_path / "layouts.json").stat().st_size > 100
    # --render re-writes the tables of that run from its JSON, measuring nothing: the same rows come back
    out.unlink()
    load("layouts").main(["--render", str(tmp_path / "layouts.json")])
    rendered = out.read_text()
    assert "Tables re-rendered from layouts.json" in rendered
    assert table_rows(rendered, "decode tok/s")[0] == table_rows(text, "decode tok/s")[0]


def test_layout_flops_by_hand():
    """The FLOP estimate of layouts.py against a hand count on a one-layer model."""
    layouts = load("layouts")
    shape = dict(hidden=8, layers=1, vocab=10, intermediate=16, head_dim=2, query_heads=4, kv_heads=2,
                 output_heads=2, gate_heads=2)
    # linear weights: q 8x8, k 8x4, v 8x4, o 4x8, gate 8x2, MLP 3 x 8x16
    weights = 64 + 32 + 32 + 32 + 16 + 384
    assert layouts.linear_weights_per_layer(shape) == weights
    # 3 tokens, causal: they see 1 + 2 + 3 = 6 keys; 4 FLOPs per key, head_dim and query head (QKᵀ and AV)
    assert layouts.forward_flops(shape, 3, 0) == 2 * 3 * (weights + 10 * 8) + 4 * 2 * 4 * 6


def test_in_memory_v2_conversion_computes_the_source_function():
    """layouts.py's converted_v2 (the converter's mapping, applied in memory) equals its Llama source."""
    import torch
    from modeling_diff_conversion.source import Source
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    llama = LlamaForCausalLM(config).eval()
    source = Source(name="tiny", config=config, architecture="LlamaForCausalLM", in_memory_model=llama)
    model = load("layouts").converted_v2(source)
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 2
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
