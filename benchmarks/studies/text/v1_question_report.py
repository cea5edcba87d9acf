"""The V1 question's report: the headline table (arm × best rate → held-out perplexity), the sweep, the 2×-heads arms
and the ablations against V1, the probes of every V1 arm's forward, the reused runs and one chart."""

import json
import math
import statistics
from pathlib import Path

from benchmarks.harness.report import table
from benchmarks.studies.harness import load_line, mean_std, settings_from_dict, verdict
from benchmarks.studies.text.ablations import DECAY_GROUPINGS
from benchmarks.studies.text.config import Settings


def runs_of(results: list[dict], arm: str, rate: float | None = None) -> list[dict]:
    """The runs of `arm` (at `rate`), the re-trained check of a reused run left out."""
    return [r for r in results if r["arm"] == arm and not r.get("verify")
            and (rate is None or math.isclose(r["learning_rate"], rate))]


def rates_of(results: list[dict], arm: str) -> list[float]:
    return sorted({r["learning_rate"] for r in runs_of(results, arm)})


def ppl(results: list[dict], arm: str, rate: float) -> tuple[float, float]:
    """Held-out perplexity of `arm` at `rate`, mean and std over seeds."""
    return mean_std([r["ppl"] for r in runs_of(results, arm, rate)])


def best_rate(results: list[dict], arm: str) -> float | None:
    """The learning rate with the lowest mean held-out perplexity of `arm` (None when it has no runs)."""
    rates = rates_of(results, arm)
    return min(rates, key=lambda rate: ppl(results, arm, rate)[0]) if rates else None


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def fmt(stats: tuple[float, float]) -> str:
    mean, std = stats
    return "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def bracket(results: list[dict], arm: str) -> str:
    """Whether the best rate of `arm` lies strictly inside the rates it was trained at."""
    rates, best = rates_of(results, arm), best_rate(results, arm)
    if len(rates) < 3:
        return f"one rate: {best:g}" if len(rates) == 1 else "two rates: not bracketed"
    if math.isclose(best, rates[0]) or math.isclose(best, rates[-1]):
        return f"**no**: on the edge of {rates[0]:g}–{rates[-1]:g}"
    return f"yes: inside {rates[0]:g}–{rates[-1]:g}"


def headline(state: dict) -> str:
    """model × arm × best rate → perplexity, one row per arm trained."""
    results, rows = state["results"], []
    for name, arm in state["arms"].items():
        best = best_rate(results, name)
        if best is None:
            continue
        run = runs_of(results, name)[0]
        heads = f"{run['heads']} ({run['differential_heads']})" if run["differential_heads"] else str(run["heads"])
        decay = {"trainer": "— (Trainer default)", "exempt": "none", "decayed": "yes"}[arm["decay"]]
        rows.append([arm["label"], arm["model"], f"{heads} × {run['head_dim']}", decay, f"{best:g}",
                     bracket(results, name), f"**{fmt(ppl(results, name, best))}**", f"{run['parameters']:,}"])
    return table(["arm", "model", "query heads (differential) × width", "λ and head norm: weight decay", "best rate",
                  "best rate inside the rates tried", "held-out perplexity at the best rate", "parameters"], rows)


def sweep_table(state: dict) -> list[str]:
    """Perplexity of every arm at every rate it was trained at (mean ± std over seeds; bold: its best)."""
    results, arms = state["results"], state["arms"]
    rates = sorted({r["learning_rate"] for r in results if not r.get("verify")})
    lines = ["| arm | " + " | ".join(f"lr {rate:g}" for rate in rates) + " |", "| --- |" + " --- |" * len(rates)]
    for name, arm in arms.items():
        best = best_rate(results, name)
        if best is None:
            continue
        cells = []
        for rate in rates:
            cell = fmt(ppl(results, name, rate)) if runs_of(results, name, rate) else ""
            cells.append(f"**{cell}**" if cell and math.isclose(rate, best) else cell)
        lines.append(f"| {arm['label']} | " + " | ".join(cells) + " |")
    return lines


def compare(results: list[dict], arm: str, rate: float, base: str, base_rate: float) -> tuple[str, float]:
    """The verdict on `arm` at `rate` against `base` at `base_rate` (lower perplexity is better), and the gap."""
    ours = [r["ppl"] for r in runs_of(results, arm, rate)]
    theirs = [r["ppl"] for r in runs_of(results, base, base_rate)]
    called = verdict(ours, theirs, higher_is_better=False)
    return called, mean_std(ours)[0] - mean_std(theirs)[0]


