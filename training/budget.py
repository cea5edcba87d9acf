"""Fitting fine-tuning into a time budget: time one Trainer step (`measure_step_seconds`), then choose the steps, the
sequence length and whether to fine-tune a baseline model too (`plan_fine_tuning`). `diff-transformer demo` plans
its fine-tuning so; the cost model is written out in `plan_fine_tuning`'s docstring.
"""

import math
import os
import time
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainingArguments

# the full run (demo --full): steps and tokens per sequence of each fine-tuning; the step probe times FULL_SEQ_LEN
FULL_STEPS, FULL_SEQ_LEN = 60, 128
SHORT_SEQ_LEN = 64  # a step of half the tokens costs about half: the plan shortens sequences before it drops models
MIN_STEPS = 20  # fewest steps per model the plan accepts before it gives up something else
FEWEST_STEPS = 2  # when nothing fits: the first step is the learning-rate warm-up's, at lr 0
STEP_MARGIN = 1.1  # what the probe leaves out of a Trainer step: data loading, gradient clipping, logging
AFTER_TRAINING_SECONDS = 30  # what follows the fine-tuning (the demo: chat answer, model card, loss plot, save)


def idle_cores_threads() -> int:
    """One thread per core that other jobs leave idle (by the 1-minute load average), at least 1, at most torch's
    default: OpenMP threads wait for each other at every operator, so a thread on a busy core costs more than it
    brings (measured in docs/cli.md, "Threads"). A core counts as busy only while a whole job holds it, since the
    average decays slowly after a job ends."""
    busy = int(os.getloadavg()[0])
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


def native_bf16() -> bool:
    """Whether this machine computes bfloat16 matmuls natively (CUDA, or a CPU with AVX512-BF16 / AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass
class FineTuningPlan:
    """What the demo fine-tunes: steps and tokens per sequence for each model, whether the Llama baseline too, and why.

    `expected_seconds` is when the demo should end, from its start, by the plan's cost model (None when the user chose
    the work); `budget_seconds` is the time budget it was planned for (None when there was none).
    """

    max_steps: int
    seq_len: int
    baseline: bool
    reason: str
    expected_seconds: float | None = None
    budget_seconds: float | None = None

    def describe(self, batch_size: int) -> str:
        models = "DiffTransformer V2 and the Llama baseline" if self.baseline else "DiffTransformer V2 only"
        return f"{self.max_steps} step(s) of {batch_size} x {self.seq_len} tokens for {models}"


def plan_fine_tuning(
    step_seconds: float,
    optimizer_seconds: float,
    *,
    budget_seconds: float,
    elapsed_seconds: float,
    eval_seconds: float,
    baseline: bool = True,
) -> FineTuningPlan:
    """The most fine-tuning that lets the demo end within `budget_seconds` of its start.

    `step_seconds` is one measured forward + backward of FULL_SEQ_LEN-token sequences and `optimizer_seconds` one
    optimizer step; a training step of `seq` tokens is costed (step_seconds * seq / FULL_SEQ_LEN + optimizer_seconds)
    * STEP_MARGIN, since its matmuls grow with its tokens and the optimizer's work does not. Each model fine-tuned then
    spends `eval_seconds` on held-out perplexity, and the demo AFTER_TRAINING_SECONDS on the rest. The first of these
    with at least MIN_STEPS steps per model wins, its steps capped at FULL_STEPS: FULL_SEQ_LEN with the baseline
    (FULL_STEPS of them is the full run), SHORT_SEQ_LEN with the baseline, SHORT_SEQ_LEN without it. When none has,
    the last runs as many steps as fit, at least FEWEST_STEPS, and the reason says whether the demo ends past the
    budget.
    """

    def step_cost(seq_len: int) -> float:
        return (step_seconds * seq_len / FULL_SEQ_LEN + optimizer_seconds) * STEP_MARGIN

    def end_seconds(steps: int, seq_len: int, models: int) -> float:
        return elapsed_seconds + models * (steps * step_cost(seq_len) + eval_seconds) + AFTER_TRAINING_SECONDS

    options = [(FULL_SEQ_LEN, True), (SHORT_SEQ_LEN, True), (SHORT_SEQ_LEN, False)]
    if not baseline:
        options = [(FULL_SEQ_LEN, False), (SHORT_SEQ_LEN, False)]
    for seq_len, with_baseline in options:
        models = 2 if with_baseline else 1
        left = budget_seconds - end_seconds(0, seq_len, models)  # seconds left for the fine-tuning steps
        steps = min(FULL_STEPS, math.floor(left / (models * step_cost(seq_len))))
        if steps >= MIN_STEPS:
            break
    steps = max(FEWEST_STEPS, steps)
    expected = end_seconds(steps, seq_len, models)
    full = end_seconds(FULL_STEPS, FULL_SEQ_LEN, 2 if baseline else 1)
    budget = f"the {budget_seconds / 60:g}-min budget"
    if (steps, seq_len, with_baseline) == (FULL_STEPS, FULL_SEQ_LEN, baseline):
        reason = f"the full run fits: it should end at about {expected / 60:.1f} min, within {budget}"
    else:
        reason = f"the full run would end at about {full / 60:.1f} min, past {budget}"
        if baseline and not with_baseline:
            reason += f"; fewer than {MIN_STEPS} steps per model fit with the Llama baseline, so it is left out"
        if steps < MIN_STEPS:
            reason += f"; not even {MIN_STEPS} steps of {seq_len} tokens fit, so {steps} show the workflow"
        reason += f"; this plan should end at about {expected / 60:.1f} min"
        if expected > budget_seconds:
            reason += ", past the budget"
    return FineTuningPlan(steps, seq_len, with_baseline, reason, expected, budget_seconds)


def baseline_still_fits(diff_seconds: float, *, budget_seconds: float, elapsed_seconds: float, eval_seconds: float):
    """Whether the Llama baseline, fine-tuned as long as the Diff model took (`diff_seconds`, measured), its held-out
    perplexity and the rest of the demo still end within `budget_seconds` of the start."""
    return elapsed_seconds + diff_seconds + eval_seconds + AFTER_TRAINING_SECONDS <= budget_seconds


def measure_step_seconds(model, training_args: TrainingArguments, seq_len: int) -> tuple[float, float]:
    """(forward + backward, optimizer step) seconds of a training step of the Trainer that `training_args` set up.

    One step of `per_device_train_batch_size` x `seq_len` tokens warms up, the next is timed. The optimizer is the
    Trainer's own, at learning rate 0, so that it does all its work and leaves the weights as they were; its state
    and the gradients are dropped afterwards.
    """
    device, bf16 = training_args.device, training_args.bf16
    model.to(device).train()
    optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    optimizer = optimizer_class(model.parameters(), **{**optimizer_kwargs, "lr": 0.0})
    # the time does not depend on which tokens: a fixed random batch (batch, seq_len)
    shape = (training_args.per_device_train_batch_size, seq_len)
    ids = torch.randint(3, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(2):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        synchronize(device)
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        timing = (backward_done - started, time.perf_counter() - backward_done)
    return timing


def synchronize(device: torch.device):
    """Wait for the GPU's queued work, so that a clock read after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
