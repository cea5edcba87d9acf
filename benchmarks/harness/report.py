"""Results files: the machine description, the header every results file starts with, markdown tables, the
markdown + JSON pair (written whole or not at all), a grouped bar chart that returns the numbers it plots; and for the
training studies' reports: mean ± std over seeds, the verdict rule, learning-rate sweeps and the header with the run's
provenance."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"  # benchmarks/results/<benchmark>/


def git_commit() -> str:
    """The repository's commit (`git rev-parse HEAD`), with `+changes` when tracked files differ from it; `unknown`
    outside a git checkout."""
    import subprocess

    root = RESULTS.parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine_info(threads: int | None = None) -> dict:
    """CPU model, cores, torch threads, GPU, library versions, the commit, date and the load average now (the run's
    start)."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "commit": git_commit(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": list(os.getloadavg()),
    }


def add_run_arguments(parser, benchmark: str, file: str | None = None, quick: str | None = None) -> None:
    """The flags every benchmark has: `--out`, the markdown results `file` (the JSON and PNG go next to it) or,
    without `file`, the folder of a study's results files, by default under benchmarks/results/<benchmark>/; and,
    with `quick` (its help text), `--quick`: tiny settings for the smoke test."""
    default = RESULTS / benchmark / file if file else RESULTS / benchmark
    what = "markdown results file; the JSON and PNG go next to it" if file else "folder for the results files"
    parser.add_argument("--out", type=Path, default=default,
                        help=f"{what} (default: {default.relative_to(RESULTS.parent.parent)})")
    if quick:
        parser.add_argument("--quick", action="store_true", help=quick)


def parse_with_argv(parser, argv=None):
    """Parse `argv` (default: the command line) and keep it as `args.argv`, for the results header."""
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def settings_of(args) -> dict:
    """The parsed flags of a run, JSON-ready (paths as strings), for its results file."""
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}


def command(module: str, argv: list[str]) -> str:
    """The command that re-runs a benchmark from the repository root: `python -m MODULE ARGS`."""
    return " ".join(["python -m", module, *map(str, argv)])


def header(title: str, command_line: str, info: dict, *bullets: str) -> list[str]:
    """The first lines of every results file: title, command, date, commit, machine, load at the start and at the
    end (now, or `info["load_end"]`), versions. A run from before `machine_info` recorded the commit says so, and
    names the commit that added its results (`info["committed_in"]`) when known."""
    start = ", ".join(f"{x:.2f}" for x in info["load_start"])
    end = ", ".join(f"{x:.2f}" for x in info.get("load_end") or os.getloadavg())  # saved: a re-rendered run
    gpu = f"; GPU: {info['gpu']}" if info.get("gpu") else ""
    if info.get("commit"):
        commit = f"at commit {info['commit']}"
    else:
        commit = "at a commit it did not record" + (f" (committed in {info['committed_in']})"
                                                    if info.get("committed_in") else "")
    return [
        f"# {title}",
        "",
        f"Produced by `{command_line}` on {info['date_utc']}, {commit}.",
        "",
        f"- Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch threads = {info['torch_threads']}"
        f"{gpu}; load average (1, 5, 15 min) {start} at the start, {end} at the end (the machine may be shared: "
        "ratios come from one interleaved run, absolute times are noisy)",
        f"- Versions: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}",
        *[f"- {bullet}" for bullet in bullets],
        "",
    ]


def model_sizes(args) -> str:
    """The model-size flags of a run (`models.add_model_arguments`), as the results files state them."""
    return (f"hidden {args.hidden}, {args.heads} query heads, {args.kv_heads} KV heads, {args.layers} layers, "
            f"vocab {args.vocab}, intermediate {args.intermediate}")


def fmt(value: float, unit: str) -> str:
    """Human formatting of one absolute value."""
    if unit == "s":
        if value < 0.01:
            return f"{value * 1000:.2f} ms"
        return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"
    if unit == "tok/s":
        return f"{value:.1f} tok/s"
    if unit == "MiB":
        return f"{value:.1f} MiB" if abs(value) < 10 else f"{value:.0f} MiB"
    if unit == "B":
        return f"{value / 2**20:.2f} MiB"
    if unit == "M":
        return f"{value / 1e6:.2f} M"
    return f"{value:g}"


