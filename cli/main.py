"""The `diff-transformer` command: convert, train, generate, serve, eval, push, demo.

Each command parses its options and calls the libraries: `modeling_diff_conversion` (loading, converting, writing
and uploading checkpoints), `modeling_diff_eval` (corpora and measurements) and `modeling_diff_training` (the
Trainer). Bad input prints one line `error: ...` and exits with status 2; add --debug to see the traceback instead.
"""

import argparse
import os
import sys

from transformers import HfArgumentParser

from . import convert_cmd, demo, evaluate, generate, push, serve, train
from .common import CLIError, LineTracker, say

COMMANDS = {
    "demo": (demo, "the whole workflow on SmolLM2-135M (embedded, offline): convert, fine-tune, evaluate, chat, save"),
    "convert": (convert_cmd, "convert a Llama, DiffLlama or Motif-2.6B checkpoint into a DiffTransformer folder"),
    "train": (
        train,
        "fine-tune or distil a model with the HF Trainer (resumable; DDP or --fsdp under torchrun; --lora adapters)",
    ),
    "generate": (generate, "stream a completion or a chat answer"),
    "eval": (evaluate, "perplexity and λ, or the paper's needle / attention-noise / outlier measurements"),
    "serve": (serve, "an OpenAI-compatible server (chat completions, continuous batching) over generate()"),
    "push": (push, "upload a model folder to the Hugging Face Hub (or --dry-run to list the files)"),
}

# what an interruption (Ctrl-C) leaves, for the commands that do not say it themselves
INTERRUPTED = {
    "generate": "generation stopped; nothing was written",
    "eval": "nothing was written",
    "serve": "the server stopped",
    "push": "no commit was made (the repository may have been created, empty)",
}


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows every option's default, as HfArgumentParser's help does."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diff-transformer",
        description="The Differential Transformer (paper V1 and DIFF V2) for Hugging Face Transformers.",
        epilog="Start with `diff-transformer demo`. Each command has its own --help.",
    )
    # each command is an HfArgumentParser: a command with ARGUMENT_CLASSES (train) gets an option per dataclass field
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=HfArgumentParser)
    for name, (module, help_text) in COMMANDS.items():
        dataclass_types = getattr(module, "ARGUMENT_CLASSES", None)
        command = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            dataclass_types=dataclass_types,
            formatter_class=DefaultsHelpFormatter if dataclass_types else argparse.RawDescriptionHelpFormatter,
            # a later flag takes over an option string from a dataclass field: the old spellings, and --debug
            conflict_handler="resolve" if dataclass_types else "error",
        )
        module.add_arguments(command)
        # last, so that for train it replaces TrainingArguments' own --debug (underflow/overflow detection), which
        # a config file still sets
        command.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
        command.set_defaults(run=module.run, parser=command)
    return parser


def error_text(err: Exception) -> str:
    """One line for an unexpected exception: its type (module-qualified when the name alone says nothing, as
    struct.error) and the first line of its message."""
    kind = type(err).__qualname__
    if kind.islower() or kind in ("Error", "Exception"):
        kind = f"{type(err).__module__}.{kind}"
    first = str(err).splitlines()[0] if str(err) else ""
    return f"{kind}: {first}" if first else kind


def main(argv=None) -> int:
    """Entry point of `diff-transformer`; returns the process exit status."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = build_parser().parse_args(argv)
    args.argv = argv  # as typed: what a command names back to the user
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stderr, sys.stderr = sys.stderr, LineTracker(sys.stderr)
    try:
        return args.run(args)
    except KeyboardInterrupt as err:
        # what the command kept or left as it was: its own words (train: which checkpoints stay), else INTERRUPTED's
        say(f"interrupted: {str(err) or INTERRUPTED.get(args.command, 'nothing was written')}")
        return 130
    except Exception as err:
        if args.debug:
            raise
        from modeling_diff_conversion import ConversionError
        from modeling_diff_eval import EvaluationError
        from modeling_diff_training import TrainingError

        for note in getattr(err, "__notes__", []):  # what a failed run left (train: its checkpoints)
            say(f"note: {note}")
        if isinstance(err, (CLIError, ConversionError, TrainingError, EvaluationError)):
            message = str(err)
            while message.startswith("error: "):
                message = message[len("error: ") :]
            say(f"error: {message}")
        else:
            say(f"error: {error_text(err)} (run again with --debug for the traceback)")
        return 2
    finally:
        sys.stderr = stderr


if __name__ == "__main__":
    sys.exit(main())
