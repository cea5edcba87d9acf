"""FSDP2 training of a model that transformers shards at load time, and saving it back as one ordinary folder."""

import copy
import os
from pathlib import Path

import torch

from .arguments import TrainingError


def load_fsdp_model(model: str, tokenizer=None):
    """(a causal LM sharded with FSDP2 over this torchrun job's processes at load time, its tokenizer), from a folder
    or Hub id (`tokenizer`: when the caller has loaded it already).

    transformers shards it (`DistributedConfig(fsdp_size=...)`, each decoder layer one unit: the config's
    `base_model_fsdp_plan`, i.e. the model's `_no_split_modules`), and the Trainer trains it as it is; it needs
    `save_strategy="no"` (transformers cannot checkpoint the optimizer state of a model it sharded at load time).
    accelerate's `TrainingArguments(fsdp=...)` route would do nothing on CPU: it enables FSDP only for accelerators.
    """
    from modeling_diff_conversion.loading import load_model, resolve_model_path
    from transformers.distributed import DistributedConfig

    if resolve_model_path(model)[1]:
        raise TrainingError("--fsdp needs a model folder, not a .gguf file: convert the model to a folder first")
    distributed = DistributedConfig(fsdp_size=int(os.environ["WORLD_SIZE"]))
    return load_model(model, tokenizer=tokenizer, distributed_config=distributed)


def gather_fsdp_weights(trainer) -> dict:
    """The full weights of an FSDP-trained model, gathered from every rank (all must call this) onto rank 0's CPU.

    Prints how many parameters rank 0 holds between steps, the evidence that FSDP did shard the model. An evaluation
    leaves the root module's parameters gathered (FSDP2 does not reshard the root after a forward), so every module
    is resharded first.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in trainer.model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    params = list(trainer.model.parameters())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    if trainer.is_world_process_zero():
        print(f"FSDP2: rank 0 held {held:,} of the model's {sum(p.numel() for p in params):,} parameters")
    return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_unsharded(config, state_dict, folder: Path) -> None:
    """Write a gathered FSDP state dict as an ordinary model folder (weights, config, code files).

    `save_pretrained` on the FSDP-wrapped model itself would copy torch's FSDP class files as the remote code; a
    model built on the meta device from the same config writes the right ones and holds no memory.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.distributed_config = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, state_dict=state_dict)
