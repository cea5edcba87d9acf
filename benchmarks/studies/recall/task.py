"""The recall task: multi-query associative recall among distractors (sequences, drawn from a seed), and what is
measured on a model (accuracy on the queried values, where each layer's attention goes from a query key)."""

import numpy as np

from benchmarks.studies.recall.config import BOS, FIRST_KEY, PAD, Settings


def make_batch(settings: Settings, rng: np.random.Generator, cells: list[tuple[int, int]]) -> dict:
    """One MQAR sequence per entry of `cells`, right-padded to `settings.seq_len`.

    Returns numpy arrays: ``input_ids``/``labels`` (labels are -100 except at the queried values),
    ``segment`` (per position: -1 pad/BOS/query section, -2 filler, i ≥ 0 = the i-th pair of the context) and
    ``query_pair`` (per position: the pair index a query key asks for, -1 elsewhere).
    """
    n = len(cells)
    shape = (n, settings.seq_len)
    input_ids, labels = np.full(shape, PAD), np.full(shape, -100)
    segment, query_pair = np.full(shape, -1), np.full(shape, -1)
    first_value = FIRST_KEY + settings.num_keys
    first_filler = first_value + settings.num_values
    first_pair = first_filler + settings.num_fillers
    for row, (pairs, context_len) in enumerate(cells):
        key_ids = rng.choice(settings.num_keys, pairs, replace=False)
        value_ids = rng.integers(0, settings.num_values, pairs)
        keys, values = FIRST_KEY + key_ids, first_value + value_ids
        # filler tokens fall into the pairs + 1 gaps around the pairs, uniformly
        gaps = np.bincount(rng.integers(0, pairs + 1, context_len - settings.pair_width * pairs), minlength=pairs + 1)
        tokens, seg = [BOS], [-1]
        for i in range(pairs + 1):
            tokens += list(first_filler + rng.integers(0, settings.num_fillers, gaps[i]))
            seg += [-2] * int(gaps[i])
            if i < pairs:
                if settings.fused_pairs:
                    tokens.append(first_pair + key_ids[i] * settings.num_values + value_ids[i])
                else:
                    tokens += [keys[i], values[i]]
                seg += [i] * settings.pair_width
        asked = rng.choice(pairs, min(settings.queries, pairs), replace=False)
        start = len(tokens)
        for j, i in enumerate(asked):
            tokens += [keys[i], values[i]]
            seg += [-1, -1]
            query_pair[row, start + 2 * j] = i
            labels[row, start + 2 * j + 1] = values[i]
        input_ids[row, : len(tokens)] = tokens
        segment[row, : len(tokens)] = seg
    return {"input_ids": input_ids, "labels": labels, "segment": segment, "query_pair": query_pair}


def grid_cells(settings: Settings, rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    """`count` cells drawn uniformly from the grid (the training mixture)."""
    cells = settings.cells
    return [cells[i] for i in rng.integers(0, len(cells), count)]


def training_data(settings: Settings, seed: int) -> list[dict]:
    """The `steps · batch_size` training sequences of one seed, in order: the same for every model and rate."""
    rng = np.random.default_rng([seed, 0])
    batch = make_batch(settings, rng, grid_cells(settings, rng, settings.steps * settings.batch_size))
    return [{"input_ids": ids, "labels": lab} for ids, lab in zip(batch["input_ids"].tolist(),
                                                                    batch["labels"].tolist())]


def eval_data(settings: Settings, seed: int, samples: int, purpose: int) -> dict:
    """`samples` fresh sequences per cell (drawn like training ones, from another stream of the seed)."""
    rng = np.random.default_rng([seed, purpose])
    return {cell: make_batch(settings, rng, [cell] * samples) for cell in settings.cells}


def recall_accuracy(model, batch: dict, chunk: int = 32) -> float:
    """Share of queries whose value is the model's argmax prediction."""
    import torch

    correct = total = 0
    with torch.no_grad():
        for i in range(0, len(batch["input_ids"]), chunk):
            ids = torch.as_tensor(batch["input_ids"][i : i + chunk])
            labels = torch.as_tensor(batch["labels"][i : i + chunk])
            predicted = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            asked = target != -100
            correct += (predicted[asked] == target[asked]).sum().item()
            total += asked.sum().item()
    return correct / max(total, 1)


def attention_shares(model, batch: dict) -> dict:
    """Where each layer looks from each query key, as shares of the row's total absolute attention.

    For every query key position: the attention on the queried pair (its token, or key and value tokens), on all
    distractor pairs, and on the filler; each divided by the sum of |attention| over the row. For softmax maps the
    divisor is 1; a differential row sums to 1 − λ and can hold negative entries, so the shares put both kinds of map
    on one scale, and a negative share means net negative attention. Averaged over heads (``mean``) and, for the head
    that attends most to the queried pair, that head alone (``best_head``). The top-level ``mean``/``best_head`` are
    the last layer's; ``layers`` holds the same for every layer, first to last.
    """
    import torch
    from modeling_diff_eval.metrics import attn_implementation

    with torch.no_grad(), attn_implementation(model, "eager"):
        ids = torch.as_tensor(batch["input_ids"])
        maps = model(input_ids=ids, attention_mask=(ids != PAD).long(), output_attentions=True).attentions
    layers = [layer_shares(rows.float(), batch) for rows in maps]  # each rows: (batch, heads, T, T)
    return {**layers[-1], "layers": layers}


def layer_shares(rows, batch: dict) -> dict:
    """`attention_shares` for one layer's maps ``rows`` of shape (batch, heads, T, T)."""
    import torch

    totals = {"mean": np.zeros(3), "best_head": np.zeros(3)}
    count = 0
    for b, t in zip(*np.nonzero(batch["query_pair"] >= 0)):
        row = rows[b, :, t]  # (heads, T)
        segment = torch.as_tensor(batch["segment"][b])
        asked = int(batch["query_pair"][b, t])
        scale = row.abs().sum(-1).clamp_min(1e-9)
        parts = torch.stack([row[:, segment == asked].sum(-1),
                             row[:, (segment >= 0) & (segment != asked)].sum(-1),
                             row[:, segment == -2].sum(-1)], -1) / scale[:, None]  # (heads, 3)
        totals["mean"] += parts.mean(0).numpy()
        totals["best_head"] += parts[parts[:, 0].argmax()].numpy()
        count += 1
    names = ("queried_pair", "distractor_pairs", "filler")
    return {kind: dict(zip(names, (v / max(count, 1)).tolist())) for kind, v in totals.items()}


def steps_to(curve: list[dict], cell: str, threshold: float = 0.9):
    """The first logged step at which the cell's accuracy reached `threshold` (None if it never did)."""
    return next((point["step"] for point in curve if point["acc"][cell] >= threshold), None)


def cell_name(cell: tuple[int, int]) -> str:
    return f"{cell[0]}pairs/{cell[1]}ctx"
