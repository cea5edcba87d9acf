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
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.harness.models import parameter_count
from benchmarks.harness.report import add_run_arguments, command
from benchmarks.studies import harness
from benchmarks.studies.harness import equal_parameter_configs
from benchmarks.studies.text.ablations import DIFFERENTIAL_PARAMETERS, ablate, decay_grouping, probe_v1
from benchmarks.studies.text.config import Settings
from benchmarks.studies.text.data import corpus
from benchmarks.studies.text.runs import load_tokenizer, measure, prepare, reusable_runs, train
from benchmarks.studies.text.v1_question_config import ABLATION_ARMS, ARMS, EPS, HEAD_ARMS, PRESETS, RUN_MINUTES
from benchmarks.studies.text.v1_question_report import best_rate, write_report

MODULE = "benchmarks.studies.text.v1_question"
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
    report = harness.reporter(queue, f"{name} lr {settings.learning_rate:g} seed {seed}")

    arm = ARMS[name]
    tokenizer = load_tokenizer(job["tokenizer_file"])
    config = arm_config(name, settings, len(tokenizer))
    model = ablate(harness.init_model(config, seed), arm.ablation)
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps, one seed: the tests")
    add_run_arguments(parser, "v1_question")
    parser.add_argument("--workers", type=int, default=None,
                        help="training processes in parallel, one thread each (default: the preset's)")
    parser.add_argument("--no-reuse", action="store_true",
                        help="train every run, also the Llama runs the preset takes from committed results")
    parser.add_argument("--reuse", type=Path, nargs="+", default=None,
                        help="results files of a study with identical settings whose runs are taken instead of "
                             "retrained: of the text study its Llama runs, of this study (finished, or the partial "
                             "file of an interrupted run) every run (default: the preset's)")
    parser.add_argument("--verify-reuse", action="store_true",
                        help="also re-train one reused run and report how far it lands from the saved one")
    parser.add_argument("--no-head-arms", action="store_true",
                        help="leave out the 2×-heads arms, about a quarter of the default run's time")
    parser.add_argument("--dry-run", action="store_true",
                        help="train nothing: print the runs the study would train and its estimated wall time")
    parser.add_argument("--measure-costs", action="store_true",
                        help="train nothing: time a few training steps of every arm on one thread and print each "
                             "against Llama's and V1's (the ratios behind RUN_MINUTES)")
    parser.add_argument("--report-only", action="store_true", help="do not train: re-write the report of OUT's runs")
    return parser.parse_args(argv)


def reused_runs(paths, settings: Settings, llama_rates) -> list[dict]:
    """The runs saved in `paths` by a study with identical settings (`reusable_runs`), one per (arm, rate, seed): of
    the text study (runs without an arm) its 8-head Llama runs at `llama_rates`, of this study every run."""
    runs = []
    for path in paths:
        for run in reusable_runs(path, settings, ("llama", "diff-v1")):
            at_a_rate = any(math.isclose(run["learning_rate"], rate) for rate in llama_rates)
            if "arm" not in run and run["model"] == "llama" and at_a_rate:  # the text study's 8-head Llama
                runs.append(dict(run, arm="llama", heads=settings.heads, differential_heads=None,
                                 head_dim=settings.hidden_size // settings.heads, rms_norm_eps=LLAMA_EPS,
                                 ablation=None, decay="trainer"))
            elif "arm" in run and not run.get("verify"):
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
        model = ablate(harness.init_model(arm_config(name, settings, vocab), 0), arm.ablation).train()
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


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    out = args.out
    if args.report_only:
        partial = out / "v1_question.partial.json"
        state = json.loads((partial if partial.exists() else out / "v1_question.json").read_text())
        return write_report(state, out)["results"]

    plan = PRESETS["smoke" if args.smoke else "default"]
    plan = replace(plan, verify_reuse=plan.verify_reuse or args.verify_reuse,
                   head_arms=plan.head_arms and not args.no_head_arms)
    settings = plan.settings if args.workers is None else replace(plan.settings, workers=args.workers)
    reuse = () if args.no_reuse else tuple(args.reuse) if args.reuse else plan.reuse
    if args.measure_costs:
        return measure_costs(settings)
    reused = reused_runs(reuse, settings, plan.sweeps["llama"])
    if args.dry_run:
        return dry_run(plan, settings, reused)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scratch = out / ".v1_question_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tokenizer_file, _ = prepare(settings, scratch)
    vocab = len(load_tokenizer(tokenizer_file))
    state = {"settings": asdict(settings), "preset": "smoke" if args.smoke else "default",
             "command": command(MODULE, sys.argv[1:] if argv is None else argv), "machine": harness.machine_line(),
             "arms": {name: dict(asdict(arm), parameters=parameter_count(ablate(harness.init_model(
                 arm_config(name, settings, vocab), 0), arm.ablation))) for name, arm in ARMS.items()},
             "started": started, "load_samples": []}
    if any(r["parameters"] != state["arms"][r["arm"]]["parameters"] for r in reused):
        raise SystemExit("error: reused runs have another parameter count than this study's arms; drop --reuse")
    partial = out / "v1_question.partial.json"

    def train_all(jobs: list[dict], finished: list[dict]) -> list[dict]:
        print(f"{len(jobs)} runs to train, about {estimated_minutes(jobs, settings.workers):.0f} min on "
              f"{settings.workers} worker(s) of a quiet 2-core machine")
        return harness.run_jobs(run_arm, jobs, settings.workers, len(jobs) * settings.steps, partial, state, finished)

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

    state = harness.finished_state(state, runs, started)
    state.update(grids={arm: sorted(rates) for arm, rates in grids.items()}, best_rates=best,
                 reused_from=sorted({r["reused_from"] for r in reused}))
    write_report(state, out)
    partial.unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {out / 'v1_question.md'} in {state['wall_seconds'] / 60:.1f} min")
    return runs


if __name__ == "__main__":
    main()
