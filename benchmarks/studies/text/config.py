"""The text study's settings: the default study, `--smoke` (seconds, for the tests) and `--scale` (for a GPU), and
its three models at equal parameters."""

import os
from dataclasses import dataclass

from benchmarks.harness.models import equal_parameter_configs


@dataclass
class Settings:
    """Everything that defines a study run; written verbatim into the report."""

    vocab_size: int = 1024  # byte-level BPE trained on the training texts
    hidden_size: int = 128
    num_hidden_layers: int = 4
    heads: int = 8  # Llama's query heads (= KV heads); V1 uses the same numbers, V2 twice the query heads
    intermediate_size: int = 336  # SwiGLU width of Llama and V1 (≈ 8/3 · hidden); V2's is reduced to match params
    seq_len: int = 256  # training sequence length
    batch_size: int = 16
    steps: int = 700
    learning_rate: float = 1.5e-3
    warmup_fraction: float = 0.1  # linear warmup over this share of steps, then linear decay to min_lr_ratio
    min_lr_ratio: float = 0.04  # the paper decays 3.2e-4 -> 1.28e-5, i.e. to 4% of the peak
    adam_betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.1
    needle_fraction: float = 0.5  # share of training sequences that are needle examples (the rest: plain text)
    train_max_needles: int = 6
    eval_needles: tuple = (1, 2, 4, 6)
    eval_context_lens: tuple = (128, 256, 512, 1024)
    eval_samples: int = 40  # needle examples per (N, context length) cell, per model and seed
    noise_samples: int = 40
    noise_context_len: int = 256
    outlier_batches: int = 2
    seeds: tuple = (0, 1, 2)
    workers: int = 2
    threads_per_worker: int = 1


PRESETS = {
    "default": Settings(),
    "smoke": Settings(vocab_size=300, hidden_size=32, num_hidden_layers=2, heads=4, intermediate_size=64,
                      seq_len=192, batch_size=4, steps=4, train_max_needles=2, eval_needles=(1, 2),
                      eval_context_lens=(192, 256), eval_samples=2, noise_samples=2, noise_context_len=192,
                      outlier_batches=1, seeds=(0,), workers=1, threads_per_worker=2),
    "scale": Settings(vocab_size=4096, hidden_size=512, num_hidden_layers=8, heads=8, intermediate_size=1365,
                      seq_len=1024, batch_size=32, steps=5000, learning_rate=6e-4, eval_context_lens=(512, 1024,
                      2048, 4096), eval_samples=100, noise_samples=100, noise_context_len=1024, outlier_batches=4,
                      workers=1, threads_per_worker=os.cpu_count() or 1),
}


def model_configs(settings: Settings, vocab_size: int) -> dict:
    """Llama, V1 and V2 at equal parameters (`equal_parameter_configs`) for these settings."""
    return equal_parameter_configs(settings.hidden_size, settings.num_hidden_layers, settings.heads,
                                   settings.intermediate_size, vocab_size, max(settings.eval_context_lens) * 2)
