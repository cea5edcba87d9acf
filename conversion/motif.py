"""Motif-2.6B checkpoints -> DiffTransformer V1 folders, exactly (`convert` dispatches Motif checkpoints here).

Motif-2.6B (Motif Technologies) is the paper's V1 differential attention in this project's own layout: adjacent
query heads 2i, 2i+1 are q1, q2 of differential head i, adjacent key heads 2j, 2j+1 are k1, k2 of KV group j whose
value is cat(v_2j, v_2j+1), the per-head norm has a gain, and its tensors carry the names this project's V1
checkpoints use (`self_attn.lambda_q1`, `self_attn.subln.weight`). What differs is configuration: a learned PolyNorm
MLP activation (`mlp.act_fn.weight`, `mlp.act_fn.bias`), λ_init shifted by one layer, a per-head norm epsilon of its
own (`attn_rms_norm_eps`) and, with `use_bias`, biases. So every tensor maps to itself, streamed one at a time; the
config is translated; and the result is checked against `modeling_diff_conversion.motif_reference`, Motif's forward
written from its public ports, never by running Motif's own code.
"""

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM

from .model_card import render_model_card
from .motif_reference import ROPE_TYPES, causal_lm_logits
from .output import atomic_output_dir
from .source import (
    TOKENIZER_FILES,
    ConversionError,
    _license_from_readme,
    _read_shard,
    check_config_sizes,
    download_snapshot,
    expected_shapes,
)
from .verify import _inputs, compare_runs, verification_dtype
from .writing import (
    DTYPES,
    ConversionReport,
    ShardWriter,
    checked_tensors,
    keep_tokenizer_code,
    write_model_files,
)

MOTIF_ARCHITECTURES = ("MotifForCausalLM",)
# what vLLM's port reads without a default: a Motif-2.6B config.json has every one
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "rms_norm_eps",
    "attn_rms_norm_eps",
)
ACTIVATIONS = ("poly_norm", "silu")  # Motif-2.6B's, and the one other activation the reference implements
# Hub files of a Motif repo: Llama's, and the licence text and tokenizer code (copied, never run)
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.bin",
    "*.model",
    "*.txt",
    "*.jinja",
    "README.md",
    "LICENSE*",
    "tokenization_*.py",
]
EXTRA_TOKENIZER_FILES = ["added_tokens.json"]
MOTIF_3_KEYS = {  # Motif-3's mixture of experts, latent attention and friends, with the value that means "off"
    "num_experts": 0,
    "q_lora_rank": 0,
    "kv_lora_rank": 0,
    "mhc_enabled": False,
    "diff_v2": False,
    "headwise_attn_output_gate": False,
    "elementwise_attn_output_gate": False,
    "num_nextn_predict_layers": 0,
    "polynorm_output_scale": 1.0,
    "polynorm_output_scale_per_layer": {},
}


def is_motif(raw: dict) -> bool:
    """Whether a config.json (as a dict) names one of Motif Technologies' causal LMs."""
    architecture = (raw.get("architectures") or [None])[0]
    return architecture in MOTIF_ARCHITECTURES or str(raw.get("model_type", "")).lower() == "motif"


