"""`diff-transformer demo` fits its time budget: the plan (a pure function), the step probe, the flags, a tiny run."""

import math
import subprocess

import pytest
import torch
from helpers import assert_one_line_error, make_model
from helpers import run_cli as cli
from modeling_diff_cli.main import main
from modeling_diff_training import DiffTrainingArguments
from modeling_diff_training.budget import (
    AFTER_TRAINING_SECONDS,
    FEWEST_STEPS,
    FULL_SEQ_LEN,
    FULL_STEPS,
    MIN_STEPS,
    SHORT_SEQ_LEN,
    STEP_MARGIN,
    baseline_still_fits,
    measure_step_seconds,
    plan_fine_tuning,
)
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.system.demo_timing import matmul_flops

BUDGET = 8 * 60
OPTIMIZER = 0.05  # optimizer seconds per step, as a share of a forward + backward of 4 x 128 tokens (about this in
# float32 on a CPU)


def end_seconds(steps, seq_len, models, step_seconds, elapsed, eval_seconds):
    """When the demo ends by the plan's documented cost model, written out again here as the reference."""
    one_step = (step_seconds * seq_len / FULL_SEQ_LEN + OPTIMIZER * step_seconds) * STEP_MARGIN
    return elapsed + models * (steps * one_step + eval_seconds) + AFTER_TRAINING_SECONDS


def plan(step_seconds, elapsed=60.0, eval_seconds=10.0, baseline=True, budget=BUDGET):
    return plan_fine_tuning(
        step_seconds,
        OPTIMIZER * step_seconds,
        budget_seconds=budget,
        elapsed_seconds=elapsed,
        eval_seconds=eval_seconds,
        baseline=baseline,
    )


def test_a_fast_machine_gets_the_full_run():
    p = plan(step_seconds=1.0)
    assert (p.max_steps, p.seq_len, p.baseline) == (FULL_STEPS, FULL_SEQ_LEN, True)
    assert p.expected_seconds == pytest.approx(end_seconds(FULL_STEPS, FULL_SEQ_LEN, 2, 1.0, 60.0, 10.0))
    assert "the full run fits" in p.reason


def test_the_issue_s_machine_shortens_sequences_and_keeps_the_baseline():
    """2-core AVX2 float32: about 12 s per step of 4 x 128 tokens; the demo has spent ~100 s before the plan."""
    p = plan(step_seconds=11.0, elapsed=100.0, eval_seconds=16.0)
    assert (p.seq_len, p.baseline) == (SHORT_SEQ_LEN, True)
    assert MIN_STEPS <= p.max_steps < FULL_STEPS
    assert p.expected_seconds <= BUDGET
    assert "past the 8-min budget" in p.reason and "past the budget" not in p.reason.split(";")[-1]


@pytest.mark.parametrize("step_seconds", [0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 11.0, 15.0, 20.0, 25.0, 30.0, 40.0])
@pytest.mark.parametrize("baseline", [True, False])
def test_the_plan_is_the_most_work_that_fits(step_seconds, baseline):
    """Within the budget, and one more step would not be (unless capped), and no preferred option fits instead."""
    elapsed, eval_seconds = 70.0, 3 * step_seconds
    p = plan(step_seconds, elapsed, eval_seconds, baseline)
    models = 2 if p.baseline else 1
    assert baseline or not p.baseline
    if p.max_steps < MIN_STEPS:  # only the last option may run fewer
        assert (p.seq_len, p.baseline) == (SHORT_SEQ_LEN, False)
    expected = end_seconds(p.max_steps, p.seq_len, models, step_seconds, elapsed, eval_seconds)
    assert p.expected_seconds == pytest.approx(expected)
    assert p.expected_seconds <= BUDGET
    more = end_seconds(p.max_steps + 1, p.seq_len, models, step_seconds, elapsed, eval_seconds)
    assert p.max_steps == FULL_STEPS or more > BUDGET
    # the options the plan prefers, in order: full sequences with the baseline, short ones with it, short ones alone
    preferred = [(FULL_SEQ_LEN, baseline), (SHORT_SEQ_LEN, baseline), (SHORT_SEQ_LEN, False)]
    for seq_len, with_baseline in preferred[: preferred.index((p.seq_len, p.baseline))]:
        n = 2 if with_baseline else 1
        assert end_seconds(MIN_STEPS, seq_len, n, step_seconds, elapsed, eval_seconds) > BUDGET, (seq_len, n)


