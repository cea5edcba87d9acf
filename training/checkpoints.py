"""Checkpoints that belong to one run: what the run was trained from, which checkpoints are complete, where to resume.

Every checkpoint records what its run was trained from (`TrainedFrom`: the model and a fingerprint of its config and
weights) in its `trainer_state.json`, through the Trainer's own mechanism for stateful callbacks. `resume_point`
then resumes only checkpoints of the same model, and skips incomplete ones (a run killed or a disk full during a
save) with a warning, where transformers' `get_last_checkpoint` would pick the newest folder whatever it holds.
`NoFinalCheckpoint` keeps a resumed run to the steps an uninterrupted one takes.
"""

import contextlib
import fnmatch
import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .arguments import TrainingError

logger = logging.get_logger(__name__)

# the files that define a model (or a LoRA adapter): what a fingerprint covers
MODEL_FILES = (
    "config.json",
    "adapter_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "*.gguf",
)
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")  # torch.save's zip archives
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
MARKER = ".diff-transformer-checkpoints.json"  # in a checkpoints folder that `train` made


def checkpoints_folder(output_dir: str | Path) -> Path:
    """Where a run that saves its model to `output_dir` keeps its resumable checkpoints: OUTPUT_DIR-checkpoints,
    beside it (the real path), so the model folder itself is written only once, at the end."""
    return Path(str(Path(output_dir).expanduser().resolve()) + "-checkpoints")


def fingerprint(path: str | Path) -> str:
    """sha256 over the files that define a model: a folder's config and weights (`MODEL_FILES`), or one .gguf file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.iterdir())
    files = [f for f in files if f == path or (f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in MODEL_FILES))]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            digest.update(f"{file.name}\0".encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


class TrainedFrom(TrainerCallback, ExportableState):
    """What a run was trained from, written into every checkpoint's `trainer_state.json` (`stateful_callbacks`)."""

    def __init__(self, model: str, fingerprint: str):
        self.model, self.fingerprint = model, fingerprint

    def state(self) -> dict:
        return {"args": {"model": self.model, "fingerprint": self.fingerprint}, "attributes": {}}

    @classmethod
    def of(cls, path: str | Path, name: str | None = None) -> "TrainedFrom":
        """The record of a model folder or .gguf file; `name` is how messages refer to it (default: its path)."""
        return cls(name or str(Path(path).resolve()), fingerprint(path))

    @classmethod
    def recorded_in(cls, checkpoint: str | Path) -> "TrainedFrom | None":
        """The record a checkpoint holds, or None (a checkpoint written without `TrainedFrom`)."""
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        recorded = state.get("stateful_callbacks", {}).get(cls.__name__)
        return cls(**recorded["args"]) if recorded else None


class NoFinalCheckpoint(TrainerCallback):
    """Skips the checkpoint of the last step: the trained model is saved at the end anyway.

    The Trainer resumed from a checkpoint taken at `max_steps` trains one step more before it stops. Without that
    checkpoint, a run interrupted after its last step (during the final evaluation or save) resumes from the one
    before and redoes the last step, so it ends where an uninterrupted run ends.
    """

    def on_step_end(self, args, state, control, **kwargs):
        self._skip_at_the_end(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._skip_at_the_end(args, state, control)

    def _skip_at_the_end(self, args, state, control):
        if state.global_step >= state.max_steps and not args.load_best_model_at_end:
            control.should_save = False


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed, or None when it is complete.

    The Trainer writes `trainer_state.json` last, so a save that was cut short lacks it; a weight or optimizer file
    cut short (a full disk) is caught by its length: safetensors by its header, torch's zip files by their end record.
    """
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json"
    try:
        json.loads(state.read_text())
    except ValueError:
        return "its trainer_state.json is cut short"
    weights = [checkpoint / name for name in WEIGHT_FILES if (checkpoint / name).is_file()]
    for index in WEIGHT_INDEXES:
        if (checkpoint / index).is_file():
            try:
                shards = set(json.loads((checkpoint / index).read_text())["weight_map"].values())
            except (ValueError, KeyError):
                return f"its {index} is cut short"
            missing = sorted(s for s in shards if not (checkpoint / s).is_file())
            if missing:
                return f"its weight file {missing[0]} is missing"
            weights += [checkpoint / s for s in sorted(shards)]
    if not weights:
        return "it has no weight file"
    for file in weights:
        if file.suffix == ".safetensors" and not _safetensors_complete(file):
            return f"its {file.name} is cut short"
    torch_files = [f for pattern in TORCH_FILES for f in checkpoint.glob(pattern)]
    for file in [*torch_files, *(w for w in weights if w.suffix == ".bin")]:
        if not zipfile.is_zipfile(file):
            return f"its {file.name} is cut short"
    return None


def _safetensors_complete(path: Path) -> bool:
    """Whether a .safetensors file holds every byte its header announces."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + header_len > size:
            return False
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return size >= 8 + header_len + end


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """The complete `checkpoint-N` folders of `folder`, oldest first; each incomplete one is skipped with a warning."""
    found = sorted(
        (int(m.group(1)), p) for p in Path(folder).iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))
    )
    complete = []
    for _, checkpoint in found:
        problem = checkpoint_problem(checkpoint)
        if problem:
            logger.warning(f"skipping the incomplete checkpoint {checkpoint}: {problem}")
        else:
            complete.append(checkpoint)
    return complete


