"""Convert a Llama, DiffLlama or Motif-2.6B checkpoint into a DiffTransformer folder, tensor by tensor.

    from modeling_diff_conversion import convert
    report = convert("path/or/hub-id", "out-dir", variant="v2")
    print(report.summary())

The output folder holds sharded safetensors, `config.json` with an `auto_map`, the modeling code files (so it loads
with `trust_remote_code=True` without this package), `generation_config.json`, the source's tokenizer and a
`README.md` model card. Everything is written into a temporary sibling folder that is renamed at the very end, so an
interrupted or failed conversion leaves nothing behind.
"""

import math
import os
import time
from pathlib import Path

import torch

from modeling_diff import DiffTransformerConfig

from .mapping import map_diffllama_to_v1, map_llama_to_v1, map_llama_to_v2
from .model_card import write_model_card
from .motif import convert_motif, open_motif
from .output import atomic_output_dir, check_apart, check_output_dir, output_lock
from .source import ConversionError, Source, expected_shapes, open_source
from .verify import verify
from .writing import DTYPES, ConversionReport, ShardWriter, checked_tensors, keep_tokenizer_code, write_model_files

COPIED_FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
]


def target_config(source: Source, variant: str) -> DiffTransformerConfig:
    """The DiffTransformerConfig a source converts into (heads counted as Llama counts them)."""
    cfg = source.config
    values = {name: getattr(cfg, name) for name in COPIED_FIELDS if getattr(cfg, name, None) is not None}
    values["head_dim"] = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    if variant == "v2":
        # every Llama head becomes a pair of query heads: twice the query heads, the same KV heads
        return DiffTransformerConfig(
            diff_version=2, num_attention_heads=2 * heads, num_key_value_heads=kv_heads, **values
        )
    if kv_heads % 2:
        raise ConversionError(
            f"variant v1 pairs KV heads as (k1, k2), but this {source.architecture} has {kv_heads} KV heads "
            f"(odd); use --variant v2, which keeps the model's function exactly"
        )
    extra = {"lambda_std_dev": cfg.lambda_std_dev} if source.architecture == "DiffLlamaForCausalLM" else {}
    return DiffTransformerConfig(
        diff_version=1, num_attention_heads=heads, num_key_value_heads=kv_heads, **values, **extra
    )


