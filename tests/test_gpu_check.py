"""Smoke test of benchmarks/gpu/gpu_check.py: its one-line exit without CUDA, and its CPU dry run of every section.

The dry run computes real checks at tiny sizes (logits against `modeling_diff_eval.reference`, compiled decode
against generate(), the V1 core schemes against the padded layout), so the test asserts their verdicts; it never
asserts a time.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args, timeout=900) -> subprocess.CompletedProcess:
    """`python -m benchmarks.gpu.gpu_check ARGS` from the repository root, as the docs run it."""
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu.gpu_check", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def section(text: str, letter: str) -> str:
    """The markdown of section (letter), up to the next section."""
    start = text.index(f"## ({letter})")
    end = text.find("\n## (", start + 1)
    return text[start:] if end < 0 else text[start:end]


def rows(text: str) -> list[list[str]]:
    """Cells of every table body row in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without CUDA")
def test_without_cuda_prints_one_line_and_exits_0(tmp_path):
    result = run_script("--out", tmp_path / "gpu_check.md", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines() == [
        "CUDA is not available: the GPU check was not run (use --cpu-dry-run to test the script on CPU)."
    ]
    assert not (tmp_path / "gpu_check.md").exists()


@pytest.mark.slow
def test_cpu_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.md"
    result = run_script("--cpu-dry-run", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    data = json.loads(out.with_suffix(".json").read_text())
    assert {key: s["status"] for key, s in data["sections"].items()} == dict.fromkeys(
        ["correctness", "compile", "speed", "kernels", "compiled"], "ok"
    ), text

    # (a) every implementation that runs on CPU, our two variants and the two transformers baselines, within the
    # float32 tolerance of the float64 reference
    correctness = rows(section(text, "a"))
    implementations = ("eager", "sdpa", "flex_attention")
    models = ("Llama", "DiffLlama", "V1", "V2")
    assert {(r[0], r[2]) for r in correctness} == {(m, a) for m in models for a in implementations}
    assert all(r[1] == "×8" and r[3] == "float32" for r in correctness), correctness
    assert all(r[8] == "PASS" and float(r[5]) <= float(r[7]) for r in correctness), correctness
    # on CPU the "CUDA" run is the CPU run: the same error
    assert all(r[5] == r[6] for r in correctness), correctness
    assert "flash_attention_2 (needs CUDA)" in section(text, "a")

    # (b) compiled static-cache decoding reproduces generate() exactly, for Llama and both variants
    compiled = rows(section(text, "b"))
    assert [(r[0], r[3], r[7]) for r in compiled] == [(m, "yes", "equal") for m in ("Llama", "V1", "V2")]
    assert all(r["compiled"] == r["generate"] and len(r["generate"]) == 5 for r in data["sections"]["compile"]["rows"])

    # (c) four models, a training-step and a decode row per T, Llama at 1.000×
    speed = rows(section(text, "c"))
    expected = ["parameters"]
    for t in (32, 64):
        expected += [f"training step fwd+bwd, T={t}", f"decode tok/s after a {t}-token prompt"]
    assert [r[0] for r in speed] == expected
    assert all(len(r) == 5 and r[1].startswith("1.000×") for r in speed[1:])

    # (d) the stand-ins for the CUDA kernels compute the padded layout's function; flex has no CPU backward
    kernels = {r[0]: r for r in rows(section(text, "d"))}
    assert len(kernels) == 5
    for label, cells in kernels.items():
        if "2 calls" in label:
            assert float(cells[-2]) < 1e-5 and float(cells[-1]) < 1e-5, cells
    flex = next(cells for label, cells in kernels.items() if "FlexAttention" in label)
    assert flex[3] != "failed" and float(flex[-2]) < 1e-5  # the decode step runs on CPU
    if flex[1] == "failed":  # torch has no CPU backward for FlexAttention: recorded, not hidden
        assert "Failures: flex, train_32" in section(text, "d")

    # (e) generate() on a StaticCache (compiled on a GPU only): the same tokens as eager decoding, Llama at 1.000×
    compiled_decode = rows(section(text, "e"))
    assert [r[0] for r in compiled_decode] == ["decode tok/s after a 32-token prompt",
                                               "leading tokens equal to eager DynamicCache decoding"]
    assert compiled_decode[0][1].startswith("1.000×")
    assert compiled_decode[1][1:] == ["5 of 5"] * 4
    assert "does NOT compile (no GPU)" in section(text, "e")
