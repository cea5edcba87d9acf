"""The V1 question (benchmarks/studies/text/v1_question.py): the ablations change V1's forward as they state, the
weight-decay groupings hold, and the --smoke study runs end to end, extends an edge of its sweep and reuses runs."""

import json
import math

import pytest
import torch

from benchmarks.studies.text import ablations, v1_question
from benchmarks.studies.text.v1_question import best_rate, ppl
from benchmarks.studies.text.v1_question_config import ABLATION_ARMS, ARMS, PLANS, PRESETS


def tiny_v1(ablation=None, seed=0):
    settings = PRESETS["smoke"]
    config = v1_question.arm_config("v1", settings, 300)
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return ablations.ablate(model, ablation)


def maps_row_sums(model, ids):
    with torch.no_grad():
        maps = model(input_ids=ids, output_attentions=True).attentions
    return [layer.sum(-1) for layer in maps]  # (B, heads, T) per layer


def test_ablations_change_the_forward_as_stated():
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    base, zero = tiny_v1(), tiny_v1("lambda-zero")
    with torch.no_grad():  # give λ a value of its own, as training does
        for model in (base, zero):
            for attention in ablations.v1_attentions(model):
                attention.head_norm.lambda_q1.fill_(0.3)
                attention.head_norm.lambda_k1.fill_(0.2)
    for attention, sums in zip(ablations.v1_attentions(base), maps_row_sums(base, ids)):
        torch.testing.assert_close(sums, torch.full_like(sums, 1 - attention.lambda_full().item()))
        assert abs(attention.lambda_full().item()) > 0.1  # so that 1 − λ differs from 1
    # λ fixed at 0: every differential map is its first softmax map, whose rows sum to 1; the λ vectors are frozen
    for sums in maps_row_sums(zero, ids):
        torch.testing.assert_close(sums, torch.ones_like(sums))
    assert not any(p.requires_grad for n, p in zero.named_parameters() if "lambda_" in n)
    # no head norm: the norm returns its input times (1 − λ_init); no scale: the RMSNorm alone, times its gain
    x = torch.randn(3, 2 * base.config.head_dim)
    ablated = [ablations.v1_attentions(tiny_v1(ablation)) for ablation in ("no-head-norm", "no-scale")]
    for plain, no_norm, no_scale in zip(ablations.v1_attentions(base), *ablated):
        assert torch.equal(no_norm.head_norm(x), x * (1 - plain.lambda_init))
        assert not no_norm.head_norm.weight.requires_grad and no_norm.head_norm.lambda_q1.requires_grad
        expected = torch.nn.functional.rms_norm(x, (x.shape[-1],), no_scale.head_norm.weight, base.config.rms_norm_eps)
        torch.testing.assert_close(no_scale.head_norm(x), expected)
        torch.testing.assert_close(plain.head_norm(x), expected * (1 - plain.lambda_init))
    with pytest.raises(ValueError, match="unknown ablation"):
        ablations.ablate(tiny_v1(), "no-such")


def test_decay_groupings_exempt_or_decay_exactly_lambda_and_the_head_norm():
    model = tiny_v1()
    names = [n for n, p in model.named_parameters() if p.ndim > 1]  # weight matrices only, like a Trainer's list
    differential = {n for n, _ in model.named_parameters() if ablations.DIFFERENTIAL_PARAMETERS.search(n)}
    assert len(differential) == 5 * model.config.num_hidden_layers  # 4 λ vectors and the head-norm gain per layer
    assert ablations.decay_grouping("trainer") is None
    assert ablations.decay_grouping("exempt")(model, names + sorted(differential)) == names
    assert set(ablations.decay_grouping("decayed")(model, names)) == set(names) | differential


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("v1_question")
    runs = v1_question.main(["--smoke", "--out", str(out)])
    return out, runs, json.loads((out / "v1_question.json").read_text())


