"""The V1 question: is V1 worse than Llama at equal parameters on the text study, once the study is fair to it?

The text study found V1's held-out perplexity well above Llama's at every learning rate tried, with both models best
at the largest rate. This study settles it on the same data, recipe and tokens (`v1_question_config.py` beside this
file holds every setting), by held-out perplexity over 3 seeds:

1. a bracketed sweep: Llama and V1 over learning rates that go past the earlier best, extended automatically while a
   model's best rate sits on the edge of its grid; committed Llama runs at identical settings are reused (one of
   them re-trained to check that they still stand);
2. twice the heads at equal parameters (16 query heads of width 8: V1 gets the 8 differential heads its authors
   advise as a minimum), for V1 and for Llama, each at the best rate of its 8-head counterpart, so that head count
   and differential attention can be told apart;
3. V1's ablations at its best rate, by module surgery (`ablations.py`): λ fixed at 0, no head norm, no (1 − λ_init)
   scale, and weight decay put back on λ and the head-norm gains.

V1 uses Llama's RMSNorm epsilon and keeps its λ vectors and head-norm gains out of weight decay (Llama's norm gains
are out of it too). Writes ``v1_question.md`` (the headline table: arm × best rate → perplexity), ``.json`` (every
run: arm, model, heads, learning rate, seed, perplexity, probes) and ``.png`` into ``--out``.

    python -m benchmarks.studies.text.v1_question            # the default run, 2 workers of one thread
    python -m benchmarks.studies.text.v1_question --smoke    # tiny models, a few steps: the tests
    python -m benchmarks.studies.text.v1_question --report-only   # re-write the report from the saved runs

The flags every study shares and its jobs in workers: ``benchmarks/harness/study.py``.
"""

import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.harness import study
from benchmarks.harness.models import equal_parameter_configs, init_model, parameter_count
from benchmarks.harness.report import best_rate as best_mean_rate
from benchmarks.harness.report import mean_pm_std, mean_std, study_header, sweep_table, table, verdict, write_study
from benchmarks.harness.study import Study, reusable_runs, settings_from_dict
from benchmarks.harness.training import reporter
from benchmarks.studies.text.ablations import (
    DECAY_GROUPINGS,
    DIFFERENTIAL_PARAMETERS,
    ablate,
    decay_grouping,
    probe_v1,
)
from benchmarks.studies.text.config import Settings
from benchmarks.studies.text.data import corpus
from benchmarks.studies.text.runs import load_tokenizer, measure, prepare, train
from benchmarks.studies.text.v1_question_config import (
    ABLATION_ARMS,
    ARMS,
    EPS,
    HEAD_ARMS,
    PLANS,
    PRESETS,
    RUN_MINUTES,
)

LLAMA_EPS = 1e-6  # LlamaConfig's default, which the text study's Llama ran with


def arm_config(name: str, settings: Settings, vocab_size: int):
    """The config of arm `name`: the text study's equal-parameter layout at `head_factor` × its heads, and for V1
    Llama's RMSNorm epsilon."""
    arm = ARMS[name]
    configs = equal_parameter_configs(settings.hidden_size, settings.num_hidden_layers,
                                      settings.heads * arm.head_factor, settings.intermediate_size, vocab_size,
                                      max(settings.eval_context_lens) * 2)
    config = configs[arm.model]
    if arm.model == "diff-v1":
        config.rms_norm_eps = EPS
    return config


def run_arm(job: dict, queue=None) -> dict:
    """Train one arm at one learning rate and seed; its held-out perplexity and, for V1, the probes of its forward."""
    import torch

    settings = Settings(**job["settings"])
    torch.set_num_threads(settings.threads_per_worker)
    name, seed = job["arm"], job["seed"]
    report = reporter(queue, f"{name} lr {settings.learning_rate:g} seed {seed}")

    arm = ARMS[name]
    tokenizer = load_tokenizer(job["tokenizer_file"])
    config = arm_config(name, settings, len(tokenizer))
    model = ablate(init_model(config, seed), arm.ablation)
    record, decayed = train(model, tokenizer, settings, seed, job["scratch"], report, decay_grouping(arm.decay))
    report("phase", "eval")
    is_v1 = arm.model == "diff-v1"
    result = {"arm": name, "model": arm.model, "heads": config.num_attention_heads,
              "differential_heads": config.num_attention_heads // 2 if is_v1 else None,
              "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps, "ablation": arm.ablation,
              "decay": arm.decay,
              "decayed_differential_parameters": sum(1 for n in decayed if DIFFERENTIAL_PARAMETERS.search(n)),
              "learning_rate": settings.learning_rate, "seed": seed, "parameters": parameter_count(model),
              "verify": job.get("verify", False), **record,
              **measure(model, tokenizer, settings, seed, perplexity_only=True)}
    if is_v1:
        held_out = tokenizer(corpus()[1][0], return_tensors="pt").input_ids[:, :64]
        result["probe"] = probe_v1(model, held_out)
    report("done", None)
    return result


