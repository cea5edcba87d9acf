"""`diff-transformer train`: fine-tune (or distil) a causal LM with the Hugging Face Trainer.

Every option of transformers' TrainingArguments works under its own name (--learning_rate, --lr_scheduler_type,
--warmup_steps, --save_total_limit, --report_to, --push_to_hub, ...), with this project's defaults. The trained model
goes to --output_dir; resumable checkpoints go to OUTPUT_DIR-checkpoints meanwhile. Instead of options, MODEL may be a
.json or .yaml file that holds them all (`model_name_or_path: ...`, `output_dir: ...`, ...).
"""

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import fields
from pathlib import Path

import yaml
from modeling_diff_conversion.hub import check_repo_id, upload_folder
from modeling_diff_conversion.output import (
    InterruptedAfterWriting,
    atomic_output_dir,
    check_apart,
    check_output_dir,
    deletion_problem,
    output_lock,
)
from modeling_diff_training import (
    DataArguments,
    DiffTrainingArguments,
    ModelArguments,
    add_lora_adapters,
    build_trainer,
    check_fits_in_memory,
    run_training,
    save_lora_adapter,
    token_blocks,
)
from modeling_diff_training.checkpoints import (
    CheckpointsFolder,
    TrainedFrom,
    checkpoints_folder,
    complete_checkpoints,
    resume_point,
)
from modeling_diff_training.fsdp import gather_fsdp_weights, load_fsdp_model, save_unsharded
from transformers import HfArgumentParser, set_seed

from .common import CLIError, check_config, load_model, load_tokenizer, resolve_model_path, say
from .data import train_eval_texts

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