@pytest.mark.slow
def test_v1_question_smoke_runs_every_arm_and_records_each_run(smoke):
    out, runs, data = smoke
    plan, settings = PLANS["smoke"], PRESETS["smoke"]
    assert {r["arm"] for r in runs} == set(ARMS)
    for run in runs:
        assert {"arm", "model", "heads", "learning_rate", "seed", "ppl", "parameters", "decay"} <= set(run)
        assert run["ppl"] > 1 and run["heads"] == settings.heads * ARMS[run["arm"]].head_factor
        assert run["rms_norm_eps"] == 1e-6
    # both swept arms were best on the top edge of two rates, so each grid grew by one rate (best × 1.5)
    for arm, rates in plan.sweeps.items():
        assert len(data["grids"][arm]) == len(rates) + 1
    # the 2×-heads arms ran at their counterparts' best rates, the ablations at V1's
    v1_best = best_rate(runs, "v1")
    assert all(math.isclose(r["learning_rate"], v1_best) for r in runs if r["arm"] in ABLATION_ARMS)
    assert all(math.isclose(r["learning_rate"], best_rate(runs, "llama")) for r in runs if r["arm"] == "llama-16h")
    # the ablations held through training, in the forward pass
    probes = {r["arm"]: r["probe"] for r in runs if r["model"] == "diff-v1"}
    assert probes["v1-lambda-zero"]["lambda"] == [0.0] * settings.num_hidden_layers
    assert probes["v1-lambda-zero"]["map_row_sum"] == pytest.approx([1.0] * settings.num_hidden_layers)
    assert all(abs(s - (1 - lam)) < 1e-5 for s, lam in zip(probes["v1"]["map_row_sum"], probes["v1"]["lambda"]))
    assert all(lam != 0 for lam in probes["v1"]["lambda"])
    assert max(probes["v1-no-head-norm"]["head_norm_vs_scaled_input"]) == 0
    assert min(probes["v1"]["head_norm_vs_scaled_input"]) > 0
    assert probes["v1-no-scale"]["head_norm_scale"] == [1.0] * settings.num_hidden_layers
    decayed = {r["arm"]: r["decayed_differential_parameters"] for r in runs if r["model"] == "diff-v1"}
    assert decayed.pop("v1-decayed") == 5 * settings.num_hidden_layers and set(decayed.values()) == {0}
    # the report's headline row and the chart carry the runs' numbers
    text = (out / "v1_question.md").read_text()
    assert f"**{ppl(runs, 'v1', v1_best)[0]:.2f} ± 0.00**" in text and "## Each arm at its best learning rate" in text
    assert data["chart"]["sweep"]["llama"]["stats"] == [list(ppl(runs, "llama", rate))
                                                        for rate in data["chart"]["sweep"]["llama"]["rates"]]
    assert (out / "v1_question.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "v1_question.partial.json").exists()


@pytest.mark.slow
def test_v1_question_reuses_its_runs_and_reproduces_one(smoke, tmp_path):
    """Given its own results, the study trains nothing again but the one reused Llama run it checks."""
    out, first, _ = smoke
    runs = v1_question.main(["--smoke", "--out", str(tmp_path), "--reuse", str(out / "v1_question.json")])
    assert sorted(v1_question.key(r) for r in runs if r.get("reused_from")) == sorted(map(v1_question.key, first))
    (check,) = [r for r in runs if not r.get("reused_from")]
    assert check["verify"] and check["arm"] == "llama"
    saved = next(r for r in first if v1_question.key(r) == v1_question.key(check))
    assert check["ppl"] == pytest.approx(saved["ppl"], rel=1e-6)  # the same code path on the same sequences
    assert "Reuse check:" in (tmp_path / "v1_question.md").read_text()


def test_text_study_llama_runs_are_reused_with_their_arm_fields(tmp_path):
    """A text-study results file gives its 8-head Llama runs (only those, at the sweep's rates), completed with the
    fields every run of this study records."""
    settings = PRESETS["smoke"]
    from dataclasses import asdict

    runs = [{"model": model, "seed": 0, "learning_rate": rate, "ppl": 10.0, "parameters": 1}
            for model in ("llama", "diff-v1", "diff-v2") for rate in (1e-3, 3e-3, 9e-3)]
    saved = tmp_path / "paper_effects.json"
    saved.write_text(json.dumps({"settings": asdict(settings), "results": runs}))
    reused = v1_question.reused_runs([saved], settings, (1e-3, 3e-3))
    assert sorted((r["arm"], r["learning_rate"]) for r in reused) == [("llama", 1e-3), ("llama", 3e-3)]
    assert all(r["heads"] == settings.heads and r["decay"] == "trainer" and r["reused_from"] == saved.name
               for r in reused)
    other = json.loads(saved.read_text())
    other["settings"]["steps"] += 1
    saved.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other settings"):
        v1_question.reused_runs([saved], settings, (1e-3,))


def test_dry_run_reuses_the_committed_llama_runs_and_estimates_the_default(capsys):
    """The default study takes the text study's committed Llama runs (same settings, checked field by field) and
    trains nothing in a dry run; its estimate is the sum of its phases."""
    assert v1_question.main(["--dry-run"]) is None
    text = capsys.readouterr().out
    llama_rates = PLANS["default"].sweeps["llama"]
    assert "(9 reused)" in text  # Llama at 5e-4, 1.5e-3 and 4.5e-3, 3 seeds each
    assert f"sweep: {3 * (len(llama_rates) - 3) + 3 * len(PLANS['default'].sweeps['v1'])} runs" in text
    assert "at the best rates: 18 runs" in text and "total without extensions" in text
