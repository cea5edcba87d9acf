"""Interleaved timing: every model runs once inside each repetition, so a change of load hits all of them alike.

The measures time one training step, one prefill, a greedy decode loop on the cache, or `generate()`, each read on
a clock of `CLOCKS` (wall time, or the process's CPU time, which leaves out the time other jobs held the core).
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from benchmarks.harness.models import cache_bytes

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_HELP = (
    "wall: elapsed time; cpu: this process's CPU time, which leaves out the time other jobs on a shared machine hold "
    "the core (use it with 1 thread)"
)


def time_interleaved(models: dict, measures: list, repeats: int, warmup: bool = True) -> dict:
    """Run every measure on every model, interleaved; returns {model: {key: [value per repetition]}}.

    `measures` holds (key, callable(model) -> value) pairs, or (key, callable, model names) to run a measure on
    some models only. Inside each repetition every model runs once, the order alternating forwards and backwards
    between repetitions; with `warmup`, repetition 0 is run first and not recorded.
    """
    raw = {name: {} for name in models}
    first = 0 if warmup else 1
    plan = [(m[0], m[1], m[2] if len(m) > 2 else list(models)) for m in measures]
    total = sum(len(names) for _, _, names in plan) * (repeats + 1 - first)
    with tqdm(total=total, desc="timing (interleaved)", unit="run") as bar:
        for key, measure, names in plan:
            for repetition in range(first, repeats + 1):  # repetition 0 is the warm-up
                for name in names if repetition % 2 == 0 else names[::-1]:
                    bar.set_postfix_str(f"{key} {name}")
                    value = measure(models[name])
                    if repetition > 0:
                        raw[name].setdefault(key, []).append(value)
                    bar.update()
    return raw


def median(values: list[float]) -> float:
    """Median of the repetitions."""
    return statistics.median(values)


def paired_ratio(values: list[float], references: list[float]) -> float:
    """The median, over repetitions, of a model's value over the reference model's in the same repetition.

    The two ran one right after the other, so a change in the machine's load between repetitions cancels in
    each ratio; on a shared machine this is steadier than the ratio of the two medians.
    """
    return median([value / reference for value, reference in zip(values, references)])


def train_step_seconds(model, ids: torch.Tensor, clock=time.perf_counter) -> float:
    """Seconds for one forward + backward of the LM loss (gradients are dropped afterwards), read on `clock`."""
    model.train()
    model.zero_grad(set_to_none=True)
    start = clock()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    elapsed = clock() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return elapsed


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor, clock=time.perf_counter) -> float:
    """Seconds for one cached forward of the whole prompt (what `generate()` does first), read on `clock`."""
    start = clock()
    model(input_ids=ids, use_cache=True)
    return clock() - start


@torch.inference_mode()
def prefill(model, ids: torch.Tensor):
    """The cache after a forward of `ids`, and the first greedy token (1, 1)."""
    out = model(input_ids=ids, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return cache, out.logits[:, -1:].argmax(-1)


@torch.inference_mode()
def decode_seconds(model, ids: torch.Tensor, new_tokens: int, clock=time.perf_counter) -> tuple[float, int]:
    """Prefill `ids` (untimed), then time `new_tokens` greedy one-token forwards on the cache, on `clock`.

    Returns the seconds of the decode loop and the cache's bytes right after the prefill.
    """
    cache, next_id = prefill(model, ids)
    kv_bytes = cache_bytes(cache)
    start = clock()
    for _ in range(new_tokens):
        next_id = model(input_ids=next_id, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return clock() - start, kv_bytes


@torch.inference_mode()
def generate_seconds(model, ids: torch.Tensor, new_tokens: int, clock=time.perf_counter) -> float:
    """Seconds (on `clock`) for `model.generate` (greedy, prefill included) producing exactly `new_tokens` tokens."""
    start = clock()
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0,
    )
    return clock() - start