def lambda_vector_factory(config: DiffTransformerConfig):
    """The four λ vectors of each V1 layer, drawn N(0, lambda_std_dev) from a fixed seed per layer (reproducible)."""

    def vectors(layer: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(layer)
        return {
            f"lambda_{n}": torch.randn(config.head_dim, generator=g) * config.lambda_std_dev
            for n in ("q1", "k1", "q2", "k2")
        }

    return vectors


def convert(
    source: str,
    output_dir: str,
    variant: str | None = None,
    dtype: str = "auto",
    gguf_file: str | None = None,
    verify_output: bool = True,
    force: bool = False,
    max_shard_bytes: int | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert SOURCE into a DiffTransformer folder at OUTPUT_DIR and return a `ConversionReport`.

    Args:
        source: a local model folder, a Hub id (resolved through the HF cache) or a `.gguf` file.
        output_dir: where the converted model goes; must not exist or be empty unless `force`.
        variant: "v2" (default for Llama: keeps the function exactly) or "v1" (the paper's layout; the default
            and the only choice for DiffLlama, converted exactly).
        dtype: "auto" keeps the source dtype; or "float32", "bfloat16", "float16".
        gguf_file: the name of a GGUF file inside a folder or Hub repo given as `source`.
        verify_output: reload the output and compare it with the source (logits, greedy tokens, perplexity).
        force: replace a non-empty `output_dir`.
        max_shard_bytes: the largest output shard; defaults to half the source's largest shard (at least
            16 MiB), which keeps peak memory near 1.5 source shards.
        progress: show a progress bar over tensors.

    Raises:
        ConversionError: a one-line message about bad input, or a function-preserving conversion that failed
            verification. Nothing is left at `output_dir` in either case.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if variant not in (None, "v1", "v2"):
        raise ConversionError(f"unknown variant {variant!r}; choose v2 or v1")
    check_apart(output_dir, {"SOURCE": source})
    check_output_dir(output_dir, force)  # before the (slow) source is opened
    with output_lock(output_dir):  # one run per output; its folder proven writable
        return _convert(source, output_dir, variant, dtype, gguf_file, verify_output, force, max_shard_bytes, progress)


def _convert(source, output_dir, variant, dtype, gguf_file, verify_output, force, max_shard_bytes, progress):
    """`convert` once its output is checked and locked."""
    started = time.perf_counter()
    output = Path(os.path.abspath(Path(output_dir).expanduser()))
    motif = open_motif(source, gguf_file)  # Motif-2.6B imports exactly by its own path (conversion/motif.py)
    if motif is not None:
        check_apart(output_dir, {"SOURCE": motif.folder})
        return convert_motif(motif, output_dir, variant, dtype, verify_output, force, max_shard_bytes, progress)
    src = open_source(source, gguf_file)
    # where a Hub id or a .gguf file resolved to (the HF cache, the GGUF's folder)
    check_apart(output_dir, {"SOURCE": src.folder / (src.gguf_file or "") if src.folder else None})
    if variant is None:
        variant = "v1" if src.architecture == "DiffLlamaForCausalLM" else "v2"
    if src.architecture == "DiffLlamaForCausalLM" and variant != "v1":
        raise ConversionError("DiffLlama converts to --variant v1 only (it already is the paper's V1 attention)")
    if getattr(src.config, "attention_dropout", 0.0):
        raise ConversionError("the source has attention_dropout > 0; set it to 0 in its config.json first")
    config = target_config(src, variant)
    preserves = variant == "v2" or src.architecture == "DiffLlamaForCausalLM"

    report = ConversionReport(
        source=source,
        output_dir=str(output),
        variant=variant,
        architecture=src.architecture,
        preserves_function=preserves,
        dtype=dtype,
        license=src.license,
        base_model=src.base_model,
    )
    if not preserves:
        report.notes.append(
            "v1 from Llama cannot preserve the function: two Llama heads now share one map pair and one "
            "per-head norm. Fine-tune it (diff-transformer train ... --distill-from SOURCE) before use."
        )

    with atomic_output_dir(output, force=force, written_by="diff-transformer convert") as tmp:
        report.n_tensors, report.n_shards, out_dtype = _write_weights(
            src, config, variant, dtype, tmp, max_shard_bytes, progress
        )
        report.dtype = str(out_dtype).replace("torch.", "")
        _write_metadata(src, config, tmp, out_dtype)
        if verify_output:
            n_params = sum(math.prod(shape) for shape in expected_shapes(src.config).values())
            report.verification = verify(src, tmp, preserves, weight_dtype=out_dtype, n_params=n_params)
        write_model_card(tmp / "README.md", report, src, config)
        if report.verification is not None and preserves and not report.verification.passed:
            raise ConversionError(
                f"verification failed: the converted model does not compute the source's function "
                f"(max |Δlogit| {report.verification.max_abs_logit_diff:.3g}, greedy agreement "
                f"{report.verification.greedy_agreement:.1%}); nothing was written"
            )
    report.seconds = time.perf_counter() - started
    return report


def _write_weights(src: Source, config, variant, dtype, folder: Path, max_shard_bytes, progress):
    expected = expected_shapes(src.config)
    if src.architecture == "DiffLlamaForCausalLM":
        mapper = lambda name, t: map_diffllama_to_v1(name, t, src.config)  # noqa: E731
    elif variant == "v2":
        mapper = lambda name, t: map_llama_to_v2(name, t, src.config)  # noqa: E731
    else:
        lambdas = lambda_vector_factory(config)
        mapper = lambda name, t: map_llama_to_v1(name, t, src.config, lambdas)  # noqa: E731

    # Peak memory is one source shard (its mmapped pages) + the output buffer + one tensor in flight. Output shards
    # of half the largest source shard keep that near 1.5 source shards (benchmarks/system/convert_memory.py measures
    # it). A GGUF source is dequantised in memory anyway, so its output uses transformers' usual shard size.
    default = 2 * 2**30 if src.gguf_file else max(src.largest_shard_bytes // 2, 16 * 2**20)
    max_bytes = max_shard_bytes or default
    writer = ShardWriter(folder, max_bytes)
    out_dtype, n_tensors = None, 0
    for name, tensor in checked_tensors(src, expected, dtype, progress, "converting tensors"):
        out_dtype = out_dtype or tensor.dtype
        for out_name, out_tensor in mapper(name, tensor).items():
            writer.add(out_name, out_tensor)
        n_tensors += 1
    return n_tensors, writer.finish(), out_dtype


def _write_metadata(src: Source, config: DiffTransformerConfig, folder: Path, out_dtype):
    from transformers import GenerationConfig

    write_model_files(config, folder, out_dtype)

    generation = src.load_generation_config() or GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)
    tokenizer = src.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        keep_tokenizer_code(src.folder, folder)


