"""Open a source checkpoint (local folder, Hub id or .gguf file) and stream its tensors one at a time."""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

SUPPORTED = ("LlamaForCausalLM", "DiffLlamaForCausalLM")
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed from the config
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]


# the sizes a config divides by or allocates from: each must be a positive integer
CONFIG_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


class ConversionError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def check_config_sizes(values: dict, where: str) -> None:
    """Refuse a config.json whose sizes are not positive integers (zero heads, ...): the config class would divide by
    them, or a model allocate from them."""
    for key in CONFIG_SIZES:
        value = values.get(key)
        if value is not None and not (type(value) is int and value > 0):
            raise ConversionError(f"{where} has {key}={value!r}: it must be a positive integer")


def estimate_parameters(values: dict) -> int:
    """About how many parameters a causal LM with these config values has, in Llama's layout: embeddings, attention
    and the gated MLP. Norms are left out, so for Llama and DiffLlama it is never more than the model has; for a
    DiffTransformer V2 (whose o_proj is half as wide) a few percent more."""
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    kv_heads = values.get("num_key_value_heads") or heads
    head_dim = values.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q and o, k and v
    mlp = 3 * hidden * (values.get("intermediate_size") or 4 * hidden)  # gate, up and down
    embeddings = values["vocab_size"] * hidden * (1 if values.get("tie_word_embeddings") else 2)
    return embeddings + values["num_hidden_layers"] * (attention + mlp)