class DeprecatedSpelling(argparse.Action):
    """An old flag: sets the option it was renamed to, and prints one deprecation line."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"warning: {option_string} is deprecated and goes away in the next release; use --{self.dest}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_arguments(parser):
    """MODEL and the old spellings; main.py adds an option per field of ARGUMENT_CLASSES (an HfArgumentParser)."""
    parser.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="the model to train: a folder, a Hub id or a .gguf file; or a .json/.yaml config file with every "
        "option, then the only argument",
    )
    # TrainingArguments' own --fsdp, with what it does here (accelerate's FSDP would not shard on CPU)
    parser.add_argument(
        "--fsdp",
        nargs="?",
        const=True,
        default=None,
        help="shard parameters, gradients and optimizer state over the processes of torchrun / accelerate launch "
        "with FSDP2 at load time, one decoder layer (the model's _no_split_modules) per unit; no checkpoints",
    )
    old = parser.add_argument_group("old spellings (deprecated: they go away in the next release)")
    for flag, (dest, kind) in DEPRECATED_SPELLINGS.items():
        old.add_argument(
            *dict.fromkeys([flag, "--" + flag[2:].replace("_", "-")]),  # dashed too, as HfArgumentParser's options
            dest=dest,
            action=DeprecatedSpelling,
            nargs=0 if kind is None else None,
            const=True if kind is None else None,
            type=kind,
            default=argparse.SUPPRESS,
            help=f"use --{dest}",
        )


def argument_values(args) -> dict:
    """The options as {name: value}: from the command line, or from MODEL when it is a config file."""
    defaults = vars(HfArgumentParser(ARGUMENT_CLASSES).parse_args([]))  # what the parser fills in when not given
    defaults.pop("debug")  # the command's own --debug (tracebacks) replaces TrainingArguments' debug features
    given = {name: getattr(args, name) for name in defaults}
    if args.model and Path(args.model).suffix in CONFIG_SUFFIXES:
        also = [f"--{name}" for name, value in given.items() if value != defaults[name]]
        if also:
            raise CLIError(f"a config file is the only argument: put {', '.join(also)} in {args.model}")
        return config_file_values(Path(args.model))
    if args.model and given["model_name_or_path"] not in (None, args.model):
        raise CLIError("give the model once: as MODEL or as --model_name_or_path")
    if args.model:
        given["model_name_or_path"] = args.model
    return given


def config_file_values(path: Path) -> dict:
    """{option: value} from a .json or .yaml file, with the names of `--help` (no dashes)."""
    if not path.is_file():
        raise CLIError(f"no such config file: {path}")
    try:
        values = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as err:
        raise CLIError(f"{path} is not valid {path.suffix[1:].upper()}: {str(err).splitlines()[0]}")
    if not isinstance(values, dict):
        raise CLIError(f"{path} must hold a mapping from option names to values")
    unknown = sorted(set(values) - {f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init})
    if unknown:
        raise CLIError(f"{path} has unknown options {', '.join(unknown)}: use the names `train --help` lists")
    return values


def check_scale_out_flags(model_args, fsdp) -> None:
    """Refuse flag combinations that cannot work, before anything is loaded."""
    if (model_args.merge_lora or model_args.lora_r is not None or model_args.lora_alpha is not None) and not (
        model_args.lora
    ):
        raise CLIError("--merge-lora, --lora-r and --lora-alpha need --lora")
    if fsdp not in (None, True):
        raise CLIError(
            f"--fsdp {fsdp!r}: this command shards with FSDP2 at load time, one decoder layer per unit; pass --fsdp "
            "alone"
        )
    if model_args.lora and fsdp:
        raise CLIError(
            "--lora with --fsdp is not supported: LoRA trains few parameters, run it with plain torchrun (DDP)"
        )
    if fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise CLIError(
            "--fsdp shards the model over several processes: run under torchrun --nproc_per_node N (N >= 2)"
        )
    if model_args.lora and not model_args.merge_lora and Path(model_args.model_name_or_path).suffix == ".gguf":
        raise CLIError(
            "a LoRA adapter needs a base model folder, not a .gguf file: add --merge-lora, or convert the "
            "model to a folder first"
        )
    if model_args.lora and model_args.distill_from:
        raise CLIError("--lora with --distill-from is not supported")


def parse_arguments(args):
    """(ModelArguments, DataArguments, DiffTrainingArguments, final output folder, whether to push it).

    The Trainer's output_dir becomes OUTPUT_DIR-checkpoints: the trained model is written to OUTPUT_DIR only at the
    end. With --fsdp the model is sharded at load time instead of by accelerate, and keeps no checkpoints; with
    --push_to_hub the finished folder is uploaded at the end (the Trainer pushes no checkpoints).
    """
    values = argument_values(args)
    if not values.get("model_name_or_path"):
        raise CLIError("give the model to train: MODEL, or --model_name_or_path")
    if not values.get("output_dir"):
        raise CLIError("--output_dir is required: the folder the trained model is saved to")
    output = Path(values["output_dir"]).expanduser()
    fsdp, push = values.get("fsdp"), values.get("push_to_hub", False)
    values.update(output_dir=str(checkpoints_folder(output)), push_to_hub=False, fsdp=None)
    if fsdp:
        values["save_strategy"] = "no"  # transformers cannot checkpoint the optimizer of a model it sharded
    model_args, data_args, training_args = HfArgumentParser(ARGUMENT_CLASSES).parse_dict(values)
    check_scale_out_flags(model_args, fsdp)
    return model_args, data_args, training_args, output, fsdp, push


def run(args) -> int:
    model_args, data_args, training_args, output, fsdp, push = parse_arguments(args)  # every option checked here
    # the Hub token never reaches a file: the Trainer pickles its arguments into every checkpoint and the output
    token, training_args.hub_token = training_args.hub_token, None
    checkpoints = CheckpointsFolder(training_args.output_dir)
    overwrite, main_process = training_args.overwrite_output_dir, training_args.process_index == 0
    config_file = args.model if args.model and Path(args.model).suffix in CONFIG_SUFFIXES else None
    check_inputs_apart(model_args, data_args, training_args, output, checkpoints.path, config_file)
    if push:
        check_repo_id(training_args.hub_model_id or output.resolve().name, owner_required=False)
    # one run per output folder: the lock also proves, before any work, that the output's folder is writable
    with output_lock(output) if main_process else contextlib.nullcontext():
        check_output_dir(output, overwrite, flag="--overwrite_output_dir")
        checkpoints.check()
        for checkpoint in checkpoints.checkpoints() if overwrite else []:
            problem = deletion_problem(checkpoint)
            if problem:
                raise CLIError(f"--overwrite_output_dir cannot delete the earlier checkpoint {checkpoint}: {problem}")
        folder, gguf_file = resolve_model_path(model_args.model_name_or_path)
        if gguf_file is None:  # a Hub id: where it resolved to, in the HF cache
            check_apart(output, {"MODEL": folder})
            check_apart(checkpoints.path, {"MODEL": folder})
        source = TrainedFrom.of(Path(folder) / (gguf_file or ""), name=model_name(model_args.model_name_or_path))
        config = check_config(folder, gguf_file, model_args.model_name_or_path)
        resume, source = resume_point(
            checkpoints.path, source, training_args.resume_from_checkpoint, overwrite, model_config=config.to_dict()
        )
        if resume and fsdp:
            raise CLIError(f"an --fsdp run cannot resume, and {resume} is a checkpoint: pass --overwrite_output_dir")
        if model_args.distill_from:  # the teacher must share the tokenizer: its config says so before any load
            teacher_config = check_config(*resolve_model_path(model_args.distill_from), model_args.distill_from)
            if teacher_config.vocab_size != config.vocab_size:
                raise CLIError(
                    f"--distill_from has vocabulary {teacher_config.vocab_size}, the model {config.vocab_size}: "
                    "teacher and student must share a tokenizer"
                )
        check_fits_in_memory(
            config,
            data_args.seq_len,
            training_args.per_device_train_batch_size,
            gradient_checkpointing=training_args.activation_checkpointing,
        )
        train_texts, eval_texts = train_eval_texts(data_args.dataset, data_args.eval_fraction, training_args.seed)
        tokenizer = load_tokenizer(folder, gguf_file, name=model_args.model_name_or_path)
        train_data, eval_data = token_blocks(
            train_texts, eval_texts, tokenizer, data_args.seq_len, training_args.eval_strategy
        )
        model, teacher = load_models(model_args, fsdp, tokenizer, training_args.seed)
        try:
            trainer = build_trainer(
                model,
                tokenizer,
                train_data,
                training_args,
                eval_texts=eval_data,
                seq_len=data_args.seq_len,
                lambda_warmup_steps=model_args.lambda_warmup_steps,
                teacher=teacher,
                distill_weight=model_args.distill_weight,
                trained_from=source,
            )
        except BaseException:
            after_failure(checkpoints, main_process)  # the Trainer made the checkpoints folder: it goes again
            raise
        # everything is checked: only now may the earlier run's checkpoints go
        if main_process:
            checkpoints.prepare()
            if overwrite:
                checkpoints.clear()
        print(f"resuming from {resume}" if resume else f"checkpoints go to {checkpoints.path} while training")
        try:
            run_training(trainer, resume)
            state_dict = gather_fsdp_weights(trainer) if fsdp else None  # every rank takes part
            if not trainer.is_world_process_zero():
                return 0  # under torchrun / accelerate launch, rank 0 alone writes the result
            save_trained(trainer, tokenizer, model_args, output, overwrite, state_dict)
        except InterruptedAfterWriting:
            raise  # the output is complete: its message says so
        except KeyboardInterrupt:
            raise KeyboardInterrupt(after_failure(checkpoints, main_process)) from None
        except Exception:
            say(f"note: {after_failure(checkpoints, main_process)}")
            raise
        note = checkpoints.finish(source)
    if note:
        say(f"note: {note}")
    print_results(trainer.state.log_history)
    print(f"saved the trained model to {output}")
    if push:
        repo_id = training_args.hub_model_id or output.resolve().name
        private = bool(training_args.hub_private_repo)
        url = upload_folder(output, repo_id, private, training_args.hub_revision, token=token)
        print(f"uploaded: {url}")
    return 0


def load_models(model_args, fsdp, tokenizer, seed):
    """(the model to train, with LoRA adapters when asked; the distillation teacher or None)."""
    name = model_args.model_name_or_path
    model, _ = load_fsdp(name) if fsdp else load_model(name, tokenizer=tokenizer)
    if model_args.lora:
        if Path(name).expanduser().is_dir():
            # the adapter's base_model_name_or_path: an absolute folder, so that the adapter loads from anywhere
            model.name_or_path = str(Path(name).expanduser().resolve())
        set_seed(seed)  # the LoRA A matrices are drawn at random: same seed, same run
        model = add_lora_adapters(model, model_args.lora_r or 16, model_args.lora_alpha or 32)
    teacher = load_model(model_args.distill_from)[0] if model_args.distill_from else None
    return model, teacher


def check_inputs_apart(model_args, data_args, training_args, output: Path, checkpoints: Path, config_file=None):
    """Refuse an output folder (the model's, or its checkpoints') that is, holds or lies inside an input, by file
    identity (a symlink, hard link or bind mount of an input is that input)."""
    inputs = {
        "MODEL": model_args.model_name_or_path,
        "--dataset": data_args.dataset,
        "--distill_from": model_args.distill_from,
        "the config file": config_file,
    }
    check_apart(output, {**inputs, "--resume_from_checkpoint": training_args.resume_from_checkpoint})
    check_apart(checkpoints, inputs)  # a checkpoint of this folder may be resumed


def model_name(model: str) -> str:
    """How checkpoint records name a model: a local path made absolute, a Hub id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def save_trained(trainer, tokenizer, model_args, output: Path, overwrite: bool, state_dict) -> None:
    """Write the trained model (or LoRA adapter), its tokenizer and the run's log history to `output`, atomically: it
    replaces an earlier output of this tool only with --overwrite_output_dir, and only once it is complete."""
    flag, written_by = "--overwrite_output_dir", "diff-transformer train"
    with atomic_output_dir(output, force=overwrite, flag=flag, written_by=written_by) as tmp:
        if state_dict is not None:
            save_unsharded(trainer.model.config, state_dict, tmp)
        elif model_args.lora and model_args.merge_lora:
            trainer.model.merge_and_unload().save_pretrained(tmp)
        elif model_args.lora:
            save_lora_adapter(trainer.model, tmp)
        else:
            trainer.save_model(str(tmp))
        tokenizer.save_pretrained(tmp)
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))  # the run's log history


def after_failure(checkpoints: CheckpointsFolder, main_process: bool) -> str:
    """What a failed or interrupted run leaves, as a sentence (rank 0 tidies up; the others only say it)."""
    if not main_process:
        complete = complete_checkpoints(checkpoints.path) if checkpoints.path.is_dir() else []
        return f"the checkpoints in {checkpoints.path} are kept" if complete else "nothing was written"
    return checkpoints.after_failure()


def load_fsdp(model: str):
    """The model sharded over this torchrun job with FSDP2 at load time, and its tokenizer."""
    folder, gguf_file = resolve_model_path(model)
    if gguf_file:
        raise CLIError("--fsdp needs a model folder, not a .gguf file: convert the model to a folder first")
    return load_fsdp_model(folder), load_tokenizer(folder, name=model)


def print_results(log_history: list[dict]) -> None:
    """The first and last training loss, and the held-out loss when there was an evaluation."""
    losses = [e["loss"] for e in log_history if "loss" in e]
    if losses:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (ppl {math.exp(min(losses[-1], 50)):.2f})")
    evals = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    if evals:
        print(f"held-out loss {evals[-1]:.4f} (ppl {math.exp(min(evals[-1], 50)):.2f})")
