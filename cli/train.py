"""`diff-transformer train`: fine-tune (or distil) a causal LM with the Hugging Face Trainer.

Every option of transformers' TrainingArguments works under its own name (--learning_rate, --lr_scheduler_type,
--warmup_steps, --save_total_limit, --report_to, --push_to_hub, ...), with this project's defaults. The trained model
goes to --output_dir; resumable checkpoints go to OUTPUT_DIR-checkpoints meanwhile. Instead of options, MODEL may be a
.json or .yaml file that holds them all (`model_name_or_path: ...`, `output_dir: ...`, ...). What the Trainer gets
otherwise than given (its output_dir, push_to_hub, hub_token, fsdp) is said in a `note:` line as training starts.
--debug is this command's (tracebacks); TrainingArguments' own `debug` option is set in a config file.
"""

import math
from dataclasses import fields
from pathlib import Path

import yaml
from modeling_diff_training import DataArguments, DiffTrainingArguments, ModelArguments, TrainingError, TrainingRun

from .common import CLIError, add_deprecated

# the dataclasses main.py builds this command's options from, as transformers' example scripts do
ARGUMENT_CLASSES = (ModelArguments, DataArguments, DiffTrainingArguments)
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
# this command's flags before it took TrainingArguments' names: (the option they set, their type; None for a switch)
DEPRECATED_SPELLINGS = {
    "--lr": ("learning_rate", float),
    "--batch-size": ("per_device_train_batch_size", int),
    "--grad-accum": ("gradient_accumulation_steps", int),
    "--epochs": ("num_train_epochs", float),
    "--gradient-checkpointing": ("activation_checkpointing", None),
    "--force": ("overwrite_output_dir", None),
    "--warmup_ratio": ("warmup_steps", float),  # transformers 4's name; transformers 5 reads a ratio < 1 as a share
}


def add_arguments(parser):
    """MODEL, --fsdp's help and the old spellings; main.py adds an option per field of ARGUMENT_CLASSES."""
    parser.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="the model to train: a folder, a Hub id or a .gguf file; or a .json/.yaml config file with every "
        "option, then the only argument",
    )
    parser.add_argument(  # TrainingArguments' own --fsdp, with what it does here
        "--fsdp",
        nargs="?",
        const=True,
        default=None,
        help="shard parameters, gradients and optimizer state over the processes of torchrun / accelerate launch "
        "with FSDP2 at load time, one decoder layer (the model's _no_split_modules) per unit; no checkpoints",
    )
    old = parser.add_argument_group("old spellings (deprecated: they go away in the next release)")
    for flag, (dest, kind) in DEPRECATED_SPELLINGS.items():
        add_deprecated(old, flag, dest, kind)


def parse(args) -> tuple[ModelArguments, DataArguments, DiffTrainingArguments, str | None]:
    """The three dataclasses, from the command line or from MODEL when it is a config file (read by the command's
    HfArgumentParser itself), and the config file or None."""
    parser, names = args.parser, [f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init]
    if args.model and Path(args.model).suffix in CONFIG_SUFFIXES:
        also = [arg.split("=")[0] for arg in args.argv if arg.startswith("-") and arg != "--debug"]
        if also:
            raise CLIError(f"a config file is the only argument: put {', '.join(also)} in {args.model}")
        path = Path(args.model)
        if not path.is_file():
            raise CLIError(f"no such config file: {path}")
        read = parser.parse_json_file if path.suffix == ".json" else parser.parse_yaml_file
        try:
            return (*read(path, allow_extra_keys=False), str(path))
        except TrainingError:
            raise
        except (ValueError, TypeError, AttributeError, yaml.YAMLError) as err:  # HfArgumentParser's own words
            raise CLIError(f"{path}: {str(err).splitlines()[0]} (the options are the names `train --help` lists)")
    if args.model and args.model_name_or_path not in (None, args.model):
        raise CLIError("give the model once: as MODEL or as --model_name_or_path")
    if args.fsdp not in (None, True):  # TrainingArguments would read "full_shard" as accelerate's FSDP
        raise CLIError(
            f"--fsdp {args.fsdp!r}: this command shards with FSDP2 at load time, one decoder layer per unit; pass "
            "--fsdp alone"
        )
    values = {name: getattr(args, name) for name in names if name != "debug"}  # --debug: the command's tracebacks
    values["model_name_or_path"] = args.model or values["model_name_or_path"]
    # what HfArgumentParser.parse_args_into_dataclasses does with the namespace it parsed
    built = (cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values}) for cls in ARGUMENT_CLASSES)
    return (*built, None)


def run(args) -> int:
    run = TrainingRun(*parse(args))  # every option checked here, before any work
    trainer = run()
    if not trainer.is_world_process_zero():
        return 0
    print_results(trainer.state.log_history)
    print(f"saved the trained model to {run.output}")
    if run.url:
        print(f"uploaded: {run.url}")
    return 0


def print_results(log_history: list[dict]) -> None:
    """The first and last training loss, and the held-out loss when there was an evaluation."""
    losses = [e["loss"] for e in log_history if "loss" in e]
    if losses:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (ppl {math.exp(min(losses[-1], 50)):.2f})")
    evals = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    if evals:
        print(f"held-out loss {evals[-1]:.4f} (ppl {math.exp(min(evals[-1], 50)):.2f})")