@dataclass
class Source:
    """An opened source checkpoint. `tensors()` streams (name, tensor) pairs without loading everything."""

    name: str  # what the user passed, used for `base_model` in the model card
    config: object  # LlamaConfig or DiffLlamaConfig
    architecture: str  # "LlamaForCausalLM" or "DiffLlamaForCausalLM"
    folder: Path | None = None  # where tokenizer, generation_config and README live
    shards: list[Path] = field(default_factory=list)  # safetensors or .bin files, in order
    gguf_file: str | None = None
    in_memory_model: object = None  # the dequantised model of a GGUF source
    license: str | None = None
    base_model: str | None = None  # Hub id of the source, when it can be known (model card metadata)

    @property
    def largest_shard_bytes(self) -> int:
        return max((p.stat().st_size for p in self.shards), default=0)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.in_memory_model is not None:
            yield from self.in_memory_model.state_dict().items()
            return
        for shard in self.shards:
            yield from _read_shard(shard)

    def load_model(self, dtype: torch.dtype):
        """The source as a transformers model, for verification."""
        if self.in_memory_model is not None:
            return self.in_memory_model.to(dtype)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype)

    @cached_property
    def tokenizer(self):
        """The source tokenizer, or None when the source has none; read once (parsing a GGUF file is slow)."""
        from transformers import AutoTokenizer

        if self.gguf_file is not None:
            return AutoTokenizer.from_pretrained(self.folder, gguf_file=self.gguf_file)
        if self.folder is not None and any((self.folder / f).exists() for f in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(self.folder)
        return None

    def load_generation_config(self):
        from transformers import GenerationConfig

        if self.folder is not None and (self.folder / "generation_config.json").exists():
            return GenerationConfig.from_pretrained(self.folder)
        return None


def _read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".bin":
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:
            raise ConversionError(f"cannot read {path.name}: it is truncated or not a torch checkpoint ({err})")
        for name in list(state):
            yield name, state.pop(name)
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except SafetensorError as err:
        raise ConversionError(f"cannot read {path.name}: it is truncated or corrupt ({err})")


def open_source(source: str, gguf_file: str | None = None) -> Source:
    """Resolve SOURCE (folder, Hub id or .gguf path) into a `Source`, or raise a one-line `ConversionError`."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConversionError(f"no such GGUF file: {source}")
        return _open_gguf(source, path.parent, path.name)
    if path.is_dir():
        folder = path
    elif path.exists():
        raise ConversionError(f"{source} is a file; SOURCE must be a model folder, a Hub id or a .gguf file")
    else:
        patterns = (
            [gguf_file]
            if gguf_file
            else ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "README.md"]
        )
        folder = download_snapshot(source, patterns)
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise ConversionError(f"no GGUF file named {gguf_file} in {source}")
        opened = _open_gguf(source, folder, gguf_file)
    else:
        opened = _open_folder(source, folder)
    if not path.exists():  # a Hub id names the base model exactly
        opened.base_model = source
    return opened


def download_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """A Hub repo resolved the usual way: the HF cache first, the network if allowed (HF_HUB_OFFLINE=1 forbids it)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except HFValidationError:
        raise ConversionError(f"{repo_id!r} is neither an existing folder, a .gguf file nor a valid Hub id")
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = (
            "it is not in the local HF cache and HF_HUB_OFFLINE=1 forbids downloads"
            if offline
            else ("it is not in the local HF cache and the Hub could not be reached")
        )
        raise ConversionError(f"cannot resolve Hub id {repo_id!r}: {hint} ({type(err).__name__})")


def _check_architecture(architecture: str, where: str):
    if architecture not in SUPPORTED:
        raise ConversionError(f"{where} is a {architecture}; supported architectures are {', '.join(SUPPORTED)}")


def _open_folder(name: str, folder: Path) -> Source:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"no config.json in {folder}: is this a Transformers model folder?")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_path} is not valid JSON ({err})")
    architecture = (raw.get("architectures") or [None])[0] or {
        "llama": "LlamaForCausalLM",
        "diffllama": "DiffLlamaForCausalLM",
    }.get(raw.get("model_type"), raw.get("model_type"))
    _check_architecture(str(architecture), name)
    check_config_sizes(raw, str(config_path))

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, ArithmeticError, TypeError) as err:
        raise ConversionError(f"{config_path} is not a valid config: {str(err).splitlines()[0]}")
    index = folder / "model.safetensors.index.json"
    bin_index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        shards = indexed_shards(index)
    elif (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    elif bin_index.is_file():
        shards = indexed_shards(bin_index)
    elif (folder / "pytorch_model.bin").is_file():
        shards = [folder / "pytorch_model.bin"]
    else:
        raise ConversionError(
            f"no weights in {folder}: expected model.safetensors, a sharded index or pytorch_model.bin"
        )
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ConversionError(f"the shard index of {folder} names missing files: {', '.join(missing)}")
    check_config_fits_weights(config, config_path, shards)
    return Source(
        name=name,
        config=config,
        architecture=architecture,
        folder=folder,
        shards=shards,
        license=_license_from_readme(folder / "README.md"),
    )


def indexed_shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names, in order. Shard names are file names in the index's own
    folder: one that is absolute or climbs out with `..` would make the checkpoint read another folder's weights."""
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConversionError(f"{index} is not a shard index (it needs a weight_map of tensor names to shard files)")
    for name in sorted(names, key=str):
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts or not name.strip():
            raise ConversionError(
                f"{index} names the shard {name!r}, outside its folder: shard names must be file names in "
                f"{index.parent}; fix the index"
            )
    return sorted(index.parent / name for name in names)


def check_config_fits_weights(config, config_path: Path, shards: list[Path]) -> None:
    """Refuse a config that describes more parameters than its weight files can hold (at least one byte each), before
    anything is allocated or streamed: a config.json that does not belong to its weights, or a mistyped size."""
    parameters = estimate_parameters(config.to_dict())
    weight_bytes = sum(shard.stat().st_size for shard in shards)
    if parameters > weight_bytes:
        raise ConversionError(
            f"{config_path} describes about {parameters / 1e9:.3g}B parameters ({config.num_hidden_layers} layers of "
            f"hidden size {config.hidden_size}; {2 * parameters / 2**30:,.1f} GiB in bfloat16), but its weight files "
            f"hold {weight_bytes / 2**20:,.1f} MiB: the config does not match the weights"
        )


def _open_gguf(name: str, folder: Path, gguf_file: str) -> Source:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConversionError("reading a .gguf file needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    except ValueError as err:  # transformers' words for an architecture it cannot read from GGUF
        raise ConversionError(f"cannot load {gguf_file}: {str(err).splitlines()[0]}")
    except (MemoryError, OSError):
        raise
    except Exception as err:  # the gguf reader's own failures on a malformed file (struct.error, ...)
        raise ConversionError(f"cannot read {gguf_file}: {malformed_gguf(err)}")
    architecture = type(model).__name__
    _check_architecture(architecture, name)
    license_name, base_model = _gguf_provenance(folder / gguf_file)
    return Source(
        name=name,
        config=model.config,
        architecture=architecture,
        folder=folder,
        gguf_file=gguf_file,
        in_memory_model=model,
        license=license_name,
        base_model=base_model,
        shards=[folder / gguf_file],
    )


def malformed_gguf(err: Exception) -> str:
    """What a reader's exception on a malformed .gguf file says, as the end of a one-line message."""
    first = str(err).splitlines()[0] if str(err) else ""
    return f"it is not a valid GGUF file ({type(err).__module__}.{type(err).__qualname__}: {first})"


def _license_from_readme(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    lines = readme.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip() or None
    return None


def _gguf_provenance(path: Path) -> tuple[str | None, str | None]:
    """(licence, likely Hub id) from GGUF metadata: `general.organization` + the file name before its quant tag.

    For example HuggingFaceTB + SmolLM2-135M-Instruct.Q4_1.gguf -> HuggingFaceTB/SmolLM2-135M-Instruct.
    """
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields

        def text(key):
            f = fields.get(key)
            return bytes(f.parts[f.data[0]]).decode() if f is not None else None

        org, stem = text("general.organization"), path.name.split(".")[0]
        return text("general.license"), (f"{org}/{stem}" if org else None)
    except Exception:  # provenance is a nicety for the model card, never a reason to fail
        return None, None


def expected_shapes(cfg) -> dict[str, tuple]:
    """Every tensor a Llama/DiffLlama checkpoint with config `cfg` must contain, with its shape."""
    h, d = cfg.hidden_size, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
        )
        if getattr(cfg, "attention_bias", False):
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.bias": (h,),
                }
            )
        if getattr(cfg, "mlp_bias", False):
            shapes.update(
                {p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,), p + "mlp.down_proj.bias": (h,)}
            )
        if cfg.model_type == "diffllama":
            shapes.update({p + f"self_attn.lambda_{n}": (d,) for n in ("q1", "k1", "q2", "k2")})
    return shapes
