"""The metrics of the paper's analysis, on plain tensors, and a hook that captures attention logits of any model.

- `answer_attention_share`: paper Table 3, the attention that a query position puts on the answer span and on
  the rest of the context ("noise").
- `outlier_stats`: paper Table 5, the k-th largest activation magnitude over the median magnitude.
- `capture_attention_logits`: records ``query @ keyᵀ · scaling`` of every attention call, for any model that
  calls transformers' attention interface (Llama, DiffLlama, DiffTransformer...).
"""

import contextlib

import torch


def answer_attention_share(
    attention: torch.Tensor, answer_positions, context_positions
) -> tuple[float, float]:
    """(answer share, noise share) of one query position's attention, averaged over heads.

    `attention` is the attention row of the query position, shape ``(heads, keys)`` or ``(keys,)``. The answer
    share is the attention summed over `answer_positions`; the noise share is the attention summed over the
    `context_positions` that are not answer positions. Attention on other keys (e.g. the query tokens themselves)
    counts in neither. For a differential map rows can hold negative entries; they are summed as they are.
    """
    if attention.dim() == 1:
        attention = attention[None]
    attention = attention.float()
    answer = sorted(set(int(p) for p in answer_positions))
    noise = sorted(set(int(p) for p in context_positions) - set(answer))
    answer_share = attention[:, answer].sum(-1).mean().item() if answer else 0.0
    noise_share = attention[:, noise].sum(-1).mean().item() if noise else 0.0
    return answer_share, noise_share


def outlier_stats(values: torch.Tensor, ks=(1, 10)) -> dict:
    """Magnitude statistics of all entries of `values`: the k-th largest |value| and the median |value|.

    Returns ``{"median": m, "top1": t1, "top1_ratio": t1 / m, "top10": ...}`` for each k in `ks` (the paper's
    "Top-1 / Median" and "Top-10 / Median" columns: the k-th largest magnitude, not the mean of the top k). The
    median of an even count is the mean of the two middle values.
    """
    magnitudes = values.detach().reshape(-1).abs().float().sort().values
    n = magnitudes.numel()
    if n == 0:
        raise ValueError("no values")
    median = ((magnitudes[(n - 1) // 2] + magnitudes[n // 2]) / 2).item()
    stats = {"median": median, "count": n}
    for k in ks:
        top = magnitudes[max(n - k, 0)].item()
        stats[f"top{k}"] = top
        stats[f"top{k}_ratio"] = top / median if median > 0 else float("inf")
    return stats


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention that also appends the valid (unmasked) attention logits to `_CAPTURED`."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros_like(attention_mask, dtype=logits.dtype).masked_fill(
            ~attention_mask, torch.finfo(logits.dtype).min
        )
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        valid = (mask == 0).expand_as(logits)
        weights = logits + mask
    else:  # no mask given: causal over the last T keys
        t, s = logits.shape[-2:]
        valid = torch.ones(t, s, dtype=torch.bool, device=logits.device).tril(s - t).expand_as(logits)
        weights = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    if _CAPTURED is not None:
        _CAPTURED.append(logits.detach()[valid].float().cpu())
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


_CAPTURED: list | None = None
CAPTURE_NAME = "capture_logits"


def _register_capture():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, eager_mask)


@contextlib.contextmanager
def capture_attention_logits(model):
    """Within the block, every attention call of `model` records its valid logits into the yielded list.

    Each entry is a 1-D float32 tensor: the unmasked entries of ``query @ keyᵀ · scaling`` of one layer's call
    (all heads, all query positions). For DiffTransformer V1 the interface receives q1‖0 and 0‖q2 against k1‖k2,
    so these are exactly the per-map logits q1·k1 and q2·k2. The model's attention implementation is restored on
    exit.
    """
    global _CAPTURED
    _register_capture()
    captured: list[torch.Tensor] = []
    _CAPTURED = captured
    try:
        with attn_implementation(model, CAPTURE_NAME):
            yield captured
    finally:
        _CAPTURED = None


@contextlib.contextmanager
def attn_implementation(model, name: str):
    """Switch `model` to attention implementation `name` (e.g. ``"eager"``) inside the block, then restore it."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def lambda_statistics(model, input_ids: torch.Tensor | None = None) -> list[dict]:
    """λ per layer of a DiffTransformer: V1's learned scalar, or V2's mean sigmoid gate over `input_ids`.

    Returns [] for models without differential attention (Llama, ...).
    """
    config = model.config
    if getattr(config, "model_type", None) != "diff_transformer":
        return []
    layers = model.model.layers
    if config.diff_version == 1:
        return [
            {"layer": i, "lambda": layer.self_attn.lambda_full().item(), "lambda_init": layer.self_attn.lambda_init}
            for i, layer in enumerate(layers)
        ]
    gates: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.lambda_proj.register_forward_hook(
            lambda module, args, out, i=i: gates.__setitem__(i, torch.sigmoid(out.float()))
        )
        for i, layer in enumerate(layers)
    ]
    try:
        model(input_ids if input_ids is not None else torch.tensor([[config.bos_token_id or 0] * 8]))
    finally:
        for hook in hooks:
            hook.remove()
    return [
        {"layer": i, "lambda": gates[i].mean().item(), "lambda_std": gates[i].std().item()} for i in range(len(layers))
    ]


def format_lambda_table(stats: list[dict]) -> str:
    """A markdown table of `lambda_statistics`."""
    if not stats:
        return "(no differential attention: no λ to report)"
    v1 = "lambda_init" in stats[0]
    head = "| layer | λ | λ_init |" if v1 else "| layer | mean sigmoid(λ(x)) | std over tokens and heads |"
    rows = [head, "| --- | --- | --- |"]
    for s in stats:
        rows.append(
            f"| {s['layer']} | {s['lambda']:.4f} | "
            + (f"{s['lambda_init']:.4f} |" if v1 else f"{s['lambda_std']:.4f} |")
        )
    return "\n".join(rows)
