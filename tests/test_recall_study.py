"""The recall study (benchmarks/studies/recall/): the MQAR sequences, the attention shares on a known map, and the
--smoke study."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.harness.study import LABELS, MODELS
from benchmarks.studies.recall import recall_study, task
from benchmarks.studies.recall.config import FIRST_KEY, PAD, PRESETS, Settings


@pytest.mark.parametrize("fused", [True, False])
def test_sequences_hold_each_queried_value_and_are_reproducible(fused):
    settings = Settings(pairs=(3, 12), context_lens=(24, 40), queries=4, num_keys=16, num_values=8,
                              num_fillers=8, fused_pairs=fused)
    cells = settings.cells * 5
    batch = task.make_batch(settings, np.random.default_rng([7, 0]), cells)
    again = task.make_batch(settings, np.random.default_rng([7, 0]), cells)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    first_value = FIRST_KEY + settings.num_keys
    first_filler = first_value + settings.num_values
    first_pair = first_filler + settings.num_fillers
    assert batch["input_ids"].max() < settings.vocab_size
    for row, (pairs, context_len) in enumerate(cells):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        context = ids[1 : 1 + context_len]
        # the key -> value store, decoded from the context tokens alone
        if fused:
            store = {FIRST_KEY + (t - first_pair) // settings.num_values:
                     first_value + (t - first_pair) % settings.num_values for t in context if t >= first_pair}
            fillers = ((context >= first_filler) & (context < first_pair)).sum()
        else:
            store = {int(context[i]): int(context[i + 1]) for i in range(context_len - 1)
                     if FIRST_KEY <= context[i] < first_value}
            fillers = (context >= first_filler).sum()
        assert len(store) == pairs  # distinct keys, one pair each
        assert fillers == context_len - settings.pair_width * pairs
        queries = [(int(ids[p - 1]), int(labels[p])) for p in np.nonzero(labels != -100)[0]]
        assert len(queries) == min(settings.queries, pairs)
        assert all(store[key] == value for key, value in queries)  # the label is the value stored for the key
        assert all(ids[p] == labels[p] for p in np.nonzero(labels != -100)[0])
        # every query key position points at the context positions of the pair it asks for
        for p in np.nonzero(batch["query_pair"][row] >= 0)[0]:
            stored = np.nonzero(batch["segment"][row] == batch["query_pair"][row, p])[0]
            assert len(stored) == settings.pair_width
            if not fused:
                assert ids[stored[0]] == ids[p] and labels[p + 1] == ids[stored[1]]
            else:
                assert (ids[stored[0]] - first_pair) // settings.num_values == ids[p] - FIRST_KEY
        tail = ids[1 + context_len + 2 * len(queries) :].tolist()
        assert tail == [PAD] * (settings.seq_len - 1 - context_len - 2 * len(queries))


class MapModel(torch.nn.Module):
    """Returns fixed attention maps, one per layer: for checking attention_shares against hand-computed shares."""

    def __init__(self, *attentions):
        super().__init__()
        self.attentions = attentions
        self.config = SimpleNamespace(_attn_implementation="sdpa")

    def set_attn_implementation(self, name):
        self.config._attn_implementation = name

    def forward(self, input_ids, attention_mask=None, output_attentions=False):
        return SimpleNamespace(attentions=self.attentions)


def test_attention_shares_divide_by_the_absolute_row_sum():
    # positions: 0 BOS, 1 filler, 2-3 pair 0, 4-5 pair 1, 6 query key asking pair 1
    batch = {"input_ids": np.array([[1, 9, 2, 5, 3, 6, 3]]), "segment": np.array([[-1, -2, 0, 0, 1, 1, -1]]),
             "query_pair": np.array([[-1, -1, -1, -1, -1, -1, 1]])}
    attention = torch.zeros(1, 2, 7, 7)
    attention[0, 0, 6] = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.2, 0.4, 0.0])  # a softmax row (sums to 1)
    attention[0, 1, 6] = torch.tensor([0.0, -0.1, 0.3, -0.1, 0.0, 0.5, 0.0])  # a differential row: |sum| 1.0, sum 0.6
    first = torch.zeros(1, 2, 7, 7)
    first[0, :, 6, 1] = 1.0  # layer 1: every head on the filler
    shares = task.attention_shares(MapModel(first, attention), batch)
    assert shares["layers"][0]["mean"] == pytest.approx({"queried_pair": 0, "distractor_pairs": 0, "filler": 1})
    assert shares["layers"][1]["mean"] == shares["mean"]  # the top level is the last layer
    expected = {"queried_pair": (0.6 + 0.5) / 2, "distractor_pairs": (0.2 + 0.2) / 2, "filler": (0.1 - 0.1) / 2}
    assert shares["mean"] == pytest.approx(expected, abs=1e-6)
    best = {"queried_pair": 0.6, "distractor_pairs": 0.2, "filler": 0.1}  # head 0 puts more on the queried pair
    assert shares["best_head"] == pytest.approx(best, abs=1e-6)


def test_best_rate_and_steps_to_90():
    runs = [{"model": "llama", "width": 8, "learning_rate": lr, "seed": s, "mean_acc": acc}
            for lr, accs in ((1e-3, (0.5, 0.6)), (3e-3, (0.9, 0.7))) for s, acc in enumerate(accs)]
    assert recall_study.best_rate(runs, "llama", 8) == 3e-3
    curve = [{"step": 0, "acc": {"c": 0.0}}, {"step": 50, "acc": {"c": 0.89}}, {"step": 100, "acc": {"c": 0.95}}]
    assert task.steps_to(curve, "c") == 100 and task.steps_to(curve, "c", 0.99) is None


@pytest.mark.slow
def test_recall_study_smoke(tmp_path):
    results = recall_study.main(["--smoke", "--out", str(tmp_path)])
    settings = PRESETS["smoke"]
    assert len(results) == len(MODELS) * len(settings.learning_rates) * len(settings.seeds)
    data = json.loads((tmp_path / "recall_study.json").read_text())
    assert len(data["results"]) == len(results) and data["wall_seconds"] > 0
    cells = {task.cell_name(c) for c in settings.cells}
    for run in data["results"]:
        assert {"model", "seed", "learning_rate", "acc", "mean_acc", "steps_to_90", "attention", "curve"} <= set(run)
        assert set(run["acc"]) == cells and all(0 <= a <= 1 for a in run["acc"].values())
        assert [p["step"] for p in run["curve"]] == [0, 3, 6]
    counts = [p for k, p in data["parameters"].items()]
    assert max(counts) / min(counts) - 1 <= 0.02
    text = (tmp_path / "recall_study.md").read_text()
    for needle in ("## Width 32", "### Findings", "### Learning-rate sweep", "Steps to reach 90%", "## Settings",
                   "Wall time", "not called (one seed)", *LABELS.values()):
        assert needle in text
    png = tmp_path / "recall_study_width32.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.name in text
    # the chart's accuracy bars are each model's per-cell accuracy at its best rate (one seed: std 0)
    chart = data["charts"][png.name]
    for model in MODELS:
        best = recall_study.best_rate(data["results"], model, 32)
        (run,) = recall_study.runs_of(data["results"], model, 32, best)
        assert chart["accuracy"][model] == [[run["acc"][cell], 0.0] for cell in chart["cells"]]
        assert [mean for mean, _ in chart["sweep"][model]] == [
            recall_study.runs_of(data["results"], model, 32, rate)[0]["mean_acc"] for rate in chart["learning_rates"]]
    assert not (tmp_path / "recall_study.partial.json").exists()
    assert not (tmp_path / ".recall_study_scratch").exists()

    # --layers re-trains each model at its best rate: same data and initialisation, so the same accuracies
    reruns = recall_study.main(["--layers", "--out", str(tmp_path)])
    assert sorted(r["model"] for r in reruns) == sorted(MODELS)
    assert all(r["acc_difference_to_study"] == 0 for r in reruns)
    assert all(len(r["attention"][cell]["layers"]) == settings.num_hidden_layers for r in reruns for cell in cells)
    text = (tmp_path / "recall_study.md").read_text()
    assert "### Every layer's attention" in text and "in each model's retrieval layer" in text

    # the report can be re-rendered from the saved runs alone
    (tmp_path / "recall_study.md").unlink()
    recall_study.main(["--report-only", "--out", str(tmp_path), "--note", "re-rendered"])
    assert "re-rendered" in (tmp_path / "recall_study.md").read_text()
