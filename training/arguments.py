"""The options of a training run, as dataclasses for `HfArgumentParser` (the way transformers' example scripts do it).

`ModelArguments` and `DataArguments` hold this project's own options; `DiffTrainingArguments` is transformers'
`TrainingArguments` with this project's defaults for short fine-tuning runs, so every Trainer option keeps its
transformers name.
"""

import math
from dataclasses import dataclass, field

import torch
from transformers import SchedulerType, TrainingArguments


class TrainingError(ValueError):
    """Bad input to training (options, data, checkpoints): the CLI prints it as one line `error: ...`."""


def check_range(name: str, value, low: float, *, inclusive: bool = True, allowed=(), below: float | None = None):
    """Refuse a value that is not a finite number >= `low` (> `low` when not `inclusive`) and < `below` (when given),
    unless it is `allowed`."""
    if value in allowed:
        return
    if not (
        isinstance(value, (int, float))
        and math.isfinite(value)
        and (value >= low if inclusive else value > low)
        and (below is None or value < below)
    ):
        bound = f"{'at least' if inclusive else 'above'} {low}" + (f" and below {below}" if below is not None else "")
        others = [str(a) for a in allowed if a is not None]
        extra = f" (or {', '.join(others)})" if others else ""
        raise TrainingError(f"{name} must be a finite number {bound}{extra}, got {value!r}")


def check_seed(name: str, value, allowed=()):
    """Refuse a seed that numpy and torch would refuse once the model is loaded: an integer in [0, 2**32)."""
    if value in allowed:
        return
    if not (isinstance(value, int) and 0 <= value < 2**32):
        raise TrainingError(f"{name} must be an integer from 0 to {2**32 - 1}, got {value!r}")