def key(run: dict) -> tuple:
    """(arm, learning rate, seed) of a run: what a reused run stands for."""
    return run["arm"], round(run["learning_rate"], 12), run["seed"]


def jobs_for(arm: str, rates, settings: Settings, tokenizer_file: str, scratch: Path, done=()) -> list[dict]:
    """One job per rate and seed of `arm`, leaving out the (arm, rate, seed) of the runs in `done`."""
    keys = {key(run) for run in done}
    return [{"arm": arm, "seed": seed, "settings": asdict(replace(settings, learning_rate=rate)),
             "tokenizer_file": tokenizer_file, "scratch": str(scratch / f"{arm}-{rate:g}-{seed}")}
            for rate in rates for seed in settings.seeds if (arm, round(rate, 12), seed) not in keys]


def estimated_minutes(jobs: list[dict], workers: int) -> float:
    """Wall minutes of `jobs` on `workers` processes taking them in order, from `RUN_MINUTES`."""
    busy = [0.0] * max(1, workers)
    for job in jobs:
        busy[busy.index(min(busy))] += RUN_MINUTES[job["arm"]]
    return max(busy)


def longest_first(jobs: list[dict]) -> list[dict]:
    return sorted(jobs, key=lambda job: -RUN_MINUTES[job["arm"]])


def edge_extensions(plan, results: list[dict], grids: dict, extended: dict) -> dict:
    """{arm: new rate} for every swept arm whose best rate lies on the edge of its grid (while extensions remain)."""
    new = {}
    for arm, rates in grids.items():
        best = best_rate(results, arm)
        if best is None or extended[arm] >= plan.max_extensions:
            continue
        if math.isclose(best, max(rates)):
            new[arm] = best * plan.extend_up
        elif math.isclose(best, min(rates)):
            new[arm] = best * plan.extend_down
    return new


def reused_runs(paths, settings: Settings, llama_rates) -> list[dict]:
    """The runs saved in `paths` by a study with identical settings (`reusable_runs`), one per (arm, rate, seed): of
    the text study (runs without an arm) its 8-head Llama runs at `llama_rates`, of this study every run."""
    runs = []
    for path in paths:
        for run in reusable_runs(Path(path), settings, STUDY.free):
            at_a_rate = any(math.isclose(run["learning_rate"], rate) for rate in llama_rates)
            if "arm" not in run and run["model"] == "llama" and at_a_rate:  # the text study's 8-head Llama
                runs.append(dict(run, arm="llama", heads=settings.heads, differential_heads=None,
                                 head_dim=settings.hidden_size // settings.heads, rms_norm_eps=LLAMA_EPS,
                                 ablation=None, decay="trainer"))
            elif "arm" in run and run["model"] in ("llama", "diff-v1") and not run.get("verify"):
                runs.append(dict(run, reused_from=run.get("reused_from") or path.name))
    return list({key(run): run for run in runs}.values())


def sweep_jobs(plan, settings: Settings, reused: list[dict], tokenizer_file: str, scratch: Path) -> list[dict]:
    """The sweep's runs that are not reused, longest first, and with `plan.verify_reuse` one reused run again."""
    jobs = [job for arm, rates in plan.sweeps.items()
            for job in jobs_for(arm, rates, settings, tokenizer_file, scratch, reused)]
    checkable = [r for r in reused if r["arm"] == "llama"]
    if checkable and plan.verify_reuse:
        check = max(checkable, key=lambda r: (r["learning_rate"], -r["seed"]))
        jobs += [dict(job, verify=True) for job in jobs_for("llama", [check["learning_rate"]], settings,
                                                            tokenizer_file, scratch / "verify")
                 if job["seed"] == check["seed"]]
    return longest_first(jobs)


