"""The one runner of the training studies: a study is its settings (a config list, beside it) and its specifics,
launched by this module (zoology's layout).

A study module defines a `Study`: its name (the results folder `benchmarks/results/NAME/` and its main report
`NAME.md` / `.json`), its presets (settings dataclasses with `seeds`, `steps`, `workers` and `threads_per_worker`;
"default" and "smoke" at least, every other one a flag of its own), its own flags, `run(ctx)` (which trains through
`ctx.train` and writes through `ctx.finish`) and the reports `--report-only` re-renders from the runs saved in OUT.

Every study gets from here the same flags (`--smoke`, `--seeds`, `--steps`, `--workers`, `--reuse`, `--report-only`,
`--note`, `--out`); its jobs (one model, learning rate and seed each) in spawned worker processes of one thread each
with one progress bar and the machine's load sampled; its finished runs kept on disk while it goes on
(`NAME.partial.json`, what `--report-only` renders after an interruption); and the same provenance in every saved
state: the command, the machine, library versions, the commit and the date (`report.machine_info`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.harness.report import add_run_arguments, command, git_commit, machine_info, parse_with_argv

MODELS = ("llama", "diff-v1", "diff-v2")
LABELS = {"llama": "Llama (Transformer)", "diff-v1": "DiffTransformer V1", "diff-v2": "DiffTransformer V2"}


@dataclass
class Study:
    """What the runner needs to know of a study (see the module's docstring)."""

    name: str
    module: str  # `python -m MODULE` runs it; its results name this command
    doc: str  # the study module's docstring: the first paragraph is `--help`'s description
    presets: dict  # preset name -> settings
    run: Callable  # run(ctx) -> the runs it trained (or what a mode of its own returns)
    reports: dict  # report name -> render(state, out) -> state: OUT/NAME.md (and .json) from a saved state
    arguments: Callable | None = None  # arguments(parser): the study's own flags
    preset_help: dict = field(default_factory=dict)  # the help of every preset's flag
    free: tuple = ("learning_rate", "seeds", "workers")  # settings a reused run may differ in (`reusable_runs`)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(study: Study, argv=None) -> argparse.Namespace:
    """The shared flags, then the study's own; `args.argv` keeps the command line for the results."""
    parser = argparse.ArgumentParser(description=study.doc.split("\n\n")[0])
    presets = parser.add_mutually_exclusive_group()
    for name in study.presets:
        if name != "default":
            presets.add_argument(f"--{name}", action="store_true",
                                 help=study.preset_help.get(name, f"the {name} preset"))
    parser.add_argument("--seeds", type=positive, default=None, help="number of seeds (0..n-1) of every run; "
                        "default: the preset's")
    parser.add_argument("--steps", type=positive, default=None, help="training steps per run; default: the preset's")
    parser.add_argument("--workers", type=positive, default=None,
                        help="training processes in parallel, one job (model, rate, seed) each; default: the preset's")
    parser.add_argument("--reuse", type=Path, nargs="+", default=None, metavar="JSON",
                        help="results files of this study (finished, or the .partial.json of an interrupted run) "
                             "whose runs at identical settings are taken instead of retrained; the report names them")
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: re-write the reports from the runs saved in OUT (its .partial.json after "
                             "an interruption, saying which runs are missing, else its .json)")
    parser.add_argument("--note", default="", help="one line of context added to the report (and its JSON)")
    add_run_arguments(parser, study.name)
    if study.arguments:
        study.arguments(parser)
    return parse_with_argv(parser, argv)


def main(study: Study, argv=None):
    """Run `study` as its command line says: train and report, or with `--report-only` re-render its reports."""
    args = parse_args(study, argv)
    if args.report_only:
        return render_saved(study, args.out, args.note)
    preset = next((name for name in study.presets if name != "default" and getattr(args, name, False)), "default")
    settings = study.presets[preset]
    for name in ("seeds", "steps", "workers"):
        value = getattr(args, name)
        if value is not None:
            settings = replace(settings, **{name: tuple(range(value)) if name == "seeds" else value})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return study.run(Context(study, args, preset, settings))


class Context:
    """One run of a study: its flags, preset, settings and results folder, the state saved with its runs, and the
    steps every study takes: `train` (jobs in workers) and `finish` (its report)."""

    def __init__(self, study: Study, args, preset: str, settings):
        self.study, self.args, self.preset, self.settings, self.out = study, args, preset, settings, args.out
        self.started = time.time()
        self.state = {"settings": asdict(settings), "preset": preset, "command": command(study.module, args.argv),
                      "machine": machine_info(settings.threads_per_worker), "started": self.started,
                      "load_samples": [], "note": args.note}

    def use_settings(self, settings) -> None:
        """Run with `settings` (e.g. those of a saved study) instead of the preset's."""
        self.settings = settings
        self.state.update(settings=asdict(settings), machine=machine_info(settings.threads_per_worker))

    @property
    def scratch(self) -> Path:
        """A folder for the runs' temporary files (the tokenizer, the Trainer's output folders), removed at the end."""
        folder = self.out / f".{self.study.name}_scratch"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def reusable(self, paths=None) -> list[dict]:
        """The runs of `paths` (default: `--reuse`) at this study's settings and seeds (`reusable_runs`)."""
        paths = (self.args.reuse or ()) if paths is None else paths
        return [run for path in paths for run in reusable_runs(Path(path), self.settings, self.study.free)]

    def train(self, job_fn, jobs: list[dict], name: str | None = None, finished: list[dict] = ()) -> list[dict]:
        """`job_fn(job, queue)` for every job in the settings' workers (`run_jobs`), the finished runs and `finished`
        kept in OUT/NAME.partial.json meanwhile; returns this call's runs in job order."""
        self.out.mkdir(parents=True, exist_ok=True)
        return run_jobs(job_fn, jobs, self.settings.workers, len(jobs) * self.settings.steps,
                        self.out / f"{name or self.study.name}.partial.json", self.state, finished)

    def saved_state(self, results: list[dict], **extra) -> dict:
        """The state as its JSON keeps it: private keys dropped, the runs, the wall time and `extra` added."""
        state = {k: v for k, v in self.state.items() if not k.startswith("_") and k != "started"}
        return dict(state, results=results, wall_seconds=time.time() - self.started, **extra)

    def cleanup(self, name: str | None = None) -> None:
        """Remove the partial file of report `name` and the scratch folder."""
        (self.out / f"{name or self.study.name}.partial.json").unlink(missing_ok=True)
        shutil.rmtree(self.out / f".{self.study.name}_scratch", ignore_errors=True)

    def finish(self, results: list[dict], name: str | None = None, **extra) -> dict:
        """Write report `name` (default: the study's) from the runs, then clean up; returns the saved state."""
        name = name or self.study.name
        state = self.study.reports[name](self.saved_state(results, **extra), self.out)
        self.cleanup(name)
        print(f"wrote {self.out / name}.md in {state['wall_seconds'] / 60:.1f} min")
        return state


def render_saved(study: Study, out: Path, note: str = ""):
    """`--report-only`: re-render every report of `study` whose runs are saved in `out` (NAME.partial.json, else
    NAME.json), recording where from, at which commit and when; returns the runs of the first."""
    rendered = []
    for name, render in study.reports.items():
        partial, final = out / f"{name}.partial.json", out / f"{name}.json"
        saved = partial if partial.exists() else final
        if not saved.exists():
            continue
        state = json.loads(saved.read_text())
        state["rendered"] = {"from": saved.name, "commit": git_commit(),
                             "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        if note:
            state["note"] = note
        rendered.append(render(state, out))
        print(f"wrote {out / name}.md from {saved}")
    if not rendered:
        raise SystemExit(f"error: no saved runs of {study.name} in {out} (looked for "
                         f"{', '.join(f'{name}.json' for name in study.reports)}); point --out at its results folder")
    return rendered[0]["results"]


def reusable_runs(path: Path, settings, free: tuple) -> list[dict]:
    """The runs saved at `path` that stand for new runs of `settings.seeds`, each marked `reused_from` (the file's
    name) and with its learning rate.

    Only when that study's settings equal `settings` in every field but the `free` ones (a reused run is the same
    code path on the same sequences); otherwise stops with an error line.
    """
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot read the --reuse file {path}: {error}") from None

    def fixed(values: dict) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if k not in free}

    if fixed(earlier["settings"]) != fixed(asdict(settings)):
        raise SystemExit(f"error: {path} was run with other settings; drop --reuse or match its settings")
    rate = earlier["settings"].get("learning_rate")
    return [dict(run, learning_rate=run.get("learning_rate", rate), reused_from=path.name)
            for run in earlier["results"] if run["seed"] in settings.seeds]


# ----------------------------------------------------------------------------------------------------------------
# jobs in worker processes


def run_jobs(job_fn, jobs: list[dict], workers: int, total_steps: int, partial: Path, state: dict,
             finished: list[dict] = ()) -> list[dict]:
    """Run `job_fn(job, queue)` for every job, in `workers` spawned processes (in this one when workers ≤ 1).

    Shows one progress bar over `total_steps` training steps of all jobs (jobs report through the queue, see
    `_drain_one`), samples the load into `state["load_samples"]`, and after every finished job writes `state` with
    the `finished` results of earlier calls and this call's to `partial` (for ``--report-only`` after an
    interruption). Returns this call's results in job order.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="training steps (all runs)", unit="step", dynamic_ncols=True)
    results = []
    if workers <= 1:
        import queue as queue_module

        progress = queue_module.SimpleQueue()
        for job in jobs:
            results.append(job_fn(job, progress))
            _sample_load(state)
            while not progress.empty():
                _drain_one(progress.get(), bar)
            _write_partial(partial, [*finished, *results], state)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, wait

        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            progress = manager.Queue()
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = [pool.submit(job_fn, job, progress) for job in jobs]
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=1.0)
                    _sample_load(state)
                    while not progress.empty():
                        _drain_one(progress.get(), bar)
                    if done:
                        _write_partial(partial, [*finished, *(f.result() for f in futures if f.done())], state)
                results = [f.result() for f in futures]
    bar.close()
    return results


def _sample_load(state: dict):
    """Record the 1-minute load average (at most every 30 s): the report says how busy the shared machine was."""
    if hasattr(os, "getloadavg") and time.time() - state.get("_last_load", 0) >= 30:
        state["_last_load"] = time.time()
        state["load_samples"].append(round(os.getloadavg()[0], 2))


def _write_partial(partial: Path, results: list[dict], state: dict):
    """Keep the finished runs on disk while the study goes on (`partial`), for --report-only."""
    state = {k: v for k, v in state.items() if not k.startswith("_")}
    state.update(results=results, elapsed_seconds=time.time() - state["started"])
    partial.write_text(json.dumps(state, indent=1))


def _drain_one(message, bar):
    """Show one job's message on the shared bar: a finished step, its loss or accuracy, a phase, the job's end."""
    tag, kind, value = message
    if kind == "step":
        bar.update(value)
    elif kind == "loss":
        bar.set_postfix_str(f"{tag}: loss {value:.3f}")
    elif kind == "acc":
        bar.set_postfix_str(f"{tag}: accuracy {value:.0%}")
    elif kind == "phase":
        bar.set_postfix_str(f"{tag}: evaluating")
    elif kind == "done":
        bar.write(f"finished {tag}")


def settings_from_dict(cls, data: dict):
    """A settings dataclass from its JSON form (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
