"""`diff-transformer train`: fine-tune (or distil) a causal LM with the Hugging Face Trainer."""

import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from modeling_diff_conversion.output import atomic_output_dir, check_output_dir

from .common import CLIError, load_model
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
    """Train `model` in place with the HF Trainer and return the Trainer (its `state.log_history` has the losses)."""
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


def run(args) -> int:
    checkpoints = Path(str(Path(args.output_dir).expanduser().resolve()) + "-checkpoints")
    resume = checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*"))
    output = Path(args.output_dir).expanduser()
    check_output_dir(output, args.force)
    train_texts, _ = train_eval_texts(args.dataset, args.eval_fraction, args.seed)
    model, tokenizer = load_model(args.model)
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
    if not trainer.is_world_process_zero():
        return 0  # under torchrun / accelerate launch, rank 0 alone writes the result
    with atomic_output_dir(output, force=args.force) as tmp:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(checkpoints, ignore_errors=True)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if losses:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (ppl {math.exp(min(losses[-1], 50)):.2f})")
    print(f"saved the trained model to {output}")
    return 0