def best_rate_jobs(plan, settings: Settings, best: dict, tokenizer_file: str, scratch: Path,
                   done=()) -> list[dict]:
    """V1's ablations at V1's best rate, then (with `plan.head_arms`) the 2×-heads arms at their counterparts'."""
    jobs = [job for arm in ABLATION_ARMS
            for job in jobs_for(arm, [best["v1"]], settings, tokenizer_file, scratch, done)]
    if plan.head_arms:  # after the ablations: a run stopped by its time limit loses these first
        jobs += [job for arm, base in HEAD_ARMS.items()
                 for job in jobs_for(arm, [best[base]], settings, tokenizer_file, scratch, done)]
    return jobs


def dry_run(plan, settings: Settings, reused: list[dict]) -> None:
    """Print what the study would train and how long it should take on a quiet 2-core machine."""
    first = sweep_jobs(plan, settings, reused, "", Path())
    then = best_rate_jobs(plan, settings, {arm: 1.0 for arm in plan.sweeps}, "", Path())
    minutes = [estimated_minutes(jobs, settings.workers) for jobs in (first, then)]
    print(f"sweep: {len(first)} runs to train ({len(reused)} reused), about {minutes[0]:.0f} min")
    print(f"at the best rates: {len(then)} runs, about {minutes[1]:.0f} min")
    for arm in plan.sweeps:
        one = estimated_minutes(jobs_for(arm, [1.0], settings, "", Path()), settings.workers)
        print(f"each extension of the {arm} sweep: {len(settings.seeds)} runs, about {one:.0f} min")
    print(f"total without extensions: about {sum(minutes):.0f} min on {settings.workers} worker(s)")


def measure_costs(settings: Settings, steps: int = 15) -> dict:
    """Seconds of CPU time per training step (AdamW, batch × sequence of the study) of every arm, on one thread."""
    import torch

    torch.set_num_threads(1)
    vocab = settings.vocab_size
    ids = torch.randint(3, vocab, (settings.batch_size, settings.seq_len), generator=torch.Generator().manual_seed(0))
    seconds = {}
    for name, arm in ARMS.items():
        model = ablate(init_model(arm_config(name, settings, vocab), 0), arm.ablation).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        for step in range(steps + 3):  # 3 warm-up steps
            if step == 3:
                started = time.process_time()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds[name] = (time.process_time() - started) / steps
        base = "llama" if arm.model == "llama" else "v1"
        print(f"{name}: {seconds[name]:.3f} s per step, {seconds[name] / seconds[base]:.2f}× {base}'s", flush=True)
    return seconds


def arguments(parser):
    """The V1 question's own flags."""
    parser.add_argument("--no-reuse", action="store_true",
                        help="train every run, also the Llama runs the preset takes from committed results")
    parser.add_argument("--verify-reuse", action="store_true",
                        help="also re-train one reused run and report how far it lands from the saved one")
    parser.add_argument("--no-head-arms", action="store_true",
                        help="leave out the 2×-heads arms, about a quarter of the default run's time")
    parser.add_argument("--dry-run", action="store_true",
                        help="train nothing: print the runs the study would train and its estimated wall time")
    parser.add_argument("--measure-costs", action="store_true",
                        help="train nothing: time a few training steps of every arm on one thread and print each "
                             "against Llama's and V1's (the ratios behind RUN_MINUTES)")


