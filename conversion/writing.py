"""What every conversion writes, whatever its source: the report, the weight shards, the model files next to them.

`convert.py` (Llama, DiffLlama) and `motif.py` (Motif-2.6B) both write through these; neither imports the other.
"""

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import modeling_diff
from modeling_diff import DiffTransformerConfig

from .source import SKIPPED_SUFFIXES, ConversionError
from .verify import VerificationResult

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_MAP = {
    "AutoConfig": "configuration_diff_transformer.DiffTransformerConfig",
    "AutoModel": "modeling_diff_transformer.DiffTransformerModel",
    "AutoModelForCausalLM": "modeling_diff_transformer.DiffTransformerForCausalLM",
    "AutoModelForSequenceClassification": "modeling_diff_transformer.DiffTransformerForSequenceClassification",
}
CODE_FILES = ["configuration_diff_transformer.py", "modeling_diff_transformer.py"]
@dataclass
class ConversionReport:
    """What a conversion did and how its verification went."""

    source: str
    output_dir: str
    variant: str
    architecture: str
    preserves_function: bool  # whether this mapping is meant to compute the source's function exactly
    dtype: str
    n_tensors: int = 0
    n_shards: int = 0
    seconds: float = 0.0
    verification: VerificationResult | None = None
    notes: list[str] = field(default_factory=list)
    license: str | None = None  # the source's licence, when known
    base_model: str | None = None  # the source's Hub id, when known

    def summary(self) -> str:
        lines = [
            f"converted {self.architecture} {self.source} -> DiffTransformer {self.variant} at {self.output_dir}",
            f"  {self.n_tensors} tensors in {self.n_shards} shard(s), dtype {self.dtype}, {self.seconds:.1f} s",
        ]
        if self.verification is not None:
            lines += ["  " + line for line in self.verification.lines()]
        lines += ["  note: " + note for note in self.notes]
        return "\n".join(lines)


class ShardWriter:
    """Collects output tensors and writes a safetensors shard whenever `max_bytes` would be exceeded."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_bytes:
            self.flush()  # the buffer never holds more than one shard
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += nbytes

    def flush(self):
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.folder / f"shard-{len(self.files):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        path.chmod(0o644)
        self.files.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> int:
        """Name the shards as transformers does, write the index, and return the number of shards."""
        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return 1
        weight_map, total = {}, 0
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            total += path.stat().st_size
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return len(self.files)


def checked_tensors(src, expected: dict[str, tuple], dtype: str, progress: bool, desc: str) -> Iterator:
    """(name, tensor) of every tensor of `src` the output keeps, one at a time, cast to `dtype` ("auto": as it is):
    buffers the config recomputes and a tied LM head are skipped; a tensor `expected` (its shapes by name) does not
    list or shapes otherwise, and, at the end, one it lists that the source lacks, are refused in one line."""
    seen = set()
    with tqdm(total=len(expected), desc=desc, unit="tensor", disable=not progress) as bar:
        for name, tensor in src.tensors():
            if name.endswith(SKIPPED_SUFFIXES):
                continue
            if name == "lm_head.weight" and src.config.tie_word_embeddings:
                continue  # tied: the embedding is the LM head
            if name not in expected:
                raise ConversionError(f"unexpected tensor {name!r} for a {src.architecture} with this config.json")
            if tuple(tensor.shape) != expected[name]:
                raise ConversionError(
                    f"tensor {name} has shape {tuple(tensor.shape)} but config.json implies {expected[name]}: "
                    "the weights do not match the config"
                )
            if dtype != "auto" and tensor.is_floating_point():
                tensor = tensor.to(DTYPES[dtype])
            yield name, tensor
            seen.add(name)
            bar.update(1)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensor(s) its config implies, e.g. {missing[0]}")


def write_model_files(config: DiffTransformerConfig, folder: Path, dtype: torch.dtype) -> None:
    """config.json (with the `auto_map` that `trust_remote_code` reads) and the modeling code files beside it."""
    config.dtype = dtype
    config.architectures = ["DiffTransformerForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(folder)
    code_dir = Path(modeling_diff.__file__).parent
    for name in CODE_FILES:
        shutil.copy(code_dir / name, folder / name)


def keep_tokenizer_code(source: Path | None, folder: Path):
    """Copy the tokenizer code files that tokenizer_config.json's auto_map names from the source folder; drop the
    entries whose file the source does not have (they would point at code that is not there).

    Entries that name another Hub repo (`repo--module.Class`) are kept as they are.
    """
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if not config.get("auto_map"):
        return
    auto_map = {}
    for key, refs in config["auto_map"].items():
        kept = []
        for ref in refs if isinstance(refs, list) else [refs]:
            module = f"{ref.rsplit('.', 1)[0]}.py" if ref and "--" not in ref else None
            if module and source is not None and (source / module).is_file():
                shutil.copy(source / module, folder / module)
            elif module:
                ref = None  # its code is not in the source folder
            kept.append(ref)
        if any(kept):
            auto_map[key] = kept if isinstance(refs, list) else kept[0]
    if auto_map:
        config["auto_map"] = auto_map
    else:
        del config["auto_map"]
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
