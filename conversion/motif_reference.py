"""An independent reference of Motif-2.6B's forward, from its ports (`modeling_diff_conversion.motif_reference`).

Plain torch in float64, one differential head at a time with materialised softmax maps. It reads a Motif checkpoint's
tensors by Motif's own names and Motif's `config.json` keys, and never touches `modeling_diff`, so that a layout,
naming or configuration mistake of the import cannot hide in both places. `diff-transformer convert` checks every
Motif import against it. What it implements is what three public ports of Motif-2.6B agree on (vLLM's removed
`motif.py` + `differential_flash_attn.py`, Motif's own vLLM fork, the MLX port `mlx-motif`; docs/conversion.md says
which file and commit showed each fact):

    heads      num_attention_heads counts head_dim-wide sub-heads. Differential head i: q1 = query head 2i,
               q2 = query head 2i+1. KV group j: k1 = key head 2j, k2 = key head 2j+1, value cat(v_2j, v_2j+1)
               (2·head_dim wide). Head i reads group i // (heads / groups).
    λ          λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init,   λ_init = 0.8 − 0.6·exp(−0.3·(layer − 1)), layer from 0
    attention  o_i = subln((softmax(q1 k1ᵀ/√d) − λ·softmax(q2 k2ᵀ/√d)) v)·(1 − λ_init),
               subln = RMSNorm over 2·head_dim with a gain, epsilon attn_rms_norm_eps; RoPE rotates half
    MLP        down(PolyNorm(gate(x)) ⊙ up(x)),   PolyNorm(x) = w0·n(x³) + w1·n(x²) + w2·n(x) + b,
               n(u) = u / sqrt(mean(u²) + 1e-6)
    block      Llama's: pre-RMSNorm (rms_norm_eps) residual blocks, a final RMSNorm, lm_head (or the tied embedding)
"""

import math
from collections.abc import Callable

import torch

POLY_NORM_EPS = 1e-6  # fixed in all three ports (not a config key)
ROPE_TYPES = ("default", "linear", "llama3")  # the rope_scaling types this reference implements