def check_motif_config(raw: dict, where: str) -> None:
    """Refuse, in one sentence, a Motif config that is not Motif-2.6B's architecture or lacks what it needs."""
    heads = raw.get("num_attention_heads")
    noise, k_ratio = raw.get("num_noise_heads"), raw.get("k_ratio")
    if (noise not in (None, 0) and noise * 2 != heads) or k_ratio not in (None, 1):
        raise ConversionError(
            f"{where} is a grouped differential attention model (Motif-2-12.7B style: num_noise_heads={noise} of "
            f"{heads} query heads, k_ratio={k_ratio}), whose noise heads each serve a group of signal heads: that is "
            "not the paper's one-to-one V1 pairing this model family implements, so it cannot be imported"
        )
    motif_3 = {key: raw[key] for key, off in MOTIF_3_KEYS.items() if raw.get(key, off) not in (off, None)}
    if motif_3 or raw.get("attention_cls", "basic") != "basic":
        found = motif_3 or {"attention_cls": raw["attention_cls"]}
        raise ConversionError(
            f"{where} is a Motif-3 style model ({', '.join(f'{k}={v!r}' for k, v in found.items())}: mixture of "
            "experts, latent attention or other parts Motif-2.6B does not have): a different architecture from "
            "the dense differential attention this model family implements, so it cannot be imported"
        )
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise ConversionError(f"{where} lacks {', '.join(missing)}, which every Motif-2.6B config.json has")
    check_config_sizes(raw, where)
    if raw["hidden_act"] not in ACTIVATIONS:
        raise ConversionError(
            f"{where} has hidden_act={raw['hidden_act']!r}; a Motif import supports {' and '.join(ACTIVATIONS)}"
        )
    if raw.get("use_sliding_window"):
        raise ConversionError(
            f"{where} sets use_sliding_window: none of Motif-2.6B's public ports implements a sliding window, so "
            "there is no agreed function to import; set it to false if the checkpoint was trained without one"
        )
    if raw.get("partial_rotary_factor", 1) != 1:
        raise ConversionError(f"{where} rotates part of each head (partial_rotary_factor); Motif-2.6B rotates all")
    if raw.get("attention_dropout", 0):
        raise ConversionError(f"{where} has attention_dropout > 0; set it to 0 in its config.json first")
    output_bias = bool(raw.get("attention_bias") or raw.get("use_bias"))
    if bool(raw.get("qkv_bias", output_bias)) != output_bias:
        raise ConversionError(
            f"{where} has biases on q/k/v but not on o_proj (or the reverse); this model family biases all four or "
            "none"
        )


def motif_rope_parameters(raw: dict) -> dict:
    """transformers' `rope_parameters` for Motif's `rope_theta` and `rope_scaling` (its `type` as `rope_type`)."""
    scaling = dict(raw.get("rope_scaling") or {})
    rope_type = scaling.pop("type", None) or scaling.pop("rope_type", None) or "default"
    if raw.get("original_max_position_embeddings") and rope_type != "default":
        scaling.setdefault("original_max_position_embeddings", raw["original_max_position_embeddings"])
    return {"rope_type": rope_type, "rope_theta": raw.get("rope_theta", 10000.0), **scaling}


