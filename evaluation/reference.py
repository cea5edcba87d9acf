"""An independent reference for differential attention, written from the equations (`modeling_diff_eval.reference`).

Plain torch, one head at a time, with materialised softmax maps. It reads only the weights of a model (by name),
never its modules, so a layout or pairing bug in `modeling_diff` cannot hide in both places. The model tests and the
GPU check (`benchmarks/gpu/gpu_check.py`) compare the model against it.

V1 (paper):  o_i = (softmax(q1 k1ᵀ/√d) − λ softmax(q2 k2ᵀ/√d)) v,   then RMSNorm(2d)·(1 − λ_init)
             λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init,   λ_init = 0.8 − 0.6·exp(−0.3·layer)
V2:          o_h = softmax(q_{2h} kᵀ/√d) v − sigmoid(w_λ,h · x) softmax(q_{2h+1} kᵀ/√d) v
"""

import math

import torch


def rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta):
    """Rotate each pair (x[j], x[j + d/2]) of a (T, d) tensor by the angle position·theta^(−2j/d)."""
    d = x.shape[-1]
    half = d // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
    angle = positions[:, None].double() * freqs[None, :]  # (T, d/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[:, :half], x[:, half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def softmax_map(q, k, scale, key_mask):
    """Causal softmax(q kᵀ·scale) for (T, d) q and k; `key_mask` (T,) is False at padded keys."""
    T = q.shape[0]
    scores = (q @ k.T) * scale
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & key_mask[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def lambda_init_of(config, layer):
    if config.lambda_init is not None:
        return config.lambda_init
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


def attention_v1(config, w, prefix, layer, x, positions, key_mask):
    """Paper differential attention for one sequence x (T, hidden). Returns (output, list of differential maps)."""
    d, H, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    theta = config.rope_parameters["rope_theta"]
    heads, groups = H // 2, n_kv // 2
    per_group = heads // groups
    q = (x @ w[prefix + "q_proj.weight"].T).view(-1, H, d)
    k = (x @ w[prefix + "k_proj.weight"].T).view(-1, n_kv, d)
    v = (x @ w[prefix + "v_proj.weight"].T).view(-1, n_kv, d)

    lam_init = lambda_init_of(config, layer)
    lam = (
        torch.exp((w[prefix + "head_norm.lambda_q1"] * w[prefix + "head_norm.lambda_k1"]).sum())
        - torch.exp((w[prefix + "head_norm.lambda_q2"] * w[prefix + "head_norm.lambda_k2"]).sum())
        + lam_init
    )
    outs, maps = [], []
    for i in range(heads):
        g = i // per_group
        q1, q2 = rope(q[:, 2 * i], positions, theta), rope(q[:, 2 * i + 1], positions, theta)
        k1, k2 = rope(k[:, 2 * g], positions, theta), rope(k[:, 2 * g + 1], positions, theta)
        value = torch.cat([v[:, 2 * g], v[:, 2 * g + 1]], dim=-1)  # (T, 2d)
        diff_map = softmax_map(q1, k1, d**-0.5, key_mask) - lam * softmax_map(q2, k2, d**-0.5, key_mask)
        o = rms_norm(diff_map @ value, w[prefix + "head_norm.weight"], config.rms_norm_eps) * (1 - lam_init)
        outs.append(o)
        maps.append(diff_map)
    return torch.cat(outs, dim=-1) @ w[prefix + "o_proj.weight"].T, maps


def attention_v2(config, w, prefix, layer, x, positions, key_mask):
    """DIFF V2 attention for one sequence x (T, hidden). Returns (output, list of differential maps)."""
    d, H, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    theta = config.rope_parameters["rope_theta"]
    n_rep = H // n_kv
    q = (x @ w[prefix + "q_proj.weight"].T).view(-1, H, d)
    k = (x @ w[prefix + "k_proj.weight"].T).view(-1, n_kv, d)
    v = (x @ w[prefix + "v_proj.weight"].T).view(-1, n_kv, d)
    gate = torch.sigmoid(x @ w[prefix + "lambda_proj.weight"].T)  # (T, H/2)
    outs, maps = [], []
    for h in range(H // 2):
        kv1, kv2 = (2 * h) // n_rep, (2 * h + 1) // n_rep
        assert kv1 == kv2, "both heads of a V2 pair must share a KV head"
        kh = rope(k[:, kv1], positions, theta)
        a1 = softmax_map(rope(q[:, 2 * h], positions, theta), kh, d**-0.5, key_mask)
        a2 = softmax_map(rope(q[:, 2 * h + 1], positions, theta), kh, d**-0.5, key_mask)
        outs.append(a1 @ v[:, kv1] - gate[:, h : h + 1] * (a2 @ v[:, kv1]))
        maps.append(a1 - gate[:, h : h + 1] * a2)
    return torch.cat(outs, dim=-1) @ w[prefix + "o_proj.weight"].T, maps


def causal_lm_forward(model, input_ids, attention_mask=None, differentiable=False):
    """Logits (B, T, V) and per-layer differential maps of a DiffTransformerForCausalLM, from its weights alone.

    Positions count the real tokens only (left padding gets the positions `generate` would give it). With
    `differentiable=True` the float64 weights stay connected to the model's parameters, so that a backward pass
    through this reference fills `param.grad` with the gradients of the equations.
    """
    config = model.config
    if differentiable:
        w = {name: t.double() for name, t in model.named_parameters()}
    else:
        w = {name: t.detach().double() for name, t in model.state_dict().items()}
    if "lm_head.weight" not in w:
        w["lm_head.weight"] = w["model.embed_tokens.weight"]
    attention = attention_v1 if config.diff_version == 1 else attention_v2
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eps = config.rms_norm_eps
    all_logits, all_maps = [], []
    for ids, mask in zip(input_ids, attention_mask.bool()):
        positions = (mask.long().cumsum(0) - 1).clamp(min=0)
        x = w["model.embed_tokens.weight"][ids]
        layer_maps = []
        for layer in range(config.num_hidden_layers):
            p = f"model.layers.{layer}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            out, maps = attention(config, w, p + "self_attn.", layer, h, positions, mask)
            x = x + out
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
            layer_maps.append(torch.stack(maps))
        x = rms_norm(x, w["model.norm.weight"], eps)
        all_logits.append(x @ w["lm_head.weight"].T)
        all_maps.append(layer_maps)
    maps_per_layer = [torch.stack([m[layer] for m in all_maps]) for layer in range(config.num_hidden_layers)]
    return torch.stack(all_logits), maps_per_layer