def resume_point(
    folder: str | Path,
    source: TrainedFrom,
    resume_from_checkpoint: str | None = None,
    overwrite_output_dir: bool = False,
    model_config: dict | None = None,
) -> tuple[str | None, TrainedFrom]:
    """(the checkpoint to resume from or None, the record this run's checkpoints get), for checkpoints in `folder`.

    - `resume_from_checkpoint`: that checkpoint, which must be complete and of the same model: one recorded as
      trained from another model is refused, and one without a record is compared with `model_config` (the model's
      config.json values; refused when its architecture differs, resumed with a warning otherwise). The run continues
      its record (or, for a checkpoint without one, records the checkpoint's own files).
    - `overwrite_output_dir`: start afresh (the caller deletes `folder`).
    - otherwise the newest complete checkpoint in `folder`, when it was trained from `source`; checkpoints of
      another model are refused, never resumed or mixed with this run's.
    """
    folder = Path(folder)
    if resume_from_checkpoint:
        checkpoint = Path(resume_from_checkpoint).expanduser()
        problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "it is not a folder"
        if problem:
            raise TrainingError(f"cannot resume from {resume_from_checkpoint}: {problem}")
        if overwrite_output_dir and checkpoint.resolve().is_relative_to(folder.resolve()):
            raise TrainingError(
                f"--overwrite_output_dir would delete {folder}, which holds the checkpoint to resume from"
            )
        recorded = TrainedFrom.recorded_in(checkpoint)
        check_resumes_the_model(checkpoint, recorded, source, model_config, name=resume_from_checkpoint)
        source = recorded or TrainedFrom.of(checkpoint)
    if overwrite_output_dir or not folder.is_dir():
        return (str(checkpoint) if resume_from_checkpoint else None), source
    complete = complete_checkpoints(folder)
    if complete:
        recorded = TrainedFrom.recorded_in(complete[-1])
        if recorded is None or recorded.fingerprint != source.fingerprint:
            if recorded is None:
                theirs = "an unrecorded model"
            elif recorded.model == source.model:
                theirs = f"an earlier version of {recorded.model} (its config or weights changed since)"
            else:
                theirs = recorded.model
            raise TrainingError(
                f"{folder} holds checkpoints of a run trained from {theirs}, not from {source.model}: pass "
                "--overwrite_output_dir to start afresh (deleting them), or --resume_from_checkpoint PATH to continue "
                "one of them"
            )
    if resume_from_checkpoint:
        return str(checkpoint), source
    return (str(complete[-1]) if complete else None), source


# what a checkpoint without a record must share with the model it is resumed under
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def check_resumes_the_model(
    checkpoint: Path, recorded: "TrainedFrom | None", source: TrainedFrom, model_config: dict | None, name: str
) -> None:
    """Refuse to resume `checkpoint` under a model it was not trained from: the run would train the checkpoint's
    weights under the model's tokenizer, and call the result a fine-tune of the model."""
    if recorded is not None:
        if recorded.fingerprint != source.fingerprint:
            theirs = (
                f"an earlier version of {recorded.model} (its config or weights changed since)"
                if recorded.model == source.model
                else recorded.model
            )
            raise TrainingError(
                f"--resume_from_checkpoint {name} continues a run trained from {theirs}, not from {source.model}: "
                "resume it with that model as MODEL, or give the checkpoint as MODEL to fine-tune its weights afresh"
            )
        return
    config_path = checkpoint / "config.json"
    if model_config is not None and config_path.is_file():
        theirs = json.loads(config_path.read_text())
        for key in ARCHITECTURE_KEYS:
            if key in theirs and key in model_config and theirs[key] != model_config[key]:
                raise TrainingError(
                    f"--resume_from_checkpoint {name} is a checkpoint of another model ({key} {theirs[key]!r}, "
                    f"{source.model} has {model_config[key]!r}): resume it with its own model as MODEL"
                )
    logger.warning(
        f"{name} records no model it was trained from: its weights and optimizer state continue under the "
        f"tokenizer of {source.model}"
    )


