"""V1's differential-attention core computed in several ways, on the cache layout of `modeling_diff`.

Per differential head i of KV group g:

    out_i = softmax(q1_i k1_gᵀ/√d) v_g - λ softmax(q2_i k2_gᵀ/√d) v_g,     q, k of width d, v of width 2d

with one key of width 2d per KV group holding k1‖k2, one value of width 2d, as many key heads as value heads. Every
scheme reads that layout without changing it; `benchmarks.speed.attention_kernels` times them on CPU and
`benchmarks.gpu.gpu_check` on CUDA.
"""

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Inputs: q (B, T, H, d) straight from q_proj + RoPE, key/value (B, G, S, 2d) as in the cache.
# Output: (B, T, H/2, 2d), the differential heads before the per-head norm. `lam` is the layer's scalar λ.
# Query head layout (the model's): heads = (G groups, P heads per group, 2 maps) with the map innermost.
# ----------------------------------------------------------------------------------------------------------------


def split_query(q: torch.Tensor, groups: int):
    """(B, T, H, d) -> q1, q2 of shape (B, G, P, T, d) each (views)."""
    batch, length, heads, dim = q.shape
    q = q.view(batch, length, groups, heads // (2 * groups), 2, dim)
    return q[..., 0, :].permute(0, 2, 3, 1, 4), q[..., 1, :].permute(0, 2, 3, 1, 4)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, G, P, T, 2d) -> (B, T, G·P, 2d)."""
    batch, groups, per_group, length, width = out.shape
    return out.permute(0, 3, 1, 2, 4).reshape(batch, length, groups * per_group, width)


def core_padded(q, key, value, lam, causal, build="diag_embed"):
    """(a) One sdpa call: [q1‖0] and [0‖q2] against the k1‖k2 key; the model's scheme.

    `build="diag_embed"` builds the padded queries as the model does (one kernel, q1 and q2 of a head adjacent);
    `build="pad+stack"` makes them with two `F.pad` and a `torch.stack`, maps outermost in each KV group.
    """
    batch, length, heads, dim = q.shape
    groups = key.shape[1]
    per_group = heads // (2 * groups)
    q = q.view(batch, length, groups, per_group, 2, dim)
    if build == "diag_embed":
        query = torch.diag_embed(q.transpose(-1, -2), dim1=-3, dim2=-2)  # (B, T, G, P, 2, 2, d)
    else:
        query = torch.stack((F.pad(q[..., 0, :], (0, dim)), F.pad(q[..., 1, :], (dim, 0))), dim=3)  # G, 2, P
    query = query.view(batch, length, heads, 2 * dim).transpose(1, 2)
    # the scale stays 1/√d: the zero half adds nothing to the product, so the width is still d
    out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=dim**-0.5, enable_gqa=True)
    if build == "diag_embed":
        out = out.view(batch, groups, per_group, 2, length, 2 * dim)
        return merge_heads(torch.addcmul(out[:, :, :, 0], lam, out[:, :, :, 1], value=-1))
    out = out.view(batch, groups, 2, per_group, length, 2 * dim)
    return merge_heads(torch.addcmul(out[:, :, 0], lam, out[:, :, 1], value=-1))


def core_padded_stack(q, key, value, lam, causal):
    """(a') As (a), with the padded queries built by pad + pad + stack."""
    return core_padded(q, key, value, lam, causal, build="pad+stack")


def core_four_calls(q, key, value, lam, causal):
    """(b) Four sdpa calls at width d: (q1,k1) and (q2,k2), each with both halves of the value."""
    dim = q.shape[-1]
    groups = key.shape[1]
    q1, q2 = split_query(q, groups)
    batch, _, per_group, length, _ = q1.shape
    k1, k2 = key[..., :dim], key[..., dim:]
    v1, v2 = value[..., :dim], value[..., dim:]

    def call(query, k, v):  # GQA: the P heads of a group share k and v
        query = query.reshape(batch, groups * per_group, length, dim)
        return F.scaled_dot_product_attention(query, k, v, is_causal=causal, enable_gqa=True)

    out1 = torch.cat((call(q1, k1, v1), call(q1, k1, v2)), dim=-1)
    out2 = torch.cat((call(q2, k2, v1), call(q2, k2, v2)), dim=-1)
    out = (out1 - lam * out2).view(batch, groups, per_group, length, 2 * dim)
    return merge_heads(out)


def core_two_calls(q, key, value, lam, causal):
    """(c) Two sdpa calls, q/k of width d and the whole 2d value (CPU sdpa falls back to its math kernel)."""
    dim = q.shape[-1]
    groups = key.shape[1]
    q1, q2 = split_query(q, groups)
    batch, _, per_group, length, _ = q1.shape

    def call(query, k):
        query = query.reshape(batch, groups * per_group, length, dim)
        return F.scaled_dot_product_attention(query, k, value, is_causal=causal, enable_gqa=True)

    out = call(q1, key[..., :dim]) - lam * call(q2, key[..., dim:])
    return merge_heads(out.view(batch, groups, per_group, length, 2 * dim))


def core_maps(q, key, value, lam, causal):
    """(d) Materialised maps: two width-d score matrices, their softmaxes subtracted, one product with v."""
    dim = q.shape[-1]
    groups = key.shape[1]
    q1, q2 = split_query(q, groups)  # (B, G, P, T, d)
    length, source = q1.shape[-2], key.shape[-2]
    k1 = key[..., :dim].unsqueeze(2)  # (B, G, 1, S, d), broadcast over the P heads of the group
    k2 = key[..., dim:].unsqueeze(2)
    scale = dim**-0.5
    s1 = torch.matmul(q1, k1.transpose(-1, -2)) * scale
    s2 = torch.matmul(q2, k2.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril(source - length)
        s1 = s1.masked_fill(~mask, float("-inf"))
        s2 = s2.masked_fill(~mask, float("-inf"))
    attn = torch.softmax(s1, dim=-1) - lam * torch.softmax(s2, dim=-1)
    return merge_heads(torch.matmul(attn, value.unsqueeze(2)))


def core_llama(q, key, value, lam, causal):
    """Baseline: Llama's core with the same config numbers, q (B, T, H, d), k/v (B, 2G, S, d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), key, value, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


CORES = {"llama": core_llama, "padded": core_padded, "padded-stack": core_padded_stack, "4-call": core_four_calls,
         "2-call": core_two_calls, "maps": core_maps}


def make_inputs(scheme, length, source, args, requires_grad):
    """Random q (B, T, H, d) and key/value (B, G, S, 2d); Llama gets (B, 2G, S, d) key/value instead."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, length, args.heads, args.head_dim, generator=generator)
    if scheme == "llama":
        key = torch.randn(1, args.kv_heads, source, args.head_dim, generator=generator)
        value = torch.randn(1, args.kv_heads, source, args.head_dim, generator=generator)
    else:
        key = torch.randn(1, args.kv_heads // 2, source, 2 * args.head_dim, generator=generator)
        value = torch.randn(1, args.kv_heads // 2, source, 2 * args.head_dim, generator=generator)
    lam = torch.tensor(0.5)
    if requires_grad:
        for tensor in (q, key, value, lam):
            tensor.requires_grad_(True)
    return q, key, value, lam
