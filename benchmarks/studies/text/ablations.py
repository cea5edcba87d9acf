"""V1's ablations, by module surgery on a built model (`modeling_diff` has no study-only switches), the weight-decay
groupings the study states for each arm, and the probes that show, after training, that an ablation held.

- ``lambda-zero``: λ fixed at 0 (each layer's `lambda_full` returns 0 and the λ vectors are frozen): a plain attention
  with values 2·head_dim wide and the per-head norm;
- ``no-head-norm``: the per-head RMSNorm replaced by its (1 − λ_init) scale alone (its gain frozen, λ kept);
- ``no-scale``: the per-head RMSNorm without the (1 − λ_init) scale.

V1's λ vectors and the norm's gain live in each layer's `self_attn.head_norm` (checkpoints call them `lambda_q1`, ...
and `subln.weight`; both spellings are matched below).
"""

import re

import torch

ABLATIONS = ("lambda-zero", "no-head-norm", "no-scale")
# V1's λ vectors and per-head norm gains (and a V2 λ projection's bias, where a config has one)
DIFFERENTIAL_PARAMETERS = re.compile(r"(?:^|\.)(?:lambda_[qk][12]|head_norm\.weight|subln\.weight|lambda_proj\.bias)$")
DECAY_GROUPINGS = {
    "trainer": "the Trainer's default grouping",
    "exempt": "the Trainer's grouping with V1's λ vectors and head-norm gains taking no weight decay",
    "decayed": "the Trainer's grouping with V1's λ vectors and head-norm gains taking weight decay",
}


def v1_attentions(model) -> list:
    """The V1 attention module of every decoder layer."""
    return [layer.self_attn for layer in model.model.layers]


def ablate(model, ablation: str | None):
    """Apply `ablation` (one of `ABLATIONS`, or None) to a V1 model in place, before its optimizer exists."""
    if ablation is None:
        return model
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {ABLATIONS}")
    for attention in v1_attentions(model):
        norm = attention.head_norm
        if ablation == "lambda-zero":
            zero = torch.zeros((), dtype=torch.float32)
            attention.lambda_full = lambda zero=zero: zero  # the method each forward reads λ from
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(norm, name).requires_grad_(False)
        elif ablation == "no-head-norm":
            norm.forward = lambda hidden_states, norm=norm: hidden_states * norm.scale  # x · (1 − λ_init)
            norm.weight.requires_grad_(False)
        else:
            norm.scale = 1.0
    return model


def decay_grouping(decay: str):
    """`study_trainer`'s `decay_parameters` for one of `DECAY_GROUPINGS` (None: the Trainer's own grouping)."""
    if decay == "trainer":
        return None
    if decay == "exempt":
        return lambda model, names: [name for name in names if not DIFFERENTIAL_PARAMETERS.search(name)]
    if decay == "decayed":
        return lambda model, names: names + [name for name, _ in model.named_parameters()
                                             if DIFFERENTIAL_PARAMETERS.search(name) and name not in names]
    raise ValueError(f"unknown decay grouping {decay!r}; choose from {tuple(DECAY_GROUPINGS)}")


@torch.no_grad()
def probe_v1(model, ids: torch.Tensor) -> dict:
    """What a trained V1 model's forward does, per layer: the λ it uses; the mean row sum of its differential map
    (eager attention: 1 − λ, since both softmax maps' rows sum to 1); its head norm's scale; and the largest
    |head_norm(x) − x · scale| on a random x (0 only when the norm is gone)."""
    from modeling_diff_eval.metrics import attn_implementation

    model.eval()
    with attn_implementation(model, "eager"):
        maps = model(input_ids=ids, output_attentions=True).attentions  # per layer (B, heads, T, T)
    x = torch.randn(2, 3, 2 * model.config.head_dim, generator=torch.Generator().manual_seed(0))
    attentions = v1_attentions(model)
    return {
        "lambda": [float(attention.lambda_full()) for attention in attentions],
        "map_row_sum": [float(layer_maps.sum(-1).mean()) for layer_maps in maps],
        "head_norm_scale": [float(attention.head_norm.scale) for attention in attentions],
        "head_norm_vs_scaled_input": [float((attention.head_norm(x) - x * attention.head_norm.scale).abs().max())
                                      for attention in attentions],
    }
