"""A whole training run, as `diff-transformer train` does it, from the three argument dataclasses.

    from transformers import HfArgumentParser
    from modeling_diff_training import DataArguments, DiffTrainingArguments, ModelArguments, TrainingRun

    parser = HfArgumentParser((ModelArguments, DataArguments, DiffTrainingArguments))
    run = TrainingRun(*parser.parse_yaml_file("run.yaml"))
    trainer = run()  # prints `run.changes`: what the Trainer gets instead of the options as given, and why

What it adds to `train_model`: the trained model is written to `output_dir` once, at the end, as a complete folder
(atomically; an earlier output is replaced only with `overwrite_output_dir`, and only when this tool wrote it), while
the Trainer keeps resumable checkpoints in OUTPUT_DIR-checkpoints (`checkpoints.CheckpointsFolder`); a run resumes
the newest complete checkpoint of the same model; every input is checked apart from every output, and every option,
path and size before any model loads; `--fsdp` shards at load time; `--push_to_hub` uploads the finished folder.
"""

import contextlib
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

from modeling_diff_conversion.hub import check_repo_id, upload_folder
from modeling_diff_conversion.loading import check_config, load_model, load_tokenizer, resolve_model_path
from modeling_diff_conversion.output import (
    InterruptedAfterWriting,
    atomic_output_dir,
    check_apart,
    check_output_dir,
    deletion_problem,
    output_lock,
)
from modeling_diff_eval.corpus import train_eval_texts
from transformers import TrainingArguments, set_seed

from .arguments import DataArguments, ModelArguments, TrainingError
from .checkpoints import CheckpointsFolder, TrainedFrom, checkpoints_folder, complete_checkpoints, resume_point
from .data import check_fits_in_memory
from .fsdp import gather_fsdp_weights, load_fsdp_model, save_unsharded
from .lora import add_lora_adapters
from .trainer import build_trainer, run_training, token_blocks

WRITTEN_BY = "diff-transformer train"


