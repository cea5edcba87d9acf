"""The text study (benchmarks/studies/text/) end to end at --smoke settings: trains, measures, writes the report
and charts; the learning-rate sweep reuses matching runs; the study reports' verdict rule."""

import json
import math
import statistics

import pytest

from benchmarks.harness import report, study
from benchmarks.studies.text import paper_effects


@pytest.mark.slow
def test_paper_effects_smoke(tmp_path):
    results = paper_effects.main(["--smoke", "--out", str(tmp_path)])
    assert sorted(r["model"] for r in results) == sorted(study.MODELS)

    report = (tmp_path / "paper_effects.md").read_text()
    assert "## Results" in report and "## Settings" in report and "Wall time" in report
    assert "Produced by `python -m benchmarks.studies.text.paper_effects --smoke --out" in report
    for label in study.LABELS.values():
        assert label in report
    for metric in ("held-out perplexity", "needle accuracy N=1", "attention on answer", "noise context",
                   "attention logits top-1 / median", "hidden states top-10 / median"):
        assert metric in report
    assert "longer than trained" in report

    data = json.loads((tmp_path / "paper_effects.json").read_text())
    params = data["parameters"]
    assert max(params.values()) / min(params.values()) - 1 <= 0.02
    for result in data["results"]:
        assert result["ppl"] > 1 and set(result["needle"]) == {"1/192", "1/256", "2/192", "2/256"}
    for name in ("needle", "attention", "outliers"):
        png = tmp_path / f"paper_effects_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"paper_effects_{name}.png" in report
    # the charts plot the runs' values: one seed, so each bar is that run's value and its std 0
    charts, by_model = data["charts"], {r["model"]: r for r in data["results"]}
    for model, run in by_model.items():
        assert charts["paper_effects_attention.png"]["answer_share"][model] == [run["attention"]["answer_share"], 0.0]
        top1 = charts["paper_effects_outliers.png"]["hidden_states/top1_ratio"][model][0]
        assert top1 == run["outliers"]["hidden_states"]["top1_ratio"]
        by_needles = charts["paper_effects_needle.png"]["by_needles"][model]
        assert by_needles[0][0] == pytest.approx(statistics.fmean([run["needle"]["1/192"], run["needle"]["1/256"]]))
    assert not (tmp_path / "paper_effects.partial.json").exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        study.parse_args(paper_effects.STUDY, ["--help"])
    text = capsys.readouterr().out
    for flag in ("--smoke", "--scale", "--seeds", "--steps", "--workers", "--lr-sweep", "--reuse", "--out"):
        assert flag in text


def test_verdict_needs_two_seeds_and_a_gap_beyond_the_spread():
    assert report.verdict([0.9, 0.92], [0.5, 0.52]) == "better"
    assert report.verdict([10.0, 11.0], [20.0, 21.0], higher_is_better=False) == "better"
    assert report.verdict([0.9, 0.5], [0.6, 0.7]) == "no clear difference"
    assert report.verdict([0.9], [0.5]) == "not called (one seed)"
    assert report.verdict([float("nan")], [0.5, 0.6]) == "not measured"
    mean, std = report.mean_std([1.0, 3.0, None])
    assert mean == 2.0 and std == pytest.approx(math.sqrt(2))


@pytest.mark.slow
def test_lr_sweep_reuses_matching_runs_and_compares_each_model_at_its_best_rate(tmp_path):
    paper_effects.main(["--smoke", "--out", str(tmp_path), "--models", "llama", "diff-v1"])
    earlier = json.loads((tmp_path / "paper_effects.json").read_text())
    rate = earlier["settings"]["learning_rate"]
    results = paper_effects.main(["--smoke", "--out", str(tmp_path), "--lr-sweep", str(rate), "3e-3",
                                  "--reuse", str(tmp_path / "paper_effects.json")])
    assert sorted((r["model"], r["learning_rate"]) for r in results) == sorted(
        (m, lr) for m in ("llama", "diff-v1") for lr in (rate, 3e-3))
    reused = [r for r in results if r.get("reused_from")]
    assert {(r["model"], r["ppl"]) for r in reused} == {(r["model"], r["ppl"]) for r in earlier["results"]}
    data = json.loads((tmp_path / "paper_effects_lr_sweep.json").read_text())
    assert data["learning_rates"] == [rate, 3e-3] and len(data["results"]) == 4
    report = (tmp_path / "paper_effects_lr_sweep.md").read_text()
    best = {m: min((r for r in results if r["model"] == m), key=lambda r: r["ppl"]) for m in ("llama", "diff-v1")}
    for m, run in best.items():  # the bold cell of each row is the model's lowest perplexity
        assert f"**{run['ppl']:.1f} ± 0.0**" in report
    # the chart plots each model's perplexity at every rate, in the sweep's order
    for m in ("llama", "diff-v1"):
        plotted = [mean for mean, _ in data["chart"][m]]
        assert plotted == [next(r["ppl"] for r in results if r["model"] == m and math.isclose(r["learning_rate"], lr))
                           for lr in (rate, 3e-3)]
    assert "each at its own best rate" in report and "2 runs at the same settings were taken" in report
    assert (tmp_path / "paper_effects_lr_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "paper_effects_lr_sweep.partial.json").exists()
    # runs made with other settings are not reused
    with pytest.raises(SystemExit, match="other settings"):
        paper_effects.main(["--smoke", "--steps", "5", "--out", str(tmp_path / "other"), "--lr-sweep", str(rate),
                            "--reuse", str(tmp_path / "paper_effects.json")])
