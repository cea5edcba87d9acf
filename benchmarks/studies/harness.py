"""The study harness: what the training studies share.

- three models at equal parameter count (`equal_parameter_configs`): Llama, V1 with the paper's heads, V2 in DIFF
  V2's layout with a SwiGLU narrowed to pay for its extra query projection;
- one training recipe for all of them (`study_trainer`): the 🤗 Trainer with AdamW, the paper's warm-up then linear
  decay (`paper_schedule`), gradient clipping, fp32;
- jobs (one model, rate and seed each) in spawned worker processes with one progress bar, the machine's load
  sampled, and the finished runs kept on disk while the study goes on (`run_jobs`);
- mean ± std over seeds and the one rule every report calls a difference by (`verdict`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

from benchmarks.harness.report import machine_info

MODELS = ("llama", "diff-v1", "diff-v2")
LABELS = {"llama": "Llama (Transformer)", "diff-v1": "DiffTransformer V1", "diff-v2": "DiffTransformer V2"}


# ----------------------------------------------------------------------------------------------------------------
# models


def equal_parameter_configs(hidden: int, layers: int, heads: int, intermediate: int, vocab: int,
                            max_positions: int) -> dict:
    """The three configs: Llama; V1 with Llama's numbers (the paper's heads: half as many differential heads, each
    twice as wide in value); V2 in DIFF V2's layout (twice Llama's query heads, Llama's KV heads and o_proj width)
    with its SwiGLU width reduced so that its parameter count matches Llama's (the extra query projection costs
    one hidden² matrix per layer). Tied embeddings, RoPE θ 10000, head_dim = hidden / heads."""
    from transformers import LlamaConfig

    from modeling_diff import DiffTransformerConfig

    head_dim = hidden // heads
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, head_dim=head_dim,
                  max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    llama = LlamaConfig(num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate, **common)
    v1 = DiffTransformerConfig(diff_version=1, num_attention_heads=heads, num_key_value_heads=heads,
                               intermediate_size=intermediate, **common)
    # V2: extra parameters per layer = hidden · (2·heads·head_dim − heads·head_dim) + hidden · heads (λ projection);
    # each unit of SwiGLU width costs 3 · hidden.
    extra = hidden * heads * head_dim + hidden * heads
    v2 = DiffTransformerConfig(diff_version=2, num_attention_heads=2 * heads, num_key_value_heads=heads,
                               intermediate_size=intermediate - round(extra / (3 * hidden)), **common)
    return {"llama": llama, "diff-v1": v1, "diff-v2": v2}


def init_model(config, seed: int):
    """A randomly initialised causal LM of `config` (sdpa attention), the same weights for the same seed."""
    import torch
    from transformers import AutoModelForCausalLM

    import modeling_diff  # noqa: F401  (registers the Auto classes)

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


# ----------------------------------------------------------------------------------------------------------------
# training: one recipe for every model


def paper_schedule(optimizer, steps: int, warmup: int, min_lr_ratio: float):
    """Linear warmup for `warmup` steps, then linear decay to `min_lr_ratio` of the peak at `steps` (the paper's)."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 1.0 - (1.0 - min_lr_ratio) * progress

    return LambdaLR(optimizer, factor)


def study_trainer(model, data, settings, learning_rate: float, seed: int, output_dir: str, callbacks: list,
                  quiet: bool, sequential: bool = False, decay_parameters=None):
    """The 🤗 Trainer with the studies' one recipe, for any model: AdamW with `settings.adam_betas` and
    `settings.weight_decay`, gradient clipping 1.0, the paper's schedule (`paper_schedule`), fp32, `settings.steps`
    steps of `settings.batch_size`. `sequential` feeds the data in its stored order instead of shuffled by `seed`.

    `decay_parameters`, when given, is a callable(model, the Trainer's own names) -> the names of the parameters
    that take weight decay, in place of the Trainer's grouping (`Trainer.get_decay_parameter_names`).
    """
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    class StudyTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            if sequential:
                return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
            return super()._get_train_sampler(train_dataset)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = paper_schedule(optimizer or self.optimizer, num_training_steps,
                                                   max(1, round(settings.warmup_fraction * num_training_steps)),
                                                   settings.min_lr_ratio)
            return self.lr_scheduler

        def get_decay_parameter_names(self, model) -> list[str]:
            names = super().get_decay_parameter_names(model)
            return names if decay_parameters is None else decay_parameters(model, names)

    args = TrainingArguments(
        output_dir=output_dir, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=learning_rate, adam_beta1=settings.adam_betas[0], adam_beta2=settings.adam_betas[1],
        weight_decay=settings.weight_decay, max_grad_norm=1.0, logging_steps=max(1, settings.steps // 20),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=quiet, dataloader_num_workers=0,
    )
    return StudyTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def reporter(queue, tag: str):
    """The `report(kind, value)` through which a job shows its progress on the study's bar (nothing without a queue:
    a job run on its own)."""

    def report(kind, value=None):
        if queue is not None:
            queue.put((tag, kind, value))

    return report


def progress_callback(report):
    """A TrainerCallback that reports every finished step and every logged loss through `report(kind, value)`."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report("step", 1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                report("loss", logs["loss"])

    return Progress()


# ----------------------------------------------------------------------------------------------------------------
# jobs in worker processes


def run_jobs(job_fn, jobs: list[dict], workers: int, total_steps: int, partial: Path, state: dict,
             finished: list[dict] = ()) -> list[dict]:
    """Run `job_fn(job, queue)` for every job, in `workers` spawned processes (in this one when workers ≤ 1).

    Shows one progress bar over `total_steps` training steps of all jobs (jobs report through the queue, see
    `_drain_one`), samples the load into `state["load_samples"]`, and after every finished job writes `state` with
    the `finished` results of earlier calls and this call's to `partial` (for ``--report-only`` after an
    interruption). Returns this call's results in job order.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="training steps (all runs)", unit="step", dynamic_ncols=True)
    results = []
    if workers <= 1:
        import queue as queue_module

        progress = queue_module.SimpleQueue()
        for job in jobs:
            results.append(job_fn(job, progress))
            _sample_load(state)
            while not progress.empty():
                _drain_one(progress.get(), bar)
            _write_partial(partial, [*finished, *results], state)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, wait

        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            progress = manager.Queue()
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = [pool.submit(job_fn, job, progress) for job in jobs]
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=1.0)
                    _sample_load(state)
                    while not progress.empty():
                        _drain_one(progress.get(), bar)
                    if done:
                        _write_partial(partial, [*finished, *(f.result() for f in futures if f.done())], state)
                results = [f.result() for f in futures]
    bar.close()
    return results


