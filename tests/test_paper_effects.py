"""benchmarks/paper_effects.py end to end at --smoke settings: trains, measures, writes the report and charts."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_study():
    spec = importlib.util.spec_from_file_location("paper_effects", ROOT / "benchmarks" / "paper_effects.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_effects_smoke(tmp_path):
    study = load_study()
    results = study.main(["--smoke", "--out", str(tmp_path)])
    assert sorted(r["model"] for r in results) == sorted(study.MODELS)

    report = (tmp_path / "paper_effects.md").read_text()
    assert "## Results" in report and "## Settings" in report and "Wall time" in report
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
    assert not (tmp_path / "paper_effects.partial.json").exists()


def test_help_documents_every_flag(capsys):
    study = load_study()
    try:
        study.parse_args(["--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    for flag in ("--smoke", "--scale", "--seeds", "--steps", "--workers", "--out"):
        assert flag in text


def test_lr_sweep_reuses_matching_runs_and_compares_each_model_at_its_best_rate(tmp_path):
    study = load_study()
    study.main(["--smoke", "--out", str(tmp_path), "--models", "llama", "diff-v1"])
    earlier = json.loads((tmp_path / "paper_effects.json").read_text())
    rate = earlier["settings"]["learning_rate"]
    results = study.main(["--smoke", "--out", str(tmp_path), "--lr-sweep", str(rate), "3e-3",
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
    assert "each at its own best rate" in report and "2 runs at the same settings were taken" in report
    assert (tmp_path / "paper_effects_lr_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "paper_effects_lr_sweep.partial.json").exists()
