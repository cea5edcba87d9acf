"""What every command shares: one-line errors, stderr lines that start on a line of their own, option spellings."""

import argparse
import sys


class CLIError(Exception):
    """Bad input: printed as one line `error: ...` with exit code 2 (a traceback only with --debug)."""


class LineTracker:
    """stderr, remembering whether the last thing written ended its line: a progress bar leaves its line open (it
    redraws it with \\r), and a message printed after it must start on a line of its own."""

    def __init__(self, stream):
        self.stream, self.at_line_start = stream, True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def say(line: str) -> None:
    """Print `line` to stderr on a line of its own (after a progress bar's open line, a newline first)."""
    if not getattr(sys.stderr, "at_line_start", True):
        sys.stderr.write("\n")
    print(line, file=sys.stderr, flush=True)


class DeprecatedSpelling(argparse.Action):
    """An old flag: sets the option it was renamed to, and prints one deprecation line."""

    def __call__(self, parser, namespace, values, option_string=None):
        say(f"warning: {option_string} is deprecated and goes away in the next release; use --{self.dest}")
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated(parser, flag: str, dest: str, kind=None) -> None:
    """`flag` (and its dashed form) as an old spelling of --`dest`; `kind` is its type, None for a switch."""
    parser.add_argument(
        *dict.fromkeys([flag, "--" + flag[2:].replace("_", "-")]),
        dest=dest,
        action=DeprecatedSpelling,
        nargs=0 if kind is None else None,
        const=True if kind is None else None,
        type=kind,
        default=argparse.SUPPRESS,
        help=f"deprecated: use --{dest}",
    )


def add_option(parser, name: str, *, old: tuple[str, ...] = (), **kwargs) -> None:
    """--`name`, also spelled with dashes (as HfArgumentParser spells every option: --seq_len and --seq-len), and
    each of `old` as a deprecated spelling of it. The names are the Trainer's where the Trainer has the option."""
    parser.add_argument(*dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]), dest=name, **kwargs)
    switch = kwargs.get("action") == "store_true"
    for flag in old:
        add_deprecated(parser, flag, name, None if switch else kwargs.get("type", str))