def _sample_load(state: dict):
    """Record the 1-minute load average (at most every 30 s): the report says how busy the shared machine was."""
    if hasattr(os, "getloadavg") and time.time() - state.get("_last_load", 0) >= 30:
        state["_last_load"] = time.time()
        state["load_samples"].append(round(os.getloadavg()[0], 2))


def _write_partial(partial: Path, results: list[dict], state: dict):
    """Keep the finished runs on disk while the study goes on (`partial`), for --report-only."""
    state = {k: v for k, v in state.items() if not k.startswith("_")}
    state.update(results=results, elapsed_seconds=time.time() - state["started"])
    partial.write_text(json.dumps(state, indent=1))


def _drain_one(message, bar):
    """Show one job's message on the shared bar: a finished step, its loss or accuracy, a phase, the job's end."""
    tag, kind, value = message
    if kind == "step":
        bar.update(value)
    elif kind == "loss":
        bar.set_postfix_str(f"{tag}: loss {value:.3f}")
    elif kind == "acc":
        bar.set_postfix_str(f"{tag}: accuracy {value:.0%}")
    elif kind == "phase":
        bar.set_postfix_str(f"{tag}: evaluating")
    elif kind == "done":
        bar.write(f"finished {tag}")


def finished_state(state: dict, results: list[dict], started: float) -> dict:
    """The study's state as saved in its JSON: private keys dropped, the runs and the wall time added."""
    state = {k: v for k, v in state.items() if not k.startswith("_") and k != "started"}
    return dict(state, results=results, wall_seconds=time.time() - started)


# ----------------------------------------------------------------------------------------------------------------
# statistics and report lines


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (None and NaN left out; std 0 for one value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(ours: list[float], base: list[float], higher_is_better: bool = True) -> str:
    """"better"/"worse" than the baseline only when the means differ by more than the sum of the two stds."""
    ours = [v for v in ours if v is not None and not math.isnan(v)]
    base = [v for v in base if v is not None and not math.isnan(v)]
    if not ours or not base:
        return "not measured"
    if min(len(ours), len(base)) < 2:
        return "not called (one seed)"
    (m1, s1), (m0, s0) = mean_std(ours), mean_std(base)
    if abs(m1 - m0) <= s1 + s0:
        return "no clear difference"
    return "better" if (m1 > m0) == higher_is_better else "worse"


def settings_from_dict(cls, data: dict):
    """A settings dataclass from its JSON form (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def machine_line() -> str:
    """The machine of a study report: CPU, cores, device, library versions."""
    info = machine_info()
    return (f"{info['cpu']}, {info['logical_cores']} logical CPUs, device: {info['gpu'] or 'CPU'}; Python "
            f"{info['python']}, torch {info['torch']}, transformers {info['transformers']}")


def load_line(samples: list[float]) -> str:
    """How busy the (shared) machine was during the run."""
    if not samples:
        return "not recorded by the script for this run (the machine is shared)."
    return (f"1-minute load average of the machine during the run (sampled every 30 s): mean "
            f"{statistics.fmean(samples):.1f}, max {max(samples):.1f}, on {os.cpu_count()} cores (the machine is "
            "shared).")
