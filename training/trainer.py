"""The Trainer pieces: λ warm-up, distillation, and `train_model`, which puts them together for a text corpus
(`token_blocks`, `build_trainer` and `run_training` are its steps)."""

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .arguments import TrainingError
from .checkpoints import NoFinalCheckpoint, TrainedFrom
from .data import TokenBlocks, check_fits_in_memory

logger = logging.get_logger(__name__)


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
        self.teacher, self.distill_weight = teacher.to(self.args.device), distill_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"]).logits
        student = F.log_softmax(outputs.logits.float(), dim=-1)  # (batch, seq, vocab)
        teacher = F.log_softmax(teacher_logits.float(), dim=-1)
        kl = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
        loss = loss + self.distill_weight * kl
        return (loss, outputs) if return_outputs else loss


def token_blocks(
    train_texts: list[str], eval_texts: list[str] | None, tokenizer, seq_len: int, eval_strategy="no"
) -> tuple[TokenBlocks, TokenBlocks | None]:
    """(training blocks, held-out blocks or None) of `seq_len` tokens; refuses a training text shorter than one block,
    and a held-out text shorter than one when `eval_strategy` evaluates during training (else: a warning, no
    evaluation). Needs only the tokenizer: call it before the model is loaded."""
    train_data = TokenBlocks(train_texts, tokenizer, seq_len)
    if len(train_data) == 0:
        raise TrainingError(
            f"the training text has {train_data.num_tokens} tokens, fewer than one block of seq_len {seq_len}; "
            "give more text or a shorter seq_len"
        )
    eval_data = TokenBlocks(eval_texts, tokenizer, seq_len) if eval_texts else None
    if eval_data is not None and len(eval_data) == 0:
        if str(getattr(eval_strategy, "value", eval_strategy)) != "no":
            raise TrainingError(
                f"the held-out text has {eval_data.num_tokens} tokens, fewer than one block of seq_len {seq_len}, "
                f"and eval_strategy is {getattr(eval_strategy, 'value', eval_strategy)!r}: hold out more text or "
                "turn evaluation off"
            )
        logger.warning(f"the held-out text has {eval_data.num_tokens} tokens, fewer than one block: no evaluation")
        eval_data = None
    return train_data, eval_data


def build_trainer(
    model,
    tokenizer,
    train_texts: "list[str] | TokenBlocks",
    args: TrainingArguments,
    *,
    eval_texts: "list[str] | TokenBlocks | None" = None,
    seq_len: int = 256,
    lambda_warmup_steps: int = 0,
    teacher=None,
    distill_weight: float = 1.0,
    trained_from: TrainedFrom | None = None,
) -> Trainer:
    """The Trainer `train_model` runs, built and checked but not started (see `train_model` for the arguments; the
    texts may be given as the blocks of `token_blocks`). Everything that can be refused is refused here."""
    check_fits_in_memory(
        model.config,
        seq_len,
        args.per_device_train_batch_size,
        training=True,
        gradient_checkpointing=args.activation_checkpointing,
    )
    if isinstance(train_texts, TokenBlocks):
        train_data, eval_data = train_texts, eval_texts
    else:
        train_data, eval_data = token_blocks(train_texts, eval_texts, tokenizer, seq_len, args.eval_strategy)
    callbacks = [NoFinalCheckpoint()] + ([trained_from] if trained_from is not None else [])
    if lambda_warmup_steps > 0:
        if getattr(model.config, "model_type", None) != "diff_transformer":
            raise TrainingError("the λ warm-up needs a DiffTransformer model")
        callbacks.append(LambdaWarmup(model, lambda_warmup_steps))
    trainer_class, extra = Trainer, {}
    if teacher is not None:
        trainer_class, extra = DistillationTrainer, {"teacher": teacher.eval(), "distill_weight": distill_weight}
    return trainer_class(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data, callbacks=callbacks, **extra
    )


def run_training(trainer: Trainer, resume_from_checkpoint: str | bool | None = None) -> Trainer:
    """Train, then evaluate once when the Trainer has an eval dataset and `do_eval`; returns the Trainer."""
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if trainer.eval_dataset is not None and trainer.args.do_eval:
        trainer.evaluate()
    # with bf16/fp16, accelerate wrapped model.forward in autocast for training and leaves it wrapped: the model the
    # caller gets back computes in its own dtype again
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return trainer


def train_model(
    model,
    tokenizer,
    train_texts: list[str],
    args: TrainingArguments,
    *,
    eval_texts: list[str] | None = None,
    seq_len: int = 256,
    lambda_warmup_steps: int = 0,
    teacher=None,
    distill_weight: float = 1.0,
    trained_from: TrainedFrom | None = None,
    resume_from_checkpoint: str | bool | None = None,
):
    """Train `model` in place with the HF Trainer and return the Trainer (its `state.log_history` has the losses).

    The texts are packed into blocks of `seq_len` tokens. `args` is any `TrainingArguments`; `DiffTrainingArguments`
    brings this project's defaults. The blocks of `eval_texts` are the Trainer's `eval_dataset`: evaluated whenever
    `args.eval_strategy` says, and once more after training when `args.do_eval` (`eval_loss` in the log history).
    With a `teacher`, the loss adds `distill_weight` x KL(teacher || student) (`DistillationTrainer`). With
    `trained_from`, every checkpoint records it (see `checkpoints.resume_point`, which picks `resume_from_checkpoint`
    among checkpoints of the same model). No checkpoint is taken at the last step (`NoFinalCheckpoint`), so that a
    resumed run takes the steps an uninterrupted one takes. A model loaded by `load_fsdp_model` trains with FSDP2
    (with `save_strategy="no"`): the Trainer sees that transformers sharded it. `build_trainer` and `run_training` are
    its two halves, for a caller with something to do in between.
    """
    trainer = build_trainer(
        model,
        tokenizer,
        train_texts,
        args,
        eval_texts=eval_texts,
        seq_len=seq_len,
        lambda_warmup_steps=lambda_warmup_steps,
        teacher=teacher,
        distill_weight=distill_weight,
        trained_from=trained_from,
    )
    return run_training(trainer, resume_from_checkpoint)