@dataclass
class ModelArguments:
    """What is trained, and what wraps it: the model, a distillation teacher, LoRA adapters, the λ warm-up."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "the model to train: a folder, a Hub id or a .gguf file (the MODEL argument does the same)"},
    )
    distill_from: str | None = field(
        default=None,
        metadata={
            "help": "teacher model (e.g. the Llama a V1 model was converted from): the loss adds KL(teacher || "
            "student) on the logits, so the student recovers the teacher's quality"
        },
    )
    distill_weight: float = field(default=1.0, metadata={"help": "weight of the KL term of --distill_from"})
    lambda_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "ramp the subtracted map's weight (config.lambda_scale) from 0 to 1 over this many steps: eases a "
            "V1 conversion into differential attention"
        },
    )
    lora: bool = field(
        default=False,
        metadata={
            "help": "train PEFT LoRA adapters on the attention and MLP projections (the λ parameters are trained "
            "fully) and save an adapter folder for peft.AutoPeftModelForCausalLM"
        },
    )
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (with --lora; 16 when not given)"})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA scaling alpha (with --lora; 32 when not given)"}
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "with --lora: merge the adapters into the weights and save a full model"},
    )

    def __post_init__(self):
        check_range("distill_weight", self.distill_weight, 0)
        check_range("lambda_warmup_steps", self.lambda_warmup_steps, 0)
        check_range("lora_r", self.lora_r, 1, allowed=(None,))
        check_range("lora_alpha", self.lora_alpha, 0, inclusive=False, allowed=(None,))


@dataclass
class DataArguments:
    """The training text and how it is cut into blocks."""

    _argument_group_name = "data"

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "training text: a .txt/.md/.jsonl file, a folder of them, or an HF datasets name (default: "
            "Python's own reference docs, pydoc_data.topics, no download)"
        },
    )
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "share of the documents held out: the Trainer's eval_dataset"}
    )

    def __post_init__(self):
        check_range("seq_len", self.seq_len, 1)
        check_range("eval_fraction", self.eval_fraction, 0, inclusive=False)
        if self.eval_fraction >= 1:
            raise TrainingError(f"eval_fraction must be below 1 (a share of the documents), got {self.eval_fraction}")


@dataclass
class DiffTrainingArguments(TrainingArguments):
    """`TrainingArguments` with this project's defaults, and transformers 4's `overwrite_output_dir`.

    Where the defaults differ from transformers': 100 optimizer steps unless `num_train_epochs` is given, a linear
    warm-up over the first 10% of the steps, then a cosine schedule; weight decay 0.01; 4 sequences per device; a log
    line every 5 steps and a checkpoint every 50 (the newest 2 kept); seed 0; the CPU when CUDA is absent; and
    `do_eval`: one evaluation on the eval dataset after training.
    """

    _argument_group_name = "Trainer options (transformers' TrainingArguments; defaults are this project's)"

    per_device_train_batch_size: int = field(default=4, metadata={"help": "sequences per device per step"})
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "passes over the training data; used when --max_steps is not given"},
    )
    max_steps: int | None = field(
        default=None,
        metadata={"help": "optimizer steps; when neither this nor --num_train_epochs is given: 100"},
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="cosine", metadata={"help": "the learning-rate schedule after the warm-up (see SchedulerType)"}
    )
    warmup_steps: float | None = field(
        default=None,
        metadata={
            "help": "linear warm-up: a number of steps, or a float in [0, 1) for a share of the training steps; when "
            "not given: 0.1, a tenth of the steps, however they are counted"
        },
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    logging_steps: float = field(default=5, metadata={"help": "log the loss every N steps"})
    save_steps: float = field(default=50, metadata={"help": "write a resumable checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "keep only the newest N checkpoints"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    use_cpu: bool | None = field(
        default=None,
        metadata={
            "help": "train on the CPU; when not given: when CUDA is absent (then several processes run DDP on gloo)",
            "nargs": "?",
            "const": True,
        },
    )
    do_eval: bool = field(default=True, metadata={"help": "evaluate on the eval dataset once after training"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "replace a non-empty output folder and start afresh instead of resuming its checkpoints"},
    )

    def __post_init__(self):
        check_range("max_steps", self.max_steps, 1, allowed=(None, -1))
        check_range("num_train_epochs", self.num_train_epochs, 0, inclusive=False, allowed=(None,))
        check_range("learning_rate", self.learning_rate, 0, inclusive=False)
        check_range("warmup_steps", self.warmup_steps, 0, allowed=(None,))
        check_range("weight_decay", self.weight_decay, 0)
        check_range("max_grad_norm", self.max_grad_norm, 0)
        check_range("per_device_train_batch_size", self.per_device_train_batch_size, 1)
        check_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        check_range("logging_steps", self.logging_steps, 0, inclusive=False)
        check_range("save_steps", self.save_steps, 0, inclusive=False)
        check_range("eval_steps", self.eval_steps, 0, inclusive=False, allowed=(None,))
        check_range("per_device_eval_batch_size", self.per_device_eval_batch_size, 1)
        # what the optimizer, the loss and the data loaders refuse only once the model is loaded
        check_range("adam_beta1", self.adam_beta1, 0, below=1)
        check_range("adam_beta2", self.adam_beta2, 0, below=1)
        check_range("adam_epsilon", self.adam_epsilon, 0)
        check_range("label_smoothing_factor", self.label_smoothing_factor, 0, below=1)
        check_range("dataloader_num_workers", self.dataloader_num_workers, 0)
        check_seed("seed", self.seed)
        check_seed("data_seed", self.data_seed, allowed=(None,))
        if self.max_steps is None:
            self.max_steps = -1 if self.num_train_epochs is not None else 100
        if self.num_train_epochs is None:
            self.num_train_epochs = 1.0  # not used: max_steps > 0 decides
        if self.warmup_steps is None:
            self.warmup_steps = 0.1
        if self.use_cpu is None:
            self.use_cpu = not torch.cuda.is_available()
        super().__post_init__()