def lambda_init(layer: int) -> float:
    """Motif's λ_init of layer `layer` (counted from 0): the paper's schedule with a one-layer shift."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def poly_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = POLY_NORM_EPS) -> torch.Tensor:
    """w0·n(x³) + w1·n(x²) + w2·n(x) + b, each n an RMS normalisation over the last dimension without a gain."""

    def n(u):
        return u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + eps)

    return weight[0] * n(x**3) + weight[1] * n(x**2) + weight[2] * n(x) + bias


def rope_scaling_of(config: dict) -> dict:
    """Motif's `rope_scaling` with its type under `rope_type` ("default" when absent), and the top-level
    `original_max_position_embeddings` added where the config has one (as vLLM's port does)."""
    scaling = dict(config.get("rope_scaling") or {})
    scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    if config.get("original_max_position_embeddings") and scaling["rope_type"] != "default":
        scaling.setdefault("original_max_position_embeddings", config["original_max_position_embeddings"])
    return scaling


def rope_frequencies(config: dict, head_dim: int) -> torch.Tensor:
    """The inverse frequencies (head_dim / 2,) of Motif's RoPE, float64, with its rope_scaling applied."""
    theta = config.get("rope_theta", 10000.0)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaling = rope_scaling_of(config)
    kind = scaling["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":  # positions divided by the factor
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # long wavelengths divided by the factor, short ones kept, a linear blend between
        factor, old_context = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        blend = ((old_context / wavelength - low) / (high - low)).clamp(0, 1)
        scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        medium = (wavelength <= old_context / low) & (wavelength >= old_context / high)
        return torch.where(medium, (1 - blend) * inv_freq / factor + blend * inv_freq, scaled)
    raise NotImplementedError(f"rope_scaling type {kind!r}: this reference implements {', '.join(ROPE_TYPES)}")


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[j], x[j + d/2]) of a (T, d) tensor by the angle position·inv_freq[j]."""
    half = x.shape[-1] // 2
    angle = positions[:, None].double() * inv_freq[None, :]  # (T, d/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[:, :half], x[:, half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def causal_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) over the keys at or before each query, for (T, d) q and k."""
    scores = (q @ k.T) / math.sqrt(q.shape[-1])
    future = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def linear(x: torch.Tensor, weights: Callable, name: str) -> torch.Tensor:
    """x Wᵀ (+ b when the checkpoint has `name.bias`)."""
    out = x @ weights(name + ".weight").T
    bias = weights(name + ".bias", missing_ok=True)
    return out if bias is None else out + bias


def attention(config: dict, weights: Callable, prefix: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Motif's differential attention of layer `layer` for one sequence x (T, hidden), output (T, hidden)."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or config["hidden_size"] // heads
    per_group = (heads // 2) // (kv_heads // 2)  # differential heads per KV group
    positions = torch.arange(x.shape[0])
    inv_freq = rope_frequencies(config, d)
    q = linear(x, weights, prefix + "q_proj").view(-1, heads, d)
    k = linear(x, weights, prefix + "k_proj").view(-1, kv_heads, d)
    v = linear(x, weights, prefix + "v_proj").view(-1, kv_heads, d)

    lam_init = lambda_init(layer)
    lam = (
        torch.exp(weights(prefix + "lambda_q1") @ weights(prefix + "lambda_k1"))
        - torch.exp(weights(prefix + "lambda_q2") @ weights(prefix + "lambda_k2"))
        + lam_init
    )
    outputs = []
    for i in range(heads // 2):
        g = i // per_group
        q1, q2 = rope(q[:, 2 * i], positions, inv_freq), rope(q[:, 2 * i + 1], positions, inv_freq)
        k1, k2 = rope(k[:, 2 * g], positions, inv_freq), rope(k[:, 2 * g + 1], positions, inv_freq)
        value = torch.cat([v[:, 2 * g], v[:, 2 * g + 1]], dim=-1)  # (T, 2d)
        difference = causal_softmax(q1, k1) @ value - lam * (causal_softmax(q2, k2) @ value)
        normed = rms_norm(difference, weights(prefix + "subln.weight"), config["attn_rms_norm_eps"])
        outputs.append(normed * (1 - lam_init))
    return linear(torch.cat(outputs, dim=-1), weights, prefix + "o_proj")


def mlp(config: dict, weights: Callable, prefix: str, x: torch.Tensor) -> torch.Tensor:
    gate = linear(x, weights, prefix + "gate_proj")
    if config.get("hidden_act", "poly_norm") == "poly_norm":
        gate = poly_norm(gate, weights(prefix + "act_fn.weight"), weights(prefix + "act_fn.bias"))
    else:  # "silu", the only other activation the import accepts
        gate = torch.nn.functional.silu(gate)
    return linear(gate * linear(x, weights, prefix + "up_proj"), weights, prefix + "down_proj")


@torch.no_grad()
def causal_lm_logits(config: dict, weights: Callable, input_ids: torch.Tensor, vocab_chunk: int = 8192):
    """Logits (T, vocab), float64, of Motif's forward over one sequence of token ids (T,).

    `config` is the checkpoint's config.json as a dict; `weights(name, missing_ok=False, rows=None)` returns the
    checkpoint tensor `name` (Motif's names), or its `rows` (token ids, or a slice of the vocabulary), as float64,
    or None for a missing one when `missing_ok`. The model is read one tensor at a time, so a large checkpoint needs
    one layer's float64 weights in memory, not the whole model.
    """
    eps = config["rms_norm_eps"]
    x = weights("model.embed_tokens.weight", rows=input_ids)  # (T, hidden)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(x, weights(p + "input_layernorm.weight"), eps)
        x = x + attention(config, weights, p + "self_attn.", layer, h)
        x = x + mlp(config, weights, p + "mlp.", rms_norm(x, weights(p + "post_attention_layernorm.weight"), eps))
    x = rms_norm(x, weights("model.norm.weight"), eps)
    head = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
    chunks = []
    for start in range(0, config["vocab_size"], vocab_chunk):
        chunks.append(x @ weights(head, rows=slice(start, start + vocab_chunk)).T)
    return torch.cat(chunks, dim=-1)