class TrainingRun:
    """One run: `TrainingRun(model_args, data_args, training_args)` checks the options, `run()` does the rest.

    `training_args` are the options as the user gave them; `trainer_args` what the Trainer gets, which differ only as
    `changes` says: its output_dir is the checkpoints folder, it pushes nothing and keeps no Hub token (the run uploads
    the finished folder itself, and the Trainer would save the token into every checkpoint), and with `fsdp` it gets
    no fsdp of its own and no checkpoints.
    """

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                 config_file: str | None = None):
        self.model_args, self.data_args, self.training_args = model_args, data_args, training_args
        self.config_file = config_file  # an input too: never an output
        if not model_args.model_name_or_path:
            raise TrainingError("give the model to train: MODEL, or --model_name_or_path")
        self.fsdp = bool(training_args.fsdp)
        check_options(model_args, training_args.fsdp)
        self.output = Path(training_args.output_dir).expanduser()
        self.checkpoints = CheckpointsFolder(checkpoints_folder(self.output))
        self.push, self.token = training_args.push_to_hub, training_args.hub_token
        self.repo_id = training_args.hub_model_id or self.output.resolve().name
        changes = {"output_dir": str(self.checkpoints.path), "push_to_hub": False, "hub_token": None}
        self.changes = [
            f"the Trainer's checkpoints go to {self.checkpoints.path}; the trained model to {self.output}, at the end"
        ]
        if self.push:
            self.changes.append(f"--push_to_hub uploads the trained model to {self.repo_id} at the end, no checkpoint")
        if self.token:
            self.changes.append("--hub_token is kept off disk (the Trainer saves its arguments into every checkpoint)")
        if self.fsdp:
            changes.update(fsdp=None, save_strategy="no")
            self.changes.append(
                "--fsdp shards with FSDP2 as the model loads (transformers' DistributedConfig), not through "
                "accelerate; save_strategy 'no': transformers cannot checkpoint the optimizer of a model it sharded"
            )
        self.trainer_args = dataclasses.replace(training_args, **changes)
        self.main_process = self.trainer_args.process_index == 0
        self.resumed_from: str | None = None
        self.url: str | None = None  # where push_to_hub uploaded the model
        if self.push:
            check_repo_id(self.repo_id, owner_required=False)

    def run(self):
        """Train and save (and upload, with `push_to_hub`); returns the Trainer (its `state.log_history` has the
        losses). Once every check has passed, it prints `changes` (stderr) and the checkpoint it resumes from."""
        model_args, data_args, args = self.model_args, self.data_args, self.trainer_args
        overwrite, name = args.overwrite_output_dir, model_args.model_name_or_path
        self.check_inputs_apart()
        # one run per output folder: the lock also proves, before any work, that the output's folder is writable
        with output_lock(self.output) if self.main_process else contextlib.nullcontext():
            check_output_dir(self.output, overwrite)
            self.checkpoints.check()
            for checkpoint in self.checkpoints.checkpoints() if overwrite else []:
                problem = deletion_problem(checkpoint)
                if problem:
                    raise TrainingError(
                        f"--overwrite_output_dir cannot delete the earlier checkpoint {checkpoint}: {problem}"
                    )
            folder, gguf_file = resolve_model_path(name)
            if gguf_file is None:  # a Hub id: where it resolved to, in the HF cache
                check_apart(self.output, {"MODEL": folder})
                check_apart(self.checkpoints.path, {"MODEL": folder})
            source = TrainedFrom.of(Path(folder) / (gguf_file or ""), name=model_name(name))
            config = check_config(folder, gguf_file, name)
            resume, source = resume_point(
                self.checkpoints.path, source, args.resume_from_checkpoint, overwrite, model_config=config.to_dict()
            )
            if resume and self.fsdp:
                raise TrainingError(
                    f"an --fsdp run cannot resume, and {resume} is a checkpoint: pass --overwrite_output_dir"
                )
            if model_args.distill_from:  # the teacher must share the tokenizer: its config says so before any load
                teacher_config = check_config(*resolve_model_path(model_args.distill_from), model_args.distill_from)
                if teacher_config.vocab_size != config.vocab_size:
                    raise TrainingError(
                        f"--distill_from has vocabulary {teacher_config.vocab_size}, the model {config.vocab_size}: "
                        "teacher and student must share a tokenizer"
                    )
            check_fits_in_memory(
                config, data_args.seq_len, args.per_device_train_batch_size,
                gradient_checkpointing=args.activation_checkpointing,
            )
            train_texts, eval_texts = train_eval_texts(data_args.dataset, data_args.eval_fraction, args.seed)
            tokenizer = load_tokenizer(folder, gguf_file, name=name)
            train_data, eval_data = token_blocks(train_texts, eval_texts, tokenizer, data_args.seq_len,
                                                 args.eval_strategy)
            model, teacher = self.load_models(tokenizer)
            try:
                trainer = build_trainer(
                    model, tokenizer, train_data, args, eval_texts=eval_data, seq_len=data_args.seq_len,
                    lambda_warmup_steps=model_args.lambda_warmup_steps, teacher=teacher,
                    distill_weight=model_args.distill_weight, trained_from=source,
                )
            except BaseException:
                self.after_failure()  # the Trainer made the checkpoints folder: it goes again
                raise
            # everything is checked: only now may the earlier run's checkpoints go
            if self.main_process:
                self.checkpoints.prepare()
                if overwrite:
                    self.checkpoints.clear()
            self.resumed_from = resume
            if self.main_process:  # what the Trainer got instead of the options as given, now that it starts
                for change in self.changes:
                    print(f"note: {change}", file=sys.stderr)
            if resume:
                print(f"resuming from {resume}")
            try:
                run_training(trainer, resume)
                state_dict = gather_fsdp_weights(trainer) if self.fsdp else None  # every rank takes part
                if not trainer.is_world_process_zero():
                    return trainer  # under torchrun / accelerate launch, rank 0 alone writes the result
                self.save(trainer, tokenizer, state_dict)
            except InterruptedAfterWriting:
                raise  # the output is complete: its message says so
            except KeyboardInterrupt:
                raise KeyboardInterrupt(self.after_failure()) from None
            except Exception as err:
                err.add_note(self.after_failure())  # the CLI prints it as a `note:` line before the error
                raise
            note = self.checkpoints.finish(source)
        if note:
            print(f"note: {note}", file=sys.stderr)
        if self.push:
            self.url = upload_folder(
                self.output, self.repo_id, bool(args.hub_private_repo), args.hub_revision, token=self.token
            )
        return trainer

    __call__ = run

    def check_inputs_apart(self) -> None:
        """Refuse an output folder (the model's, or its checkpoints') that is, holds or lies inside an input, by file
        identity (a symlink, hard link or bind mount of an input is that input)."""
        inputs = {
            "MODEL": self.model_args.model_name_or_path,
            "--dataset": self.data_args.dataset,
            "--distill_from": self.model_args.distill_from,
            "the config file": self.config_file,
        }
        check_apart(self.output, {**inputs, "--resume_from_checkpoint": self.training_args.resume_from_checkpoint})
        check_apart(self.checkpoints.path, inputs)  # a checkpoint of this folder may be resumed

    def load_models(self, tokenizer):
        """(the model to train, with LoRA adapters when asked; the distillation teacher or None)."""
        model_args, name = self.model_args, self.model_args.model_name_or_path
        model, _ = load_fsdp_model(name, tokenizer) if self.fsdp else load_model(name, tokenizer=tokenizer)
        if model_args.lora:
            if Path(name).expanduser().is_dir():
                # the adapter's base_model_name_or_path: an absolute folder, so that the adapter loads from anywhere
                model.name_or_path = str(Path(name).expanduser().resolve())
            set_seed(self.trainer_args.seed)  # the LoRA A matrices are drawn at random: same seed, same run
            model = add_lora_adapters(model, model_args.lora_r or 16, model_args.lora_alpha or 32)
        teacher = load_model(model_args.distill_from)[0] if model_args.distill_from else None
        return model, teacher

    def save(self, trainer, tokenizer, state_dict=None) -> None:
        """Write the trained model (or LoRA adapter), its tokenizer and the run's log history to the output folder,
        atomically: it replaces an earlier output of this tool only with --overwrite_output_dir, once complete."""
        overwrite = self.trainer_args.overwrite_output_dir
        with atomic_output_dir(self.output, overwrite, written_by=WRITTEN_BY) as tmp:
            if state_dict is not None:
                save_unsharded(trainer.model.config, state_dict, tmp)
            elif self.model_args.lora and self.model_args.merge_lora:
                trainer.model.merge_and_unload().save_pretrained(tmp)
            else:
                trainer.save_model(str(tmp))  # a PEFT model saves its adapter (and the λ modules_to_save)
            tokenizer.save_pretrained(tmp)
            trainer.state.save_to_json(str(tmp / "trainer_state.json"))  # the run's log history

    def after_failure(self) -> str:
        """What a failed or interrupted run leaves, as a sentence (rank 0 tidies up; the others only say it)."""
        if not self.main_process:
            path = self.checkpoints.path
            complete = complete_checkpoints(path) if path.is_dir() else []
            return f"the checkpoints in {path} are kept" if complete else "nothing was written"
        return self.checkpoints.after_failure()


