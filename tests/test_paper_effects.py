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
