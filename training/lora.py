"""LoRA adapters (PEFT) for a DiffTransformer, with its λ modules trained in full and saved by PEFT itself."""

from .arguments import TrainingError

# Projections LoRA adapts: every attention and MLP projection (PEFT's default for diff_transformer, which the model
# registers as Llama's, adapts q_proj and v_proj only).
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The modules that hold λ: V1's λ vectors and per-head norm gain (`self_attn.head_norm`), V2's gate
# (`self_attn.lambda_proj`). A Llama has neither, and PEFT then trains the adapters alone.
LAMBDA_MODULES = ["head_norm", "lambda_proj"]


def add_lora_adapters(model, r: int = 16, alpha: float = 32):
    """Wrap `model` in a PEFT LoRA model on `LORA_TARGET_MODULES`, with `LAMBDA_MODULES` trained in full.

    A converted model becomes differential only through λ and q/k, so the λ modules (a few vectors or a small matrix
    per layer) train in full alongside the adapters, through PEFT's `modules_to_save`: `save_pretrained` writes them
    into the adapter, and `AutoPeftModelForCausalLM.from_pretrained` restores them.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TrainingError("--lora needs PEFT: pip install 'modeling-diff[lora]'")

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=LAMBDA_MODULES,
    )
    return get_peft_model(model, config)