def table(head: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def write_results(out: Path, text: str, payload: dict | None = None) -> None:
    """Print the markdown, write it to `out` and, with `payload`, the JSON next to it (same name, `.json`)."""
    print(text)
    write_text(out, text if text.endswith("\n") else text + "\n")
    if payload is not None:
        write_text(out.with_suffix(".json"), json.dumps(payload, indent=1, default=str) + "\n")


def bar_chart(path: Path, labels: list[str], series: dict, ylabel: str, title: str, reference: float | None = 1.0,
              annotations: list[str] | None = None) -> dict:
    """Grouped bars, one group per label and one bar per series (None: no bar); returns the plotted numbers.

    `reference` draws a dashed horizontal line (1.0: the ratio of the baseline); `annotations` are written above the
    bars of a single series.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) * max(1, len(series)) / 2 + 3), 4.8))
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        offset = (index - (len(series) - 1) / 2) * width
        shown = [(position + offset, value) for position, value in enumerate(values) if value is not None]
        bars = ax.bar([x for x, _ in shown], [y for _, y in shown], width, label=name)
        if annotations and len(series) == 1:
            for bar, text in zip(bars, annotations):
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center",
                       fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, dpi=120, format="png")
    plt.close(fig)
    partial.replace(path)
    return {"labels": list(labels), "series": {name: list(values) for name, values in series.items()}}


# ----------------------------------------------------------------------------------------------------------------
# the training studies' reports: statistics over seeds, the one rule a difference is called by, the header with the
# run's provenance, learning-rate sweeps


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (None and NaN left out; std 0 for one value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_pm_std(stats: tuple[float, float], digits: int | None = None, percent: bool = False) -> str:
    """"mean ± std" in percent, with `digits` decimals, or by default 3 below 10 and 1 above; "n/a" for none."""
    mean, std = stats
    if math.isnan(mean):
        return "n/a"
    if percent:
        return f"{mean:.1%} ± {std:.1%}"
    digits = (3 if abs(mean) < 10 else 1) if digits is None else digits
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def verdict(ours: list[float], base: list[float], higher_is_better: bool = True) -> str:
    """"better"/"worse" than the baseline only when the means differ by more than the sum of the two stds."""
    ours = [v for v in ours if v is not None and not math.isnan(v)]
    base = [v for v in base if v is not None and not math.isnan(v)]
    if not ours or not base:
        return "not measured"
    if min(len(ours), len(base)) < 2:
        return "not called (one seed)"
    (m1, s1), (m0, s0) = mean_std(ours), mean_std(base)
    if abs(m1 - m0) <= s1 + s0:
        return "no clear difference"
    return "better" if (m1 > m0) == higher_is_better else "worse"


def best_rate(runs: list[dict], value, lower: bool = True) -> float | None:
    """The learning rate whose `runs` have the best mean of `value(run)` over seeds (the lowest with `lower`, else
    the highest); None without runs."""
    rates = sorted({run["learning_rate"] for run in runs})
    means = {rate: mean_std([value(run) for run in runs if math.isclose(run["learning_rate"], rate)])[0]
             for rate in rates}
    return (min if lower else max)(means, key=means.get) if means else None


def sweep_table(corner: str, rates: list[float], rows: list[tuple[str, float, dict]]) -> list[str]:
    """A learning-rate sweep as markdown lines: one row per (label, its best rate, {rate: cell}), one column per
    rate, the cell at the row's best rate in bold (a rate the row has no cell for stays empty)."""
    lines = [f"| {corner} | " + " | ".join(f"lr {rate:g}" for rate in rates) + " |", "| --- |" + " --- |" * len(rates)]
    for label, best, cells in rows:
        texts = [next((text for at, text in cells.items() if math.isclose(at, rate)), "") for rate in rates]
        lines.append(f"| {label} | " + " | ".join(f"**{text}**" if text and math.isclose(rate, best) else text
                                                  for text, rate in zip(texts, rates)) + " |")
    return lines


def load_line(samples: list[float]) -> str:
    """How busy the (shared) machine was during a study."""
    if not samples:
        return "not recorded by the script for this run (the machine is shared)."
    return (f"1-minute load average of the machine during the run (sampled every 30 s): mean "
            f"{statistics.fmean(samples):.1f}, max {max(samples):.1f}, on {os.cpu_count()} cores (the machine is "
            "shared).")


def machine_text(machine) -> str:
    """The machine a study ran on: `machine_info`'s CPU, cores, device and library versions, or the line a run
    that predates it recorded."""
    if not isinstance(machine, dict):
        return machine or "not recorded"
    return (f"{machine['cpu']}, {machine['logical_cores']} logical CPUs, device: {machine.get('gpu') or 'CPU'}; "
            f"Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}")


def provenance(state: dict) -> list[str]:
    """The bullets that say where a study's results came from: the commit and date the run started from (or, for a
    run that predates recording them, the commit that added its results) and, for a report re-rendered by
    `--report-only`, from which file, by which commit's report code and when."""
    machine = state.get("machine")
    if isinstance(machine, dict) and machine.get("commit"):
        changes = machine["commit"].endswith("+changes")
        dirty = " (`+changes`: with uncommitted changes to tracked files)" if changes else ""
        lines = [f"- **Commit:** `{machine['commit']}`{dirty}, the checkout the run started from on "
                 f"{machine['date_utc']}."]
    elif state.get("committed_in"):
        lines = ["- **Commit:** not recorded by the run (it predates results files that record their commit); its "
                 f"results were committed in {state['committed_in']}."]
    else:
        lines = ["- **Commit:** not recorded."]
    if rendered := state.get("rendered"):
        lines.append(f"- **Report:** re-rendered without training by `--report-only` from the runs saved in "
                     f"`{rendered['from']}`, by the report code of commit `{rendered['commit']}`, on "
                     f"{rendered['date_utc']}.")
    return lines


def study_header(title: str, state: dict, produced: str, *bullets: str | None) -> list[str]:
    """The first lines of a study's report: title, the command (`produced` goes on after it), machine, provenance,
    load during the run, then `bullets` (None: left out)."""
    return [f"# {title}", "", f"Produced by `{state['command']}`{produced}", "",
            f"- **Machine:** {machine_text(state.get('machine'))}.", *provenance(state),
            f"- **Load:** {load_line(state.get('load_samples'))}", *[f"- {bullet}" for bullet in bullets if bullet]]


def write_study(out: Path, name: str, text: str, state: dict) -> dict:
    """A study's report: OUT/NAME.md and OUT/NAME.json (`state`); returns `state`."""
    write_results(out / f"{name}.md", text, state)
    return state