def findings(state: dict) -> list[str]:
    """The questions of the study, each answered from the runs ("better"/"worse" only beyond the seed spread)."""
    results, arms = state["results"], state["arms"]
    best = {name: best_rate(results, name) for name in arms}
    lines = []
    for name in ("llama", "v1"):
        if best[name] is not None:
            lines.append(f"- {arms[name]['label']}: best rate {best[name]:g}; bracketed — {bracket(results, name)}.")
    pairs = [("v1", "llama", "each at its own best rate"),
             ("v1-16h", "llama-16h", "both with 2× heads, each at its 8-head counterpart's best rate"),
             ("v1-16h", "v1", "2× heads against the paper's heads"),
             ("llama-16h", "llama", "2× heads against 8 heads")]
    for arm, base, how in pairs:
        if best[arm] is None or best[base] is None:
            continue
        called, gap = compare(results, arm, best[arm], base, best[base])
        lines.append(f"- {arms[arm]['label']} vs {arms[base]['label']}, {how}: perplexity "
                     f"{fmt(ppl(results, arm, best[arm]))} vs {fmt(ppl(results, base, best[base]))} — **{called}** "
                     f"(gap {gap:+.2f}).")
    for arm in (name for name in arms if arms[name]["ablation"] or arms[name]["decay"] == "decayed"):
        if best[arm] is None or best["v1"] is None:
            continue
        called, gap = compare(results, arm, best[arm], "v1", best["v1"])
        lines.append(f"- Ablation {arms[arm]['label']} vs V1 at {best['v1']:g}: {fmt(ppl(results, arm, best[arm]))} "
                     f"vs {fmt(ppl(results, 'v1', best['v1']))} — **{called}** (gap {gap:+.2f}).")
    shared = [rate for rate in rates_of(results, "v1") if runs_of(results, "llama", rate)]
    if shared:
        ratios = ", ".join(f"{ppl(results, 'v1', rate)[0] / ppl(results, 'llama', rate)[0]:.2f} at {rate:g}"
                           for rate in shared)
        lines.append(f"- V1 / Llama perplexity ratio at the rates both were trained at: {ratios}.")
    return lines


def probe_table(state: dict) -> str:
    """What each V1 arm's forward did after training, per layer (mean over seeds): the evidence the ablations held."""
    rows = []
    for name, arm in state["arms"].items():
        runs = [r for r in runs_of(state["results"], name) if "probe" in r]
        if not runs:
            continue

        def per_layer(key, runs=runs):
            return ", ".join(f"{statistics.fmean(v):.3f}" for v in zip(*(r["probe"][key] for r in runs)))

        off_norm = max(max(r["probe"]["head_norm_vs_scaled_input"]) for r in runs)
        decayed = sorted({r["decayed_differential_parameters"] for r in runs})
        rows.append([arm["label"], per_layer("lambda"), per_layer("map_row_sum"), per_layer("head_norm_scale"),
                     f"{off_norm:.3g}", ", ".join(map(str, decayed))])
    return table(["arm", "λ used, per layer", "differential-map row sum (= 1 − λ), per layer",
                  "head-norm scale, per layer", "max abs (head norm(x) − x · scale)",
                  "λ and head-norm parameters with weight decay"], rows)


