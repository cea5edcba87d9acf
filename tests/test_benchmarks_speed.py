"""The speed benchmarks (`benchmarks/speed/`) in their tiny `--quick` modes, and the harness they share.

Checks that the scripts run end to end and write well-formed tables whose numbers agree with the results they
return, and that each chart plots those numbers. No timing thresholds: targets are checked by the benchmarks
themselves, never in tests.
"""

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)")


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


def in_git_checkout() -> bool:
    """--before REV reads the model files of REV with git: only from a git checkout with git installed."""
    return shutil.which("git") is not None and (ROOT / ".git").exists()


def test_benchmarks_import_top_down():
    """Scripts import the harness, never each other; the harness imports no script; nothing patches sys.path (a
    study's own modules are its folder's)."""
    harnesses = ("benchmarks.harness",)
    for path in (ROOT / "benchmarks").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        imported = {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for alias in node.names}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        for name in (name for name in imported if name.startswith("benchmarks")):
            if module.startswith("benchmarks.harness"):
                assert name.startswith("benchmarks.harness"), (module, name)
            else:  # a study's modules (config, task, report, ...) import each other
                study = module.rsplit(".", 1)[0] + "." if module.startswith("benchmarks.studies.") else harnesses[0]
                assert name.startswith(harnesses) or name.startswith(study), (module, name)
        patched = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
                   and isinstance(node.value, ast.Name) and node.value.id == "sys"]
        assert not patched, module


@pytest.mark.slow
def test_speed_quick(tmp_path):
    from benchmarks.speed import speed

    out = tmp_path / "speed.md"
    result = speed.main(["--quick", "--out", str(out)])
    text = out.read_text()
    assert "| measure | Llama | DiffLlama | Diff V1 | Diff V2 |" in text
    assert "Produced by `python -m benchmarks.speed.speed --quick --out" in text
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
    assert re.search(r"\| (PASS|MISS) \|", text)
    for name, values in result["results"].items():
        assert all(value > 0 for value in values.values()), (name, values)
    # the table's ratio cells are the results' ratios
    v1_train = result["results"]["diff-v1"]["train_32"] / result["results"]["llama"]["train_32"]
    assert table_rows(text, "training step fwd+bwd, T=32")[0][3].startswith(f"{v1_train:.3f}×")
    # the chart plots exactly those ratios, one bar per model and measure (the RSS absolute rows left out)
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["chart"] == json.loads(json.dumps(result["chart"]))
    labels = [row["label"] for row in result["rows"] if row["key"] != "params" and not row["key"].startswith("memabs")]
    assert [label.replace("\n", ", ", 1) for label in result["chart"]["labels"]] == labels
    index = labels.index("training step fwd+bwd, T=32")
    assert result["chart"]["series"]["Diff V1"][index] == pytest.approx(v1_train)
    assert set(result["chart"]["series"]) == {"DiffLlama", "Diff V1", "Diff V2"}
    assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_attention_kernels_quick(tmp_path):
    from benchmarks.speed import attention_kernels

    out = tmp_path / "attention_kernels.md"
    result = attention_kernels.main(["--quick", "--out", str(out)])
    text = out.read_text()
    for prefix in ("Llama core", "(a) zero-padded", "(a') as (a)", "(b) 4 sdpa calls", "(c) 2 sdpa calls",
                   "(d) materialised"):
        rows = table_rows(text, prefix)
        assert len(rows) == 1, prefix
        assert len(rows[0]) == 4, rows[0]  # T=32, T=64, decode S=32
        assert_positive_cells(rows[0][1:])
    # every scheme computes the same function as the materialised reference
    assert all(value < 1e-4 for value in result["differences"].values()), result["differences"]
    # the chart's bars are each scheme's time over Llama's core, per measure
    chart, results = result["chart"], result["results"]
    assert chart["labels"] == ["fwd+bwd T=32", "fwd+bwd T=64", "decode S=32"]
    padded = chart["series"][attention_kernels.DESCRIPTIONS["padded"]]
    assert padded == pytest.approx([results[k]["padded"] / results[k]["llama"] for k in results])
    assert json.loads((tmp_path / "attention_kernels.json").read_text())["chart"] == chart


@pytest.mark.slow
def test_memory_generate_quick(tmp_path):
    from benchmarks.speed import memory_generate

    out = tmp_path / "memory_generate.md"
    result = memory_generate.main(["--quick", "--models", "llama", "diff-v1", "--out", str(out)])
    text = out.read_text()
    for name, label in (("llama", "Llama"), ("diff-v1", "Diff V1")):
        rows = table_rows(text, label + " ")
        assert len(rows) == 1, label
        assert_positive_cells(rows[0][1:])
        assert rows[0][1] == f"{result['results'][name]['peak_increase_mib']:.0f} MiB"
    assert result["chart"]["series"] == {
        "peak RSS increase (MiB)": [result["results"][m]["peak_increase_mib"] for m in ("llama", "diff-v1")]}


def test_peak_allocated_memory_is_reproducible_and_counts_activations():
    """The allocator peak is the same on a second identical step, and grows with the sequence length."""
    from types import SimpleNamespace

    from benchmarks.harness.memory import peak_allocated_mib
    from benchmarks.harness.models import build_model, config_numbers, random_ids

    size = SimpleNamespace(vocab=256, hidden=64, intermediate=176, layers=2, heads=8, kv_heads=4)
    model = build_model("diff-v1", config_numbers(size, max_positions=128))
    short, long = (random_ids(256, length, seed=0) for length in (32, 64))
    first = peak_allocated_mib(model, short)
    assert first > 0
    assert peak_allocated_mib(model, short) == pytest.approx(first, rel=0.01)
    assert peak_allocated_mib(model, long) > 1.5 * first