def check_options(model_args: ModelArguments, fsdp) -> None:
    """Refuse option combinations that cannot work, before anything is loaded."""
    if (model_args.merge_lora or model_args.lora_r is not None or model_args.lora_alpha is not None) and not (
        model_args.lora
    ):
        raise TrainingError("--merge-lora, --lora-r and --lora-alpha need --lora")
    if model_args.lora and fsdp:
        raise TrainingError(
            "--lora with --fsdp is not supported: LoRA trains few parameters, run it with plain torchrun (DDP)"
        )
    if fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise TrainingError(
            "--fsdp shards the model over several processes: run under torchrun --nproc_per_node N (N >= 2)"
        )
    if model_args.lora and not model_args.merge_lora and Path(model_args.model_name_or_path).suffix == ".gguf":
        raise TrainingError(
            "a LoRA adapter needs a base model folder, not a .gguf file: add --merge-lora, or convert the "
            "model to a folder first"
        )
    if model_args.lora and model_args.distill_from:
        raise TrainingError("--lora with --distill-from is not supported")
    if model_args.lora and importlib.util.find_spec("peft") is None:
        raise TrainingError("--lora needs PEFT: pip install 'modeling-diff[lora]'")


def model_name(model: str) -> str:
    """How checkpoint records name a model: a local path made absolute, a Hub id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
