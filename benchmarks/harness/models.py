"""Every model the benchmarks and studies build, from one place.

    llama       transformers.LlamaForCausalLM
    diffllama   transformers.DiffLlamaForCausalLM
    diff-v1     modeling_diff.DiffTransformerForCausalLM, diff_version=1 (the paper)
    diff-v2     modeling_diff.DiffTransformerForCausalLM, diff_version=2 (DIFF V2)

`model_config` gives the config of one of them from shared config numbers (the speed benchmarks: heads are counted
the same way in all four, query heads = softmax maps, `head_dim`-wide KV heads, so the numbers compare directly);
`equal_parameter_configs` gives the training studies' three at equal parameter count; `init_model` is the one
constructor (a seed, then the config's causal LM); `build_model` = `init_model(model_config(...))` in eval mode.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAMES = ("llama", "diffllama", "diff-v1", "diff-v2")
LABELS = {"llama": "Llama", "diffllama": "DiffLlama", "diff-v1": "Diff V1", "diff-v2": "Diff V2"}


def add_model_arguments(parser: argparse.ArgumentParser, threads: int = 2) -> None:
    """The model-size flags the speed benchmarks share (hidden 512, 8 / 4 heads, 6 layers) and `--threads`."""
    parser.add_argument("--layers", type=int, default=6, help="decoder layers of every model (default: 6)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default: 512)")
    parser.add_argument("--heads", type=int, default=8, help="query heads, Llama's counting (default: 8)")
    parser.add_argument("--kv-heads", type=int, default=4, help="KV heads, Llama's counting (default: 4)")
    parser.add_argument("--intermediate", type=int, default=1376, help="MLP width (default: 1376)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default: 8192)")
    parser.add_argument("--threads", type=int, default=threads, help=f"torch intra-op threads (default: {threads})")


def tiny_model_arguments(args) -> None:
    """The `--quick` model sizes (hidden 64, 2 layers, vocab 256) and 1 thread: seconds, numbers that mean nothing.

    One thread avoids OpenMP barriers, which makes a smoke run robust on a busy machine.
    """
    args.hidden, args.layers, args.intermediate, args.vocab, args.threads = 64, 2, 176, 256, 1


def config_numbers(args, max_positions: int, **overrides) -> dict:
    """The config numbers shared by all four models, from the flags of `add_model_arguments` (or any object with
    `vocab`, `hidden`, `intermediate`, `layers`, `heads`, `kv_heads`)."""
    numbers = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                   num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                   max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0)
    return {**numbers, **overrides}


def modeling_at(revision: str):
    """The modeling module of `modeling_diff` as it was at git `revision`, imported under another name.

    For before/after measurements in one interleaved run: the two model files of that commit are copied into a
    temporary package, so the old and the current classes can live side by side in one process.
    """
    name = "modeling_diff_at_" + re.sub(r"\W", "_", revision)
    if name not in sys.modules:
        folder = Path(tempfile.mkdtemp(prefix="modeling_diff_at_")) / name
        folder.mkdir()
        atexit.register(shutil.rmtree, folder.parent, True)
        for file in ("configuration_diff_transformer.py", "modeling_diff_transformer.py"):
            shown = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{revision}:modeling_diff/{file}"],
                capture_output=True, text=True, check=False,
            )
            if shown.returncode != 0:
                raise SystemExit(f"error: cannot read modeling_diff/{file} at git revision {revision!r}")
            (folder / file).write_text(shown.stdout)
        (folder / "__init__.py").write_text("")
        # registered as a package whose modules are that folder's, so sys.path is left as it is
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return importlib.import_module(name + ".modeling_diff_transformer")


def model_config(name: str, numbers: dict, revision: str | None = None):
    """The config of one of `MODEL_NAMES` from `numbers`; with `revision`, a DiffTransformer config of the modeling
    code of that git revision (`modeling_at`)."""
    from transformers import DiffLlamaConfig, LlamaConfig

    from modeling_diff import DiffTransformerConfig

    if name == "llama":
        return LlamaConfig(**numbers)
    if name == "diffllama":
        return DiffLlamaConfig(**numbers)
    if name in ("diff-v1", "diff-v2"):
        config_class = DiffTransformerConfig if revision is None else modeling_at(revision).DiffTransformerConfig
        return config_class(diff_version=int(name[-1]), **numbers)
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")


def equal_parameter_configs(hidden: int, layers: int, heads: int, intermediate: int, vocab: int,
                            max_positions: int) -> dict:
    """The training studies' three configs: Llama; V1 with Llama's numbers (the paper's heads: half as many
    differential heads, each twice as wide in value); V2 in DIFF V2's layout (twice Llama's query heads, Llama's KV
    heads and o_proj width) with its SwiGLU width reduced so that its parameter count matches Llama's (the extra
    query projection costs one hidden² matrix per layer). Tied embeddings, RoPE θ 10000, head_dim = hidden / heads."""
    head_dim = hidden // heads
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, head_dim=head_dim,
                  max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    # V2: extra parameters per layer = hidden · (2·heads·head_dim − heads·head_dim) + hidden · heads (λ projection);
    # each unit of SwiGLU width costs 3 · hidden.
    extra = hidden * heads * head_dim + hidden * heads
    return {
        "llama": model_config("llama", dict(common, num_attention_heads=heads, num_key_value_heads=heads,
                                            intermediate_size=intermediate)),
        "diff-v1": model_config("diff-v1", dict(common, num_attention_heads=heads, num_key_value_heads=heads,
                                                intermediate_size=intermediate)),
        "diff-v2": model_config("diff-v2", dict(common, num_attention_heads=2 * heads, num_key_value_heads=heads,
                                                intermediate_size=intermediate - round(extra / (3 * hidden)))),
    }


def init_model(config, seed: int = 0, attn_implementation: str = "sdpa", model_class=None):
    """The one constructor: `config`'s causal LM (`AutoModelForCausalLM`, or `model_class`), randomly initialised
    after `torch.manual_seed(seed)`, so the same config and seed give the same weights."""
    from transformers import AutoModelForCausalLM

    import modeling_diff  # noqa: F401  (registers the Auto classes)

    torch.manual_seed(seed)
    if model_class is None:
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model_class._from_config(config, attn_implementation=attn_implementation)


def build_model(
    name: str, numbers: dict, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0, revision=None
):
    """Build one of `MODEL_NAMES` from `numbers`, randomly initialised with `seed`, in `dtype` and eval mode.

    With `revision`, a DiffTransformer is built from the modeling code of that git revision (`modeling_at`).
    """
    old = revision is not None and name in ("diff-v1", "diff-v2")
    model_class = modeling_at(revision).DiffTransformerForCausalLM if old else None
    model = init_model(model_config(name, numbers, revision if old else None), seed, attn_implementation, model_class)
    return model.to(dtype=dtype).eval()


def parameter_count(model) -> int:
    """Parameters of `model` (a tied weight counted once)."""
    return sum(p.numel() for p in model.parameters())


def random_ids(vocab: int, length: int, seed: int) -> torch.Tensor:
    """A (1, length) batch of token ids, the same for every model."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, length), generator=generator)


def cache_bytes(cache) -> int:
    """Bytes held by every key and value tensor of a transformers cache."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None and tensor.numel():
                total += tensor.numel() * tensor.element_size()
    return total
