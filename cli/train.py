"""`diff-transformer train`: fine-tune (or distil) a causal LM with the Hugging Face Trainer."""

import copy
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from modeling_diff_conversion.output import atomic_output_dir, check_output_dir

from .common import CLIError, load_model, load_tokenizer, resolve_model_path
from .data import TokenBlocks, check_fits_in_memory, train_eval_texts


def add_arguments(parser):
    parser.add_argument("model", help="model to train: a folder, a Hub id or a .gguf file")
    parser.add_argument(
        "--output-dir",
        required=True,
        help="where the trained model is saved; checkpoints go to OUTPUT_DIR-checkpoints meanwhile",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="training text: a .txt/.md/.jsonl file, a folder of them, or an HF datasets name "
        "(default: Python's own reference docs, pydoc_data.topics, no download)",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps to run (default: 100)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training text instead of steps")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW, warmup then cosine)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per device per step")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass to save memory",
    )
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 mixed precision")
    parser.add_argument(
        "--lambda-warmup-steps",
        type=int,
        default=0,
        help="ramp the subtracted map's weight (config.lambda_scale) from 0 to 1 over this many "
        "steps: eases a V1 conversion into differential attention",
    )
    parser.add_argument(
        "--distill-from",
        default=None,
        help="teacher model (e.g. the Llama a V1 model was converted from): the loss adds "
        "KL(teacher || student) on the logits, so the student recovers the teacher's quality",
    )
    parser.add_argument("--distill-weight", type=float, default=1.0, help="weight of the KL term")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share of documents held out for eval")
    parser.add_argument("--logging-steps", type=int, default=5, help="log the loss every N steps")
    parser.add_argument("--save-steps", type=int, default=50, help="write a resumable checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output-dir")
    scale = parser.add_argument_group("scale out (run under torchrun or accelerate launch for several processes)")
    scale.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state over the processes with FSDP2, one decoder layer "
        "(the model's _no_split_modules) per unit",
    )
    scale.add_argument(
        "--lora",
        action="store_true",
        help="train PEFT LoRA adapters on the attention and MLP projections (the λ parameters are trained fully) "
        "and save an adapter folder for peft.AutoPeftModelForCausalLM",
    )
    scale.add_argument("--lora-r", type=int, default=None, help="LoRA rank (with --lora; default 16)")
    scale.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling alpha (with --lora; default 32)")
    scale.add_argument(
        "--merge-lora",
        action="store_true",
        help="with --lora: merge the adapters into the weights and save a full model for AutoModelForCausalLM",
    )


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
        raise CLIError("--lora needs PEFT: pip install peft")

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


