"""Run by tests/test_scale_out.py under `torchrun --nproc_per_node 2` (CPU, gloo): tensor parallelism checks.

For each model folder given, every rank loads it twice, whole and with `tp_plan="auto"`, and compares them: logits,
greedy tokens, the shards' shapes, the tied embedding/head, and the gradients of the λ parameters after one backward
pass. Rank 0 writes everything to the JSON file named last; the test asserts on it.
"""

import json
import os
import sys

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import modeling_diff  # noqa: F401  (registers the Auto classes)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) parameter or gradient."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.to_local().shape if isinstance(tensor, DTensor) else tensor.shape)


def compare(folder: str) -> dict:
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    whole = AutoModelForCausalLM.from_pretrained(folder)
    sharded = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto")
    attn, mlp = sharded.model.layers[0].self_attn, sharded.model.layers[0].mlp
    result = {
        "q_proj_local": local_shape(attn.q_proj.weight),
        "q_proj_full": list(full(attn.q_proj.weight).shape),
        "down_proj_local": local_shape(mlp.down_proj.weight),
        "down_proj_full": list(full(mlp.down_proj.weight).shape),
        "head_is_embedding": sharded.lm_head.weight is sharded.model.embed_tokens.weight,
        "embedding_placements": [str(p) for p in sharded.model.embed_tokens.weight.placements],
        "embedding_local": local_shape(sharded.model.embed_tokens.weight),
        "embedding_full": list(full(sharded.model.embed_tokens.weight).shape),
    }
    with torch.no_grad():
        result["max_logit_diff"] = (whole(ids).logits - sharded(ids).logits).abs().max().item()
        greedy = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        result["same_greedy_tokens"] = torch.equal(whole.generate(ids, **greedy), sharded.generate(ids, **greedy))

    # one backward pass: the λ gradients, which only see this rank's heads, must come out whole
    grads = {}
    for model in (whole, sharded):
        model.train()
        model(ids, labels=ids).loss.backward()
        grads[model is sharded] = {n: full(p.grad) for n, p in model.named_parameters() if "layers.0.self_attn" in n}
    result["grad_diff"] = {n: (grads[True][n] - g).abs().max().item() for n, g in grads[False].items()}
    result["grad_scale"] = {n: g.abs().max().item() for n, g in grads[False].items()}
    return result


def main():
    *folders, unsplittable, out = sys.argv[1:]
    results = {os.path.basename(f): compare(f) for f in folders}
    try:
        AutoModelForCausalLM.from_pretrained(unsplittable, tp_plan="auto")
        results["unsplittable_error"] = None
    except ValueError as err:
        results["unsplittable_error"] = str(err)
    if int(os.environ["RANK"]) == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    # tear down before exit: one run without this aborted at exit ("terminate called without an active exception")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
