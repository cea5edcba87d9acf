"""LoRA adapters (PEFT) for a DiffTransformer, with its λ parameters trained in full and saved with the adapter."""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .arguments import TrainingError

# Projections LoRA adapts: Llama's attention and MLP names, which PEFT has no default for under diff_transformer.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lambda_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the λ parameters: V1's lambda_q1/k1/q2/k2, V2's lambda_proj.weight."""
    return [(name, param) for name, param in model.named_parameters() if ".lambda_" in name]


def add_lora_adapters(model, r: int = 16, alpha: float = 32):
    """Wrap `model` in a PEFT LoRA model on `LORA_TARGET_MODULES`; its λ parameters stay fully trainable.

    A converted model becomes differential only through λ and q/k, so the λ parameters are trained in full alongside
    the adapters (they are a few vectors per layer). `save_lora_adapter` stores them in the adapter file.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TrainingError("LoRA needs PEFT: pip install peft")

    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=LORA_TARGET_MODULES)
    lora = get_peft_model(model, config)
    for _, param in lambda_parameters(lora):
        param.requires_grad_(True)
    return lora


def save_lora_adapter(lora_model, folder: str | Path) -> None:
    """`save_pretrained` of the PEFT model, plus its λ parameters in `adapter_model.safetensors`.

    PEFT saves only adapter weights (`modules_to_save` takes whole modules, and V1's λ vectors are parameters of the
    attention module itself). Its loader passes checkpoint entries that are not adapter weights through to the
    model, as it does for saved biases, so `AutoPeftModelForCausalLM.from_pretrained(folder)` restores them.
    """
    lora_model.save_pretrained(folder)
    weights = Path(folder) / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors.update({name: param.detach().cpu().contiguous() for name, param in lambda_parameters(lora_model)})
    save_file(tensors, weights, metadata={"format": "pt"})