class LambdaWarmup(TrainerCallback):
    """Sets config.lambda_scale = min(1, step / warmup_steps) before each step, and 1 at the end."""

    def __init__(self, model, warmup_steps: int):
        self.config, self.warmup_steps = model.config, warmup_steps

    def on_step_begin(self, args, state, control, **kwargs):
        self.config.lambda_scale = min(1.0, state.global_step / self.warmup_steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.config.lambda_scale = 1.0


class DistillationTrainer(Trainer):
    """Trainer whose loss is the usual LM loss plus `weight` x KL(teacher || student), per token."""

    def __init__(self, *args, teacher=None, distill_weight=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.distill_weight = teacher, distill_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"]).logits
        student = F.log_softmax(outputs.logits.float(), dim=-1)
        teacher = F.log_softmax(teacher_logits.float(), dim=-1)
        kl = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
        loss = loss + self.distill_weight * kl
        return (loss, outputs) if return_outputs else loss


def train_model(
    model,
    tokenizer,
    train_texts,
    output_dir: Path,
    *,
    max_steps=100,
    epochs=None,
    lr=5e-5,
    batch_size=4,
    grad_accum=1,
    seq_len=256,
    gradient_checkpointing=False,
    bf16=False,
    lambda_warmup_steps=0,
    teacher=None,
    distill_weight=1.0,
    logging_steps=5,
    save_steps=50,
    seed=0,
    checkpoint_dir: Path | None = None,
    resume=False,
    disable_tqdm=False,
):
    """Train `model` in place with the HF Trainer and return the Trainer (its `state.log_history` has the losses).

    A model loaded by `load_fsdp_model` trains with FSDP2: the Trainer sees that transformers sharded it.
    """
    check_fits_in_memory(
        model.config, seq_len, batch_size, training=True, gradient_checkpointing=gradient_checkpointing
    )
    data = TokenBlocks(train_texts, tokenizer, seq_len)
    callbacks = []
    if lambda_warmup_steps > 0:
        if getattr(model.config, "model_type", None) != "diff_transformer":
            raise CLIError("--lambda-warmup-steps needs a DiffTransformer model")
        callbacks.append(LambdaWarmup(model, lambda_warmup_steps))
    args = TrainingArguments(
        output_dir=str(checkpoint_dir or output_dir),
        max_steps=-1 if epochs else (max_steps or 100),
        num_train_epochs=epochs or 1,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, (max_steps or 100) // 10),
        weight_decay=0.01,
        logging_steps=logging_steps,
        # transformers cannot checkpoint the optimizer state of a model it sharded at load time (FSDP): no resuming
        save_strategy="no" if getattr(model, "is_distributed_loading_by_transformers", False) else "steps",
        save_steps=save_steps,
        save_total_limit=2,
        activation_checkpointing=gradient_checkpointing,
        bf16=bf16,
        report_to=[],
        seed=seed,
        dataloader_drop_last=False,
        disable_tqdm=disable_tqdm,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer_class, extra = Trainer, {}
    if teacher is not None:
        trainer_class, extra = DistillationTrainer, {"teacher": teacher.eval(), "distill_weight": distill_weight}
    trainer = trainer_class(model=model, args=args, train_dataset=data, callbacks=callbacks, **extra)
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer


def load_fsdp_model(model: str):
    """A causal LM sharded with FSDP2 over this torchrun job's processes at load time, and its tokenizer.

    transformers shards it (`DistributedConfig(fsdp_size=...)`, each decoder layer one unit: the config's
    `base_model_fsdp_plan`, i.e. the model's `_no_split_modules`), and the Trainer trains it as it is. accelerate's
    `TrainingArguments(fsdp=...)` route would do nothing on CPU: it enables FSDP only for accelerator devices.
    """
    import modeling_diff  # noqa: F401  (registers diff_transformer with the Auto classes)
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    folder, gguf_file = resolve_model_path(model)
    if gguf_file:
        raise CLIError("--fsdp needs a model folder, not a .gguf file: convert the model to a folder first")
    sharded = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, distributed_config=DistributedConfig(fsdp_size=int(os.environ["WORLD_SIZE"]))
    )
    return sharded, load_tokenizer(folder, name=model)


def gather_fsdp_weights(trainer) -> dict:
    """The full weights of an FSDP-trained model, gathered from every rank (all must call this) onto rank 0's CPU.

    Prints how many parameters rank 0 held while training, the evidence that FSDP did shard the model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

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


def check_scale_out_flags(args) -> None:
    """Refuse flag combinations that cannot work, before anything is loaded."""
    if (args.merge_lora or args.lora_r is not None or args.lora_alpha is not None) and not args.lora:
        raise CLIError("--merge-lora, --lora-r and --lora-alpha need --lora")
    if args.lora and args.lora_r is not None and args.lora_r < 1:
        raise CLIError(f"--lora-r must be a positive rank, got {args.lora_r}")
    if args.lora and args.fsdp:
        raise CLIError(
            "--lora with --fsdp is not supported: LoRA trains few parameters, run it with plain torchrun (DDP)"
        )
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise CLIError(
            "--fsdp shards the model over several processes: run under torchrun --nproc_per_node N (N >= 2)"
        )
    if args.lora and not args.merge_lora and Path(args.model).suffix == ".gguf":
        raise CLIError(
            "a LoRA adapter needs a base model folder, not a .gguf file: add --merge-lora, or convert the "
            "model to a folder first"
        )
    if args.lora and args.distill_from:
        raise CLIError("--lora with --distill-from is not supported")


def run(args) -> int:
    check_scale_out_flags(args)
    checkpoints = Path(str(Path(args.output_dir).expanduser().resolve()) + "-checkpoints")
    resume = checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*"))
    if resume and args.fsdp:
        raise CLIError(
            f"{checkpoints} holds checkpoints of an earlier run, and an --fsdp run cannot resume: remove it"
        )
    output = Path(args.output_dir).expanduser()
    check_output_dir(output, args.force)
    train_texts, _ = train_eval_texts(args.dataset, args.eval_fraction, args.seed)
    model, tokenizer = load_fsdp_model(args.model) if args.fsdp else load_model(args.model)
    if args.lora:
        if Path(args.model).expanduser().is_dir():
            # the adapter's base_model_name_or_path: an absolute folder, so that the adapter loads from anywhere
            model.name_or_path = str(Path(args.model).expanduser().resolve())
        set_seed(args.seed)  # the LoRA A matrices are drawn at random: same seed, same run
        model = add_lora_adapters(model, args.lora_r or 16, args.lora_alpha or 32)
    teacher = None
    if args.distill_from:
        teacher, _ = load_model(args.distill_from)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise CLIError(
                f"--distill-from has vocabulary {teacher.config.vocab_size}, the model "
                f"{model.config.vocab_size}: teacher and student must share a tokenizer"
            )
    if resume:
        print(f"resuming from the checkpoints in {checkpoints}")
    trainer = train_model(
        model,
        tokenizer,
        train_texts,
        output,
        max_steps=args.max_steps,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        lambda_warmup_steps=args.lambda_warmup_steps,
        teacher=teacher,
        distill_weight=args.distill_weight,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        seed=args.seed,
        checkpoint_dir=checkpoints,
        resume=resume,
    )
    state_dict = gather_fsdp_weights(trainer) if args.fsdp else None  # every rank takes part
    if not trainer.is_world_process_zero():
        return 0  # under torchrun / accelerate launch, rank 0 alone writes the result
    with atomic_output_dir(output, force=args.force) as tmp:
        if args.fsdp:
            save_unsharded(trainer.model.config, state_dict, tmp)
        elif args.lora and args.merge_lora:
            trainer.model.merge_and_unload().save_pretrained(tmp)
        elif args.lora:
            save_lora_adapter(trainer.model, tmp)
        else:
            trainer.save_model(str(tmp))
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(checkpoints, ignore_errors=True)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if losses:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (ppl {math.exp(min(losses[-1], 50)):.2f})")
    print(f"saved the trained model to {output}")
    return 0
