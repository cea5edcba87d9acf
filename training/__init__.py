"""Fine-tuning and distillation of causal LMs with the Hugging Face Trainer (installed as `modeling_diff_training`).

from transformers import AutoModelForCausalLM, AutoTokenizer
from modeling_diff_training import DiffTrainingArguments, train_model

model = AutoModelForCausalLM.from_pretrained("my-diff-model")
tokenizer = AutoTokenizer.from_pretrained("my-diff-model")
args = DiffTrainingArguments(output_dir="checkpoints", max_steps=200, learning_rate=1e-4)
trainer = train_model(model, tokenizer, train_texts, args, eval_texts=held_out_texts, lambda_warmup_steps=50)
trainer.save_model("my-fine-tuned-model")

`TrainingRun` is a whole `diff-transformer train` run (checked options, resumable checkpoints beside the output, an
atomic save, FSDP2, LoRA, the Hub upload). The pieces are usable on their own with any Trainer: `TokenBlocks`
(packed causal-LM blocks), `LambdaWarmup` (a callback), `DistillationTrainer` (LM loss + KL to a teacher), the LoRA
helpers, the FSDP2 helpers (`fsdp`) and the time-budget planner (`budget`).
"""

from .arguments import DataArguments, DiffTrainingArguments, ModelArguments, TrainingError
from .data import TokenBlocks, check_fits_in_memory
from .lora import LAMBDA_MODULES, LORA_TARGET_MODULES, add_lora_adapters
from .run import TrainingRun
from .trainer import DistillationTrainer, LambdaWarmup, build_trainer, run_training, token_blocks, train_model

__all__ = [
    "DataArguments",
    "DiffTrainingArguments",
    "DistillationTrainer",
    "LAMBDA_MODULES",
    "LORA_TARGET_MODULES",
    "LambdaWarmup",
    "ModelArguments",
    "TokenBlocks",
    "TrainingError",
    "TrainingRun",
    "add_lora_adapters",
    "build_trainer",
    "check_fits_in_memory",
    "run_training",
    "token_blocks",
    "train_model",
]
