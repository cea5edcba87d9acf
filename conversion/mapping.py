"""How each source tensor becomes DiffTransformer tensors: pure functions, one tensor at a time.

Three mappings, all written for the DiffTransformer layout of `modeling_diff` (heads counted as Llama counts them):

* Llama -> V2 (function-preserving). Each Llama query head h becomes BOTH query heads 2h and 2h+1 of output head
  h, the λ projection starts at zero (sigmoid(0) = 1/2) and o_proj is doubled:
  out_h = 2 * W_o,h (a_h - 1/2 a_h) = W_o,h a_h, Llama's output exactly. Every parameter gets a gradient at once:
  the two copies receive opposite-sign gradients (+g and -g/2), so the pair starts to differ on the first step, and
  ∂L/∂W_λ = -σ'(0) <∂L/∂out_h, a_h> is non-zero. (A zero-initialised Q2/K2 with λ = 0, as in axolotl's
  converter, gets no gradient on Q2/K2 and never becomes differential.)
* Llama -> V1 (the paper's layout; not function-preserving). V1 group g holds Llama KV heads 2g and 2g+1 as k1 and
  k2; differential head i = g * r + j pairs the j-th Llama query head of KV head 2g (as q1) with the j-th of KV head
  2g+1 (as q2), r being Llama's queries per KV head. So each softmax map of the Diff model is exactly one Llama map
  (for MHA these are the adjacent heads 2i and 2i+1). The two value heads are concatenated and the o_proj blocks of
  the two Llama heads sit side by side. What cannot be kept: each map now multiplies both value heads, and the
  differential head is normalised (RMSNorm) — so the logits change and need fine-tuning (or distillation).
* DiffLlama -> V1 (function-preserving). transformers' DiffLlama pairs query head i with i + H/2 and KV head g with
  g + KV/2, and uses a non-affine per-head norm; the permutation below puts them where our pairing expects them
  and the norm weight is set to ones.
"""

import torch


def llama_v1_query_order(num_heads: int, num_kv_heads: int) -> list[int]:
    """Llama query head placed at each DiffTransformer V1 query slot (slot 2i is q1, 2i+1 is q2 of head i)."""
    per_kv = num_heads // num_kv_heads  # Llama query heads per KV head
    order = []
    for group in range(num_kv_heads // 2):
        for j in range(per_kv):
            order += [(2 * group) * per_kv + j, (2 * group + 1) * per_kv + j]
    return order


def diffllama_query_order(num_heads: int) -> list[int]:
    """DiffLlama query head placed at each V1 slot: q1 of head i is DiffLlama head i, q2 is head i + H/2."""
    half = num_heads // 2
    return [h for i in range(half) for h in (i, i + half)]


def diffllama_kv_order(num_kv_heads: int) -> list[int]:
    """DiffLlama KV head placed at each V1 KV slot: k1/v1 of group g is head g, k2/v2 is head g + KV/2."""
    half = num_kv_heads // 2
    return [h for g in range(half) for h in (g, g + half)]


def permute_heads(weight: torch.Tensor, order: list[int], head_dim: int) -> torch.Tensor:
    """Reorder the output rows of a projection (or a bias) head by head: new head k = old head order[k]."""
    heads = weight.reshape(-1, head_dim, *weight.shape[1:])  # (heads, head_dim, ...)
    return heads[order].reshape(len(order) * head_dim, *weight.shape[1:]).contiguous()


def permute_input_heads(weight: torch.Tensor, order: list[int], head_dim: int) -> torch.Tensor:
    """Reorder the input columns of o_proj head by head: new head k reads old head order[k]."""
    out_features = weight.shape[0]
    heads = weight.reshape(out_features, -1, head_dim)  # (out, heads, head_dim)
    return heads[:, order].reshape(out_features, len(order) * head_dim).contiguous()


def duplicate_heads(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each head's rows twice in a row: head h becomes heads 2h and 2h+1 (Llama q_proj -> V2 q_proj)."""
    heads = weight.reshape(-1, head_dim, *weight.shape[1:])
    doubled = torch.repeat_interleave(heads, 2, dim=0)
    return doubled.reshape(-1, *weight.shape[1:]).contiguous()


def map_llama_to_v2(name: str, tensor: torch.Tensor, source) -> dict[str, torch.Tensor]:
    """One Llama tensor -> the V2 tensors it becomes (name -> tensor). `source` is the Llama config."""
    head_dim = source.head_dim
    if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
        return {name: duplicate_heads(tensor, head_dim)}
    if name.endswith("self_attn.o_proj.weight"):
        out = {name: tensor * 2}
        prefix = name[: -len("o_proj.weight")]
        out[prefix + "lambda_proj.weight"] = torch.zeros(
            source.num_attention_heads, tensor.shape[0], dtype=tensor.dtype
        )
        return out
    return {name: tensor}


def map_llama_to_v1(name: str, tensor: torch.Tensor, source, lambda_vectors) -> dict[str, torch.Tensor]:
    """One Llama tensor -> the V1 tensors it becomes. `lambda_vectors(layer)` gives the four λ vectors."""
    head_dim = source.head_dim
    order = llama_v1_query_order(source.num_attention_heads, source.num_key_value_heads)
    if ".self_attn.q_proj." in name:
        return {name: permute_heads(tensor, order, head_dim)}
    if name.endswith("self_attn.o_proj.weight"):
        out = {name: permute_input_heads(tensor, order, head_dim)}
        prefix = name[: -len("o_proj.weight")]
        layer = int(name.split("layers.")[1].split(".")[0])
        for key, value in lambda_vectors(layer).items():
            out[prefix + key] = value.to(tensor.dtype)
        out[prefix + "subln.weight"] = torch.ones(2 * head_dim, dtype=tensor.dtype)
        return out
    # k_proj: heads 2g and 2g+1 already are k1 and k2 of group g; v_proj: their rows already concatenate
    return {name: tensor}


def map_diffllama_to_v1(name: str, tensor: torch.Tensor, source) -> dict[str, torch.Tensor]:
    """One DiffLlama tensor -> the V1 tensors it becomes (exactly the same function)."""
    head_dim = source.head_dim
    if ".self_attn.q_proj." in name:
        return {name: permute_heads(tensor, diffllama_query_order(source.num_attention_heads), head_dim)}
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        return {name: permute_heads(tensor, diffllama_kv_order(source.num_key_value_heads), head_dim)}
    if name.endswith("self_attn.o_proj.weight"):
        prefix = name[: -len("o_proj.weight")]
        return {name: tensor, prefix + "subln.weight": torch.ones(2 * head_dim, dtype=tensor.dtype)}
    return {name: tensor}  # λ vectors, norms, MLP and embeddings keep their names and values