def run(ctx) -> list[dict]:
    """The sweep (extended while a best rate is on an edge), then V1's ablations and the 2×-heads arms at the best
    rates; runs of the text study (its Llama) and of this study at identical settings are reused (`--reuse`, default:
    the preset's)."""
    args, settings = ctx.args, ctx.settings
    plan = replace(PLANS[ctx.preset], verify_reuse=PLANS[ctx.preset].verify_reuse or args.verify_reuse,
                   head_arms=PLANS[ctx.preset].head_arms and not args.no_head_arms)
    if args.measure_costs:
        return measure_costs(settings)
    reused = reused_runs(() if args.no_reuse else args.reuse or plan.reuse, settings, plan.sweeps["llama"])
    if args.dry_run:
        return dry_run(plan, settings, reused)
    scratch = ctx.scratch
    tokenizer_file, _ = prepare(settings, scratch)
    vocab = len(load_tokenizer(tokenizer_file))
    ctx.state["arms"] = {name: dict(asdict(arm), parameters=parameter_count(ablate(init_model(
        arm_config(name, settings, vocab), 0), arm.ablation))) for name, arm in ARMS.items()}
    if any(r["parameters"] != ctx.state["arms"][r["arm"]]["parameters"] for r in reused):
        raise SystemExit("error: reused runs have another parameter count than this study's arms; drop --reuse")

    def train_all(jobs: list[dict], finished: list[dict]) -> list[dict]:
        print(f"{len(jobs)} runs to train, about {estimated_minutes(jobs, settings.workers):.0f} min on "
              f"{settings.workers} worker(s) of a quiet 2-core machine")
        return ctx.train(run_arm, jobs, finished=finished)

    # 1. the sweep, with the reused runs (and, to check them, one reused Llama run re-trained)
    runs = reused + train_all(sweep_jobs(plan, settings, reused, tokenizer_file, scratch), reused)

    # 2. while a best rate is on the edge of its grid (the preset's rates and any reused), one more rate beyond it
    grids = {arm: sorted({*rates, *(r["learning_rate"] for r in reused if r["arm"] == arm)})
             for arm, rates in plan.sweeps.items()}
    extended = {arm: len(grids[arm]) - len(plan.sweeps[arm]) for arm in grids}  # reused runs' extensions count
    while new := edge_extensions(plan, [r for r in runs if not r.get("verify")], grids, extended):
        for arm, rate in new.items():
            grids[arm].append(rate)
            extended[arm] += 1
        runs += train_all([job for arm, rate in new.items()
                           for job in jobs_for(arm, [rate], settings, tokenizer_file, scratch, runs)], runs)

    # 3. V1's ablations and the 2×-heads arms, at the best rates of the sweep
    best = {arm: best_rate([r for r in runs if not r.get("verify")], arm) for arm in grids}
    runs += train_all(best_rate_jobs(plan, settings, best, tokenizer_file, scratch, runs), runs)
    ctx.finish(runs, grids={arm: sorted(rates) for arm, rates in grids.items()}, best_rates=best,
               reused_from=sorted({r["reused_from"] for r in reused}))
    return runs


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
    return best_mean_rate(runs_of(results, arm), lambda r: r["ppl"])


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def fmt(stats: tuple[float, float]) -> str:
    return mean_pm_std(stats, 2)


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


def sweep_lines(state: dict) -> list[str]:
    """Perplexity of every arm at every rate it was trained at (mean ± std over seeds; bold: its best)."""
    results, arms = state["results"], state["arms"]
    rates = sorted({r["learning_rate"] for r in results if not r.get("verify")})
    return sweep_table("arm", rates, [(arm["label"], best_rate(results, name),
                                       {rate: fmt(ppl(results, name, rate)) for rate in rates_of(results, name)})
                                      for name, arm in arms.items() if best_rate(results, name) is not None])


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


def render(state: dict, out: Path) -> dict:
    """Write v1_question.md, .json and .png from `state` (settings, arms, runs, timing); returns the saved state."""
    settings = settings_from_dict(Settings, state["settings"])
    results = state["results"]
    state = dict(state, chart=make_chart(state, out / "v1_question.png"))
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
        *study_header(
            "The V1 question: a bracketed sweep, twice the heads, and V1's ablations", state,
            f" (preset **{state['preset']}**); every run (arm, model, heads, learning rate, seed, perplexity, probes) "
            "is in [`v1_question.json`](v1_question.json).",
            f"**Wall time:** {wall / 60:.1f} min for {len(trained)} training runs in {settings.workers} worker "
            f"process(es) × {settings.threads_per_worker} thread(s), {duration(per_run)} per run on average "
            "(training and perplexity, under the load above)"
            + (f"; {len(reused)} runs taken from {', '.join(state.get('reused_from', []))} (the same settings, code "
               "path and sequences)" if reused else "") + ".",
            f"**Reuse check:** {'; '.join(checks)}." if checks else None,
            f"**Note:** {state['note']}" if state.get("note") else None),
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
        *sweep_lines(state),
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
    return write_study(out, "v1_question", "\n".join(lines), state)


STUDY = Study(name="v1_question", module="benchmarks.studies.text.v1_question", doc=__doc__, presets=PRESETS,
              run=run, reports={"v1_question": render}, arguments=arguments,
              preset_help={"smoke": "tiny models, a few steps, one seed: the tests"})


def main(argv=None):
    return study.main(STUDY, argv)


if __name__ == "__main__":
    main()