def motif_target_config(raw: dict, where: str = "config.json") -> DiffTransformerConfig:
    """The DiffTransformer V1 config of a Motif-2.6B config.json (a dict). Heads are counted as Motif counts them."""
    check_motif_config(raw, where)
    heads = raw["num_attention_heads"]
    use_bias = bool(raw.get("use_bias"))
    values = dict(
        diff_version=1,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        hidden_act=raw["hidden_act"],
        max_position_embeddings=raw.get("max_position_embeddings", 8192),
        initializer_range=raw.get("initializer_range", 0.02),
        rms_norm_eps=raw["rms_norm_eps"],
        head_norm_eps=raw["attn_rms_norm_eps"],
        lambda_init_layer_offset=1,  # Motif's λ_init: 0.8 - 0.6 exp(-0.3 (layer_idx - 1)), layer_idx from 0
        rope_parameters=motif_rope_parameters(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias") or use_bias),
        mlp_bias=use_bias,
    )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if raw.get(name) is not None:
            values[name] = raw[name]
    try:
        return DiffTransformerConfig(**values)
    except (ValueError, TypeError) as err:
        raise ConversionError(f"{where} cannot become a DiffTransformer V1 config: {str(err).splitlines()[0]}")


def motif_expected_shapes(config: DiffTransformerConfig) -> dict[str, tuple]:
    """Every tensor a Motif-2.6B checkpoint of this (translated) config holds, under Motif's names, with its shape:
    a Llama's (biases included) and, per layer, the four λ vectors, the head norm's gain and PolyNorm's weights."""
    shapes = expected_shapes(config)
    d = config.head_dim
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.subln.weight"] = (2 * d,)
        shapes.update({p + f"self_attn.lambda_{n}": (d,) for n in ("q1", "k1", "q2", "k2")})
        if config.hidden_act == "poly_norm":
            shapes.update({p + "mlp.act_fn.weight": (3,), p + "mlp.act_fn.bias": (1,)})
    return shapes


class TensorReader:
    """Reads one tensor of a checkpoint by name, as float64 after rounding it to `dtype` when given (as an import to
    that dtype rounds it): the reference's view of the source. Safetensors are read lazily; a .bin shard is
    memory-mapped once."""

    def __init__(self, shards: list[Path], dtype: torch.dtype | None):
        self.dtype = dtype
        self.shard_of: dict[str, Path] = {}
        self.bins: dict[Path, dict] = {}
        for shard in shards:
            for name in self.names(shard):
                self.shard_of[name] = shard

    def names(self, shard: Path) -> list[str]:
        if shard.suffix == ".bin":
            return list(self.bin(shard))
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            return list(f.keys())

    def bin(self, shard: Path) -> dict:
        if shard not in self.bins:
            self.bins[shard] = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
        return self.bins[shard]

    def __call__(self, name: str, missing_ok: bool = False, rows: slice | torch.Tensor | None = None):
        """Tensor `name` (or its `rows`: a slice is read alone, as the vocabulary chunks of an LM head are)."""
        shard = self.shard_of.get(name)
        if shard is None:
            if missing_ok:
                return None
            raise ConversionError(f"the checkpoint has no tensor {name!r}")
        if shard.suffix == ".bin":
            tensor = self.bin(shard)[name]
        else:
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as f:
                tensor = f.get_slice(name)[rows] if isinstance(rows, slice) else f.get_tensor(name)
        if rows is not None and not (isinstance(rows, slice) and shard.suffix != ".bin"):
            tensor = tensor[rows]
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor.double()


@dataclass
class MotifSource:
    """An opened Motif-2.6B checkpoint: its config.json (a dict), its DiffTransformer config and its weight files."""

    name: str  # what the user passed
    folder: Path
    raw: dict  # config.json as written by Motif
    config: DiffTransformerConfig  # what it becomes
    shards: list[Path] = field(default_factory=list)
    license: str | None = None
    license_files: list[Path] = field(default_factory=list)
    base_model: str | None = None

    architecture = "MotifForCausalLM"

    @property
    def largest_shard_bytes(self) -> int:
        return max((p.stat().st_size for p in self.shards), default=0)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for shard in self.shards:
            yield from _read_shard(shard)

    @cached_property
    def tokenizer(self):
        """The source tokenizer when it loads without running code from the checkpoint, else None."""
        from transformers import AutoTokenizer

        if not any((self.folder / f).exists() for f in TOKENIZER_FILES):
            return None
        try:
            return AutoTokenizer.from_pretrained(self.folder, config=self.config, trust_remote_code=False)
        except Exception:  # a tokenizer that needs its own code: its files are copied, it is not run here
            return None


def read_motif_config(folder: Path) -> dict | None:
    """config.json of `folder` as a dict when it names a Motif model, else None."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # the Llama path reports it
    return raw if isinstance(raw, dict) and is_motif(raw) else None


def open_motif(source: str, gguf_file: str | None = None) -> MotifSource | None:
    """SOURCE (a folder or a Hub id) opened as a Motif checkpoint, or None when it is not one.

    Raises a one-line `ConversionError` for a Motif checkpoint that cannot be imported (a grouped or Motif-3 model,
    missing config keys or weights).
    """
    if gguf_file is not None or source.endswith(".gguf"):
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists():
        return None
    else:
        try:
            folder = download_snapshot(source, ["config.json"])
        except ConversionError:
            return None  # the Llama path says why
    raw = read_motif_config(folder)
    if raw is None:
        return None
    if not path.exists():  # a Hub id: the rest of the repo (weights, tokenizer, licence) comes now
        folder = download_snapshot(source, HUB_PATTERNS)
    config = motif_target_config(raw, f"{source}/config.json")
    return MotifSource(
        name=source,
        folder=folder,
        raw=raw,
        config=config,
        shards=weight_files(folder),
        license=_license_from_readme(folder / "README.md"),
        license_files=sorted(p for p in folder.glob("LICENSE*") if p.is_file()),
        base_model=None if path.exists() else source,
    )


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files in order (safetensors preferred), or a one-line error."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise ConversionError(f"the shard index of {folder} names missing files: {', '.join(missing)}")
            return shards
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise ConversionError(f"no weights in {folder}: expected model.safetensors, a sharded index or pytorch_model.bin")


def convert_motif(
    src: MotifSource,
    output_dir: str,
    variant: str | None = None,
    dtype: str = "auto",
    verify_output: bool = True,
    force: bool = False,
    max_shard_bytes: int | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Import an opened Motif-2.6B checkpoint as a DiffTransformer V1 folder at OUTPUT_DIR (see `convert`, which checks
    OUTPUT_DIR against the inputs first)."""
    started = time.perf_counter()
    if variant not in (None, "v1"):
        raise ConversionError("Motif-2.6B converts to --variant v1 only (it already is the paper's V1 attention)")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    rope_type = src.config.rope_parameters["rope_type"]
    if verify_output and rope_type not in ROPE_TYPES:
        raise ConversionError(
            f"{src.name} uses rope_scaling type {rope_type!r}, which the independent reference that verifies a "
            f"Motif import does not implement ({', '.join(ROPE_TYPES)}); pass --no-verify to import it unchecked"
        )
    output = Path(output_dir).expanduser().resolve()
    report = ConversionReport(
        source=src.name,
        output_dir=str(output),
        variant="v1",
        architecture=src.architecture,
        preserves_function=True,
        dtype=dtype,
        license=src.license,
        base_model=src.base_model,
    )
    with atomic_output_dir(output, force=force) as tmp:
        report.n_tensors, report.n_shards, out_dtype = write_weights(src, dtype, tmp, max_shard_bytes, progress)
        report.dtype = str(out_dtype).replace("torch.", "")
        write_metadata(src, tmp, out_dtype)
        if verify_output:
            n_params = sum(math.prod(shape) for shape in motif_expected_shapes(src.config).values())
            report.verification = verify_motif(src, tmp, n_params, round_to=DTYPES.get(dtype))
            report.notes.append(
                "verified against modeling_diff_conversion.motif_reference (Motif-2.6B's forward as its public ports "
                "compute it), not against Motif's own modeling code"
            )
        write_motif_model_card(tmp / "README.md", report, src)
        if report.verification is not None and not report.verification.passed:
            v = report.verification
            raise ConversionError(
                f"verification failed: the imported model does not compute Motif's function (max |Δlogit| "
                f"{v.max_abs_logit_diff:.3g}, greedy agreement {v.greedy_agreement:.1%}); nothing was written"
            )
    report.seconds = time.perf_counter() - started
    return report


def write_weights(src: MotifSource, dtype: str, folder: Path, max_shard_bytes: int | None, progress: bool):
    """Stream the checkpoint tensor by tensor into output shards; every tensor keeps its name and values."""
    expected = motif_expected_shapes(src.config)
    # peak memory: one source shard's mapped pages + one output shard + the tensor in flight (as for a Llama)
    writer = ShardWriter(folder, max_shard_bytes or max(src.largest_shard_bytes // 2, 16 * 2**20))
    out_dtype, n_tensors = None, 0
    for name, tensor in checked_tensors(src, expected, dtype, progress, "importing tensors"):
        if out_dtype is None or name.endswith("embed_tokens.weight"):
            out_dtype = tensor.dtype  # the dtype of the model's matrices (λ vectors may be float32)
        writer.add(name, tensor)
        n_tensors += 1
    return n_tensors, writer.finish(), out_dtype


def write_metadata(src: MotifSource, folder: Path, out_dtype: torch.dtype) -> None:
    """config.json (+ auto_map) and the modeling code, the generation config, the tokenizer and licence files as
    the source has them (copied, not loaded: a tokenizer with its own code is never run here)."""
    from transformers import GenerationConfig

    config = DiffTransformerConfig.from_dict(src.config.to_dict())
    write_model_files(config, folder, out_dtype)
    if (src.folder / "generation_config.json").is_file():
        shutil.copy(src.folder / "generation_config.json", folder / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(folder)
    for name in TOKENIZER_FILES + EXTRA_TOKENIZER_FILES:
        if (src.folder / name).is_file():
            shutil.copy(src.folder / name, folder / name)
    keep_tokenizer_code(src.folder, folder)
    for path in src.license_files:
        shutil.copy(path, folder / path.name)


def write_motif_model_card(path: Path, report: ConversionReport, src: MotifSource) -> None:
    base = src.base_model or Path(src.name).name
    licence = f"`{src.license}` (from the source's model card)" if src.license else "not stated in the source folder"
    if src.license_files:
        licence += f"; the source's {', '.join(p.name for p in src.license_files)} is copied into this folder"
    how = (
        "Imported from Motif Technologies' Motif-2.6B format, which is the paper's V1 differential attention in this "
        "model family's own layout (adjacent query and key heads form the pairs; the value of a KV group is both of "
        "its heads), with a learned PolyNorm MLP activation, λ_init shifted by one layer "
        "(0.8 − 0.6·exp(−0.3·(layer − 1)), layer counted from 0) and a per-head norm epsilon of its own. Every "
        "tensor keeps its name and values; the config was translated (`hidden_act=\"poly_norm\"`, "
        "`lambda_init_layer_offset=1`, `head_norm_eps`). No code from the source was run.\n\n"
        f"Source: `{report.source}` (MotifForCausalLM). Licence: {licence}; this import is a derivative of the "
        f"source and keeps its terms. Output dtype: {report.dtype}."
    )
    if report.verification is not None:
        v = report.verification
        rows = [
            "| measure | value |",
            "| --- | --- |",
            f"| verification dtype | {v.dtype} |",
            f"| max \\|Δlogit\\| vs the reference | {v.max_abs_logit_diff:.3g} (tolerance {v.tolerance:.3g}) |",
            f"| greedy-token agreement | {v.greedy_agreement:.1%} |",
            f"| greedy generation identical | {'yes' if v.greedy_identical else 'no'} |",
            f"| perplexity (short text), reference | {v.source_ppl:.3f} |",
            f"| perplexity (short text), imported | {v.converted_ppl:.3f} |",
        ]
        results = (
            "Checked right after the import against an independent plain-torch reference of Motif-2.6B's forward "
            "(`modeling_diff_conversion.motif_reference`, written from what its public ports compute), reading the "
            "source's own tensors:\n\n" + "\n".join(rows)
        )
    else:
        results = "Verification was skipped (`--no-verify`)."
    text = render_model_card(
        src.config,
        title=f"{base} → DiffTransformer (v1)",
        summary=f"Motif-2.6B's weights (`{base}`) as a Differential Transformer, imported with `diff-transformer "
        "convert`: the same function, loadable without Motif's remote code.",
        how=how,
        results=results,
        limitations="Imported weights only: no training happened in this step. The function is the source's, so "
        "are its strengths and weaknesses, and its licence applies.",
        base_model=src.base_model,
        license_name=src.license,
        tags=["motif"],
    )
    path.write_text(text)


def reference_run(src: MotifSource, weights: Callable, seqs, ppl_ids, prompt, eos_ids: set, max_new_tokens=16):
    """What `verify.py` measures on the source, from the reference: logits, perplexity, greedy continuation."""
    def logits_of(ids):
        return causal_lm_logits(src.raw, weights, ids)

    logits = [logits_of(ids[0]) for ids in seqs]
    ppl_logits = logits_of(ppl_ids[0])
    loss = torch.nn.functional.cross_entropy(ppl_logits[:-1], ppl_ids[0, 1:])
    ids, new = prompt[0], []
    for _ in range(max_new_tokens):
        token = logits_of(ids)[-1].argmax()
        new.append(token)
        ids = torch.cat([ids, token[None]])
        if token.item() in eos_ids:
            break
    return logits, math.exp(loss.item()), torch.stack(new)


@torch.no_grad()
def verify_motif(src: MotifSource, converted_dir: Path, n_params: int, round_to: torch.dtype | None = None):
    """Compare the imported model with the reference on the source's tensors (rounded to `round_to` as the import
    rounded them, or as they are): logits, greedy tokens and perplexity, like `verify.verify` does for a Llama."""
    from transformers import GenerationConfig

    tokenizer = src.tokenizer
    dtype = verification_dtype(n_params)
    seqs, ppl_ids, prompt = _inputs(tokenizer, src.config.vocab_size)
    eos = src.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = pad if pad is not None else (min(eos_ids) if eos_ids else 0)

    weights = TensorReader(src.shards, round_to)
    ref_logits, ref_ppl, ref_tokens = reference_run(src, weights, seqs, ppl_ids, prompt, eos_ids)

    model = DiffTransformerForCausalLM.from_pretrained(converted_dir, dtype=dtype).eval()
    # plain greedy decoding, as the reference does: none of the source's sampling or penalty defaults
    model.generation_config = GenerationConfig(eos_token_id=sorted(eos_ids) or None, pad_token_id=pad)
    logits = [model(ids).logits[0].double() for ids in seqs]
    ppl = math.exp(model(ppl_ids, labels=ppl_ids).loss.item())
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    tokens = generated[0, prompt.shape[1] :]
    del model

    return compare_runs(
        (ref_logits, ref_ppl, ref_tokens), (logits, ppl, tokens), dtype, tokenizer, preserves_function=True
    )