def test_a_spent_budget_still_runs_the_fewest_steps_and_says_it_will_be_late():
    p = plan(step_seconds=5.0, elapsed=BUDGET + 10)
    assert (p.max_steps, p.seq_len, p.baseline) == (FEWEST_STEPS, SHORT_SEQ_LEN, False)
    assert p.expected_seconds > BUDGET and p.reason.endswith("past the budget")
    assert "the Llama baseline, so it is left out" in p.reason


def test_no_baseline_is_never_planned_with_one():
    p = plan(step_seconds=1.0, baseline=False)
    assert (p.max_steps, p.seq_len, p.baseline) == (FULL_STEPS, FULL_SEQ_LEN, False)
    assert "the full run fits" in p.reason
    assert not plan(step_seconds=60.0, baseline=False).baseline


def test_the_baseline_is_checked_again_with_the_measured_fine_tune():
    kw = dict(budget_seconds=BUDGET, eval_seconds=10.0)
    room = BUDGET - 10.0 - AFTER_TRAINING_SECONDS  # time for what came before and the baseline's fine-tune
    assert baseline_still_fits(100.0, elapsed_seconds=room - 100.0, **kw)
    assert not baseline_still_fits(100.0, elapsed_seconds=room - 99.0, **kw)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_step_probe_leaves_the_weights_alone(tmp_path, bf16):
    """It runs the Trainer's own optimizer (at lr 0) on real gradients: the weights stay bit for bit."""
    model = make_model("v2-gqa")
    args = DiffTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, bf16=bf16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step, optimizer = measure_step_seconds(model, args, seq_len=16)
    assert step > 0 and optimizer > 0 and math.isfinite(step + optimizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--full", "--time-budget", "5"], "--full runs the full fine-tuning however long it takes"),
        (["--max-steps", "5", "--time-budget", "5"], "--max_steps choose the work, --time_budget lets"),
        (["--time-budget", "0"], "--time_budget is 0 minutes"),
        (["--seq-len", "0"], "--seq_len is 0"),
    ],
)
def test_contradicting_or_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "demo"
    status = main(["demo", "--output-dir", str(out), *flags])
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess([], status, captured.out, captured.err), message)
    assert "Convert SmolLM2" not in captured.out and not out.exists()


@pytest.mark.slow
def test_a_spent_budget_runs_the_whole_demo_with_the_fewest_steps(tmp_path):
    """A budget spent before the plan: two short steps for the Diff model only, and the notes say what is missing."""
    result = cli(
        "demo",
        "--output-dir",
        tmp_path / "demo",
        "--time-budget",
        0.05,
        "--max_batches",
        1,
        "--per_device_train_batch_size",
        2,
        "--max-new-tokens",
        8,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    # the verification and both chat answers come before the step is timed
    assert out.index("PASS (same function)") < out.index("DiffTransformer :") < out.index("timing a training step")
    assert f"plan: {FEWEST_STEPS} step(s) of 2 x {SHORT_SEQ_LEN} tokens for DiffTransformer V2 only" in out
    why = out.split("\nwhy: ")[1].splitlines()[0]
    assert why.startswith("the full run would end at about") and why.endswith("past the budget")
    assert "same fine-tuning for the source Llama" not in out
    card = (tmp_path / "demo" / "README.md").read_text()
    assert f"{FEWEST_STEPS} steps of 2 x {SHORT_SEQ_LEN} tokens" in card
    assert "| SmolLM2-135M-Instruct (Llama) |" in card and "(not fine-tuned)" in card
    assert "No Llama baseline (it did not fit in the time budget)" in card
    assert "λ per layer moved by at most" in card


def test_the_breakdown_counts_the_step_s_weight_matmuls():
    """benchmarks.system.demo_timing's FLOP column against torch's own count of a tiny Llama's mm ops, fwd + bwd."""

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    mm = sum(n for op, n in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))
    assert mm == matmul_flops(config, tokens=2 * 16)