def make_chart(state: dict, path: Path) -> dict:
    """Perplexity against the learning rate for every swept arm (the 2×-heads arms as points), and V1's ablations
    as bars beside V1 at its best rate; returns the plotted means and stds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, arms = state["results"], state["arms"]
    plotted = {"sweep": {}, "ablations": {}}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, arm in arms.items():
        rates = rates_of(results, name)
        if not rates or arm["ablation"] or arm["decay"] == "decayed":
            continue
        stats = [ppl(results, name, rate) for rate in rates]
        plotted["sweep"][name] = {"rates": rates, "stats": stats}
        left.errorbar(rates, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                      ls="-" if len(rates) > 1 else "none", label=arm["label"])
    left.set_xscale("log")
    left.set_xlabel("peak learning rate")
    left.set_ylabel("held-out perplexity (lower is better)")
    left.set_title("Learning-rate sweep (mean ± std over seeds)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    bars = [name for name in ("v1", *[n for n in arms if arms[n]["ablation"] or arms[n]["decay"] == "decayed"])
            if best_rate(results, name) is not None]
    for index, name in enumerate(bars):
        stats = ppl(results, name, best_rate(results, name))
        plotted["ablations"][name] = stats
        right.bar(index, stats[0], yerr=stats[1], capsize=3, color="tab:gray" if name == "v1" else "tab:blue")
    if bars:  # the bars differ by a few percent: a y axis from just below the lowest
        low = min(plotted["ablations"][name][0] - plotted["ablations"][name][1] for name in bars)
        high = max(plotted["ablations"][name][0] + plotted["ablations"][name][1] for name in bars)
        right.set_ylim(low - 0.2 * (high - low) - 0.1, high + 0.2 * (high - low) + 0.1)
    right.set_xticks(range(len(bars)), [arms[name]["label"] for name in bars], rotation=20, ha="right", fontsize=8)
    right.set_ylabel("held-out perplexity")
    right.set_title("V1's ablations at its best rate")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return plotted


def write_report(state: dict, out: Path) -> dict:
    """Write v1_question.md, .json and .png from `state` (settings, arms, runs, timing); returns the saved state."""
    settings = settings_from_dict(Settings, state["settings"])
    results = state["results"]
    state = dict(state, chart=make_chart(state, out / "v1_question.png"))
    (out / "v1_question.json").write_text(json.dumps({k: v for k, v in state.items() if k != "started"}, indent=1))
    trained = [r for r in results if not r.get("reused_from")]
    reused = [r for r in results if r.get("reused_from")]
    wall = state.get("wall_seconds", state.get("elapsed_seconds", float("nan")))
    per_run = statistics.fmean(r["train_seconds"] + r["eval_seconds"] for r in trained) if trained else 0.0
    checks = []
    for run in (r for r in results if r.get("verify")):
        saved = next((r for r in reused if r["seed"] == run["seed"]
                      and math.isclose(r["learning_rate"], run["learning_rate"])), None)
        if saved:
            checks.append(f"re-trained Llama at {run['learning_rate']:g}, seed {run['seed']}: perplexity "
                          f"{run['ppl']:.4f} against {saved['ppl']:.4f} saved ({run['ppl'] / saved['ppl'] - 1:+.3%})")
    lines = [
        "# The V1 question: a bracketed sweep, twice the heads, and V1's ablations",
        "",
        f"Produced by `{state['command']}` (preset **{state['preset']}**); every run (arm, model, heads, learning "
        "rate, seed, perplexity, probes) is in [`v1_question.json`](v1_question.json).",
        "",
        f"- **Machine:** {state.get('machine')}.",
        f"- **Load:** {load_line(state.get('load_samples'))}",
        f"- **Wall time:** {wall / 60:.1f} min for {len(trained)} training runs in {settings.workers} worker "
        f"process(es) × {settings.threads_per_worker} thread(s), {duration(per_run)} per run on average (training and "
        "perplexity, under the load above)" + (f"; {len(reused)} runs taken from "
                                               f"{', '.join(state.get('reused_from', []))} (the same settings, code "
                                               "path and sequences)" if reused else "") + ".",
        *([f"- **Reuse check:** {'; '.join(checks)}."] if checks else []),
        "",
        "## Each arm at its best learning rate",
        "",
        headline(state),
        "",
        "## Findings (\"better\"/\"worse\" only when the means differ by more than the sum of the two stds)",
        "",
        *findings(state),
        "",
        "![sweep and ablations](v1_question.png)",
        "",
        "## Held-out perplexity at every rate (mean ± std over seeds; bold: the arm's best)",
        "",
        *sweep_table(state),
        "",
        "## What each V1 arm's forward did after training (the ablations, checked)",
        "",
        probe_table(state),
        "",
        "## Settings",
        "",
        f"- The text study's data, tokens and recipe (`benchmarks/studies/text/config.py`): hidden "
        f"{settings.hidden_size}, {settings.num_hidden_layers} layers, vocabulary {settings.vocab_size}, "
        f"{settings.steps} steps × batch {settings.batch_size} × {settings.seq_len} tokens, AdamW β = "
        f"{tuple(settings.adam_betas)}, weight decay {settings.weight_decay}, warm-up over "
        f"{settings.warmup_fraction:.0%} then linear decay to {settings.min_lr_ratio:.0%} of the peak, gradient "
        f"clipping 1.0, fp32; seeds {', '.join(map(str, settings.seeds))}. Held-out perplexity on the held-out Python "
        "docs, the text study's measure.",
        "- Equal parameters: V1 with Llama's numbers; the 2× heads arms keep the hidden size with twice the query "
        "heads at half the width (q/k width halved; V1's values, 2 × head width, halved too), so their parameters "
        "match.",
        "- RMSNorm epsilon: Llama's 1e-6 for every model (V1's default is 1e-5), block norms and V1's head norm.",
        "- Weight decay: " + "; ".join(f"`{key}` = {text}" for key, text in DECAY_GROUPINGS.items()) + ". Llama uses "
        "the Trainer's grouping, which exempts its norm gains.",
        "- Ablations, by module surgery on the built V1 (`benchmarks/studies/text/ablations.py`): λ fixed at 0 "
        "(`lambda_full` returns 0, the λ vectors frozen); no head norm (replaced by its (1 − λ_init) scale alone); "
        "no (1 − λ_init) scale (the head norm's scale set to 1); decay on λ and the head-norm gains.",
        "- The sweep grows by one rate (best × 1.5 above, best / 3 below) while an arm's best rate is on the edge of "
        "its grid, a bounded number of times. The 2× heads arms train at the best rate of their 8-head "
        "counterpart, and the ablations at V1's.",
        "- Open at larger scale: these are 0.9M-parameter models on 2.9M token positions; the paper's models have "
        "3B parameters and 1T tokens. How the gap moves with width and tokens is not measured here.",
        "",
    ]
    (out / "v1_question.md").write_text("\n".join(lines), encoding="utf-8")
    return state
