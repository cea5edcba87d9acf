"""The recall study's settings: the default study and `--smoke`, the MQAR vocabulary and difficulty grid, and its
three models at equal parameters for a width."""

from dataclasses import dataclass

from benchmarks.harness.models import equal_parameter_configs

PAD, BOS = 0, 1
FIRST_KEY = 2  # keys, then values, then fillers: three disjoint id ranges after PAD and BOS


@dataclass
class Settings:
    """Everything that defines a study run; written verbatim into the report and the JSON."""

    widths: tuple = (64,)  # hidden sizes; head_dim = width / heads (a second width did not fit the hour on 2 cores)
    num_hidden_layers: int = 2
    heads: int = 4  # Llama's query heads (= KV heads); V1 the same numbers, V2 twice the query heads
    num_keys: int = 16
    num_values: int = 8
    num_fillers: int = 32
    pairs: tuple = (2, 6, 12)  # key–value pairs in the context, queried or not
    context_lens: tuple = (16, 40)  # tokens of context (pairs + filler) before the queries
    queries: int = 4  # queried keys per sequence (the other pairs are distractors)
    batch_size: int = 64
    steps: int = 2000
    learning_rates: tuple = (1e-3, 3e-3, 1e-2)
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.04
    adam_betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.1
    seeds: tuple = (0, 1, 2)
    eval_every: int = 100  # steps between accuracy checks on the curve set
    curve_samples: int = 16  # sequences per cell for the training curve
    eval_samples: int = 128  # sequences per cell for the final accuracy
    attention_samples: int = 32  # sequences per cell for the attention shares
    workers: int = 2
    threads_per_worker: int = 1

    fused_pairs: bool = True  # each context pair is one token (key, value); the query is a key token

    @property
    def vocab_size(self) -> int:
        pair_tokens = self.num_keys * self.num_values if self.fused_pairs else 0
        return FIRST_KEY + self.num_keys + self.num_values + self.num_fillers + pair_tokens

    @property
    def pair_width(self) -> int:
        """Tokens per context pair: 1 when fused, else 2 (key, value)."""
        return 1 if self.fused_pairs else 2

    @property
    def seq_len(self) -> int:
        return 1 + max(self.context_lens) + 2 * self.queries

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(pairs, context length) cells, easiest first: fewer pairs, then shorter context."""
        return [(p, c) for p in self.pairs for c in self.context_lens if self.pair_width * p <= c]


PRESETS = {
    "default": Settings(),
    "smoke": Settings(widths=(32,), heads=2, pairs=(2, 4), context_lens=(16, 32), queries=2, batch_size=4, steps=6,
                      learning_rates=(1e-3, 3e-3), seeds=(0,), eval_every=3, curve_samples=2, eval_samples=4,
                      attention_samples=2, workers=1, threads_per_worker=2),
}


def model_config(settings: Settings, width: int, name: str):
    """The study's config for `name` at `width`: the harness's three layouts (equal parameters within 2%), SwiGLU
    8/3 · width."""
    return equal_parameter_configs(width, settings.num_hidden_layers, settings.heads, round(8 / 3 * width),
                                   settings.vocab_size, settings.seq_len * 2)[name]