def test_interleaved_timing_alternates_and_skips_the_warmup():
    """time_interleaved runs every model once per repetition, order reversed every other repetition, and drops
    repetition 0."""
    from benchmarks.harness.timing import paired_ratio, time_interleaved

    calls = []
    raw = time_interleaved({"a": "a", "b": "b"}, [("m", lambda name: calls.append(name) or len(calls))], repeats=2)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # warm-up, then two repetitions
    assert raw == {"a": {"m": [4, 5]}, "b": {"m": [3, 6]}}
    assert paired_ratio([2.0, 3.0, 8.0], [1.0, 3.0, 2.0]) == 2.0  # the median of 2, 1 and 4


@pytest.mark.slow
def test_decode_profile_quick(tmp_path):
    from benchmarks.speed import decode_profile

    out = tmp_path / "decode_profile.md"
    result = decode_profile.main(["--quick", "--out", str(out)])
    text = out.read_text()
    for label in ("Llama", "Diff V1", "Diff V2"):
        rows = table_rows(text, label + " ")
        assert len(rows) == 1, label
        assert_positive_cells(rows[0][1:])
    # V1 runs operators Llama does not (the padded query, λ, the head norm): its difference table is not empty
    v1_section = text.split("## Diff V1 against Llama")[1].split("## Diff V2")[0]
    assert len(table_rows(v1_section, "`aten::")) > 0
    assert set(result["per_token_seconds"]) == {"llama", "diff-v1", "diff-v2"}
    calls = sum(count for count, _ in result["ops"]["diff-v1"].values())
    assert table_rows(text, "Diff V1 ")[0][3] == f"{calls:.0f}"


@pytest.mark.slow
def test_v1_recompute_quick(tmp_path):
    """Recomputing a1 - λ·a2 and the head norm in backward keeps fewer bytes than plain autograd (deterministic)."""
    from benchmarks.speed import v1_recompute

    out = tmp_path / "v1_recompute.md"
    results = v1_recompute.main(["--quick", "--out", str(out)])
    memory = results[32]["memory_mib"]
    assert memory["v1-recompute"] < memory["v1-keep"]
    rows = table_rows(out.read_text(), "peak training memory")
    assert len(rows) == 1 and len(rows[0]) == 4
    assert_positive_cells(rows[0][1:])


@pytest.mark.slow
@pytest.mark.skipif(not in_git_checkout(), reason="--before needs git and a git checkout")
def test_decode_profile_before_same_revision_has_the_same_operators(tmp_path):
    """--before HEAD builds V1/V2 from HEAD's model files: on a clean tree they run exactly the same operators."""
    from benchmarks.speed import decode_profile

    changed = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "modeling_diff"], check=False)
    if changed.returncode != 0:
        pytest.skip("modeling_diff/ has uncommitted changes, so HEAD's model differs from the working tree's")
    result = decode_profile.main(["--quick", "--before", "HEAD", "--out", str(tmp_path / "d.md")])
    ops = result["ops"]
    for name in ("diff-v1", "diff-v2"):
        calls = {op: count for op, (count, _) in ops[name].items()}
        assert calls == {op: count for op, (count, _) in ops[f"{name}@HEAD"].items()}, name
    assert "## Diff V1 now against Diff V1 (HEAD)" in (tmp_path / "d.md").read_text()


@pytest.mark.slow
def test_layouts_quick(tmp_path):
    from benchmarks.speed import layouts

    out = tmp_path / "layouts.md"
    argv = ["--quick", "--out", str(out)] + (["--before", "HEAD"] if in_git_checkout() else [])
    result = layouts.main(argv)
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
    # the chart: per measure, the measured ratio and its FLOP (decode: byte) limit
    chart = result["chart"]
    assert chart["series"]["measured (Diff V2 / Llama)"] == [layouts.ratio_of(row, "diff-v2") for row in study["rows"]]
    assert chart["series"]["FLOP limit (bytes for decode)"] == [
        1 / row["bytes_ratio"] if row["key"] == "decode" else row["flops_ratio"] for row in study["rows"]]
    # --render re-writes the tables of that run from its JSON, measuring nothing: the same rows come back
    out.unlink()
    layouts.main(["--render", str(tmp_path / "layouts.json")])
    rendered = out.read_text()
    assert "Tables re-rendered from layouts.json" in rendered
    assert table_rows(rendered, "decode tok/s")[0] == table_rows(text, "decode tok/s")[0]


def test_layout_flops_by_hand():
    """The FLOP estimate of the layouts benchmark against a hand count on a one-layer model."""
    from benchmarks.speed import layouts

    shape = dict(hidden=8, layers=1, vocab=10, intermediate=16, head_dim=2, query_heads=4, kv_heads=2,
                 output_heads=2, gate_heads=2)
    # linear weights: q 8x8, k 8x4, v 8x4, o 4x8, gate 8x2, MLP 3 x 8x16
    weights = 64 + 32 + 32 + 32 + 16 + 384
    assert layouts.linear_weights_per_layer(shape) == weights
    # 3 tokens, causal: they see 1 + 2 + 3 = 6 keys; 4 FLOPs per key, head_dim and query head (QKᵀ and AV)
    assert layouts.forward_flops(shape, 3, 0) == 2 * 3 * (weights + 10 * 8) + 4 * 2 * 4 * 6


def test_in_memory_v2_conversion_computes_the_source_function():
    """The layouts benchmark's converted_v2 (the converter's mapping, applied in memory) equals its Llama source."""
    from modeling_diff_conversion.source import Source
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.speed import layouts

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    llama = LlamaForCausalLM(config).eval()
    source = Source(name="tiny", config=config, architecture="LlamaForCausalLM", in_memory_model=llama)
    model = layouts.converted_v2(source)
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 2
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