class CheckpointsFolder:
    """OUTPUT_DIR-checkpoints, where `train` keeps its resumable checkpoints: what it may write and delete there.

    A folder this tool made carries `MARKER`. A folder without it is used only when it is empty
    or holds nothing but checkpoints recorded by `TrainedFrom` (a run of an earlier version, which gets the marker);
    anything else is the user's and refused before any work. Only `checkpoint-N` folders are ever deleted: all of
    them to start afresh (`clear`), this run's lineage at the end (`finish`); the folder itself only when it is
    marked and nothing else is left in it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.created = False  # made by this run (`check` finds it absent)
        self.cleared: list[str] = []  # earlier checkpoints deleted to start afresh

    def marked(self) -> bool:
        marker = self.path / MARKER
        try:
            return json.loads(marker.read_text()).get("kind") == "checkpoints" and not marker.is_symlink()
        except (OSError, ValueError, AttributeError):
            return False

    def checkpoints(self) -> list[Path]:
        """The `checkpoint-N` folders here (not symlinks), oldest first."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _CHECKPOINT.match(p.name))]
        return [p for _, p in sorted(found) if p.is_dir() and not p.is_symlink()]

    def check(self) -> None:
        """Refuse, before any work, a folder this run must not write into."""
        path = self.path
        self.created = not path.exists() and not path.is_symlink()  # the Trainer makes it when it is built
        if path.is_symlink():
            raise TrainingError(
                f"{path} is a symlink: train keeps its checkpoints in a folder of its own there; move the link away"
            )
        if not path.exists():
            return
        if not path.is_dir():
            raise TrainingError(f"{path} is a file: train keeps its checkpoints there; move the file away")
        if not self.marked():
            checkpoints = set(self.checkpoints())
            foreign = [p.name for p in sorted(path.iterdir()) if p not in checkpoints or not _recorded(p)]
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise TrainingError(
                    f"{path} exists and was not made by diff-transformer train (it holds {shown}): train keeps its "
                    "resumable checkpoints there; move that folder away, or choose another --output_dir"
                )

    def prepare(self) -> None:
        """Make the folder with its marker (or mark the folder of an earlier version's run); after `check`."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.created or (not self.marked() and self.checkpoints()):
            record = {"written_by": "diff-transformer train", "kind": "checkpoints"}
            (self.path / MARKER).write_text(json.dumps(record) + "\n")

    def clear(self) -> None:
        """Delete the earlier runs' checkpoints, to start afresh (`--overwrite_output_dir`)."""
        for checkpoint in self.checkpoints():
            shutil.rmtree(checkpoint)
            self.cleared.append(checkpoint.name)

    def finish(self, source: TrainedFrom) -> str | None:
        """After a successful run: delete its checkpoints (recorded as trained from `source`, or cut short), then the
        folder when it is marked and holds nothing else. Returns a note when something is kept, else None."""
        for checkpoint in self.checkpoints():
            recorded = _recorded(checkpoint)
            if recorded is None or recorded.fingerprint == source.fingerprint:
                shutil.rmtree(checkpoint, ignore_errors=True)
        if not self.path.is_dir():
            return None
        left = sorted(p.name for p in self.path.iterdir() if p.name != MARKER)
        if left:
            return f"kept {self.path}: it holds {', '.join(left[:3])}, which this run did not write"
        if self.marked():
            (self.path / MARKER).unlink()
            self.path.rmdir()
        return None

    def after_failure(self) -> str:
        """What a failed or interrupted run leaves: complete checkpoints stay for the same command to resume; a folder
        this run made without one is removed. Returns that, as a sentence."""
        complete = complete_checkpoints(self.path) if self.path.is_dir() else []
        if complete:
            return f"the checkpoints in {self.path} are kept; the same command resumes from {complete[-1].name}"
        if self.created:
            for checkpoint in self.checkpoints():
                shutil.rmtree(checkpoint, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.path / MARKER).unlink()
                self.path.rmdir()
        said = "nothing was written"
        if self.cleared:
            said += (
                f"; the earlier checkpoints in {self.path} were deleted to start afresh ({', '.join(self.cleared)})"
            )
        return said


def _recorded(checkpoint: Path) -> "TrainedFrom | None":
    """The `TrainedFrom` record of a checkpoint folder, or None (none, or no readable trainer_state.json)."""
    try:
        return TrainedFrom.recorded_in(checkpoint)
    except (OSError, ValueError, TypeError, KeyError):
        return None
