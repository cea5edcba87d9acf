"""The GPU check: correctness in bf16, compiled decode, speed at ~1B, and V1's attention core on CUDA.

Sections (each guards its own failure: an exception is written into the results and the next section runs):

    (a) correctness  V1 and V2 logits against the plain-torch reference (`modeling_diff_eval.reference`, float64
                     on CPU) for every attention implementation that runs here: eager, sdpa, flex_attention, and
                     flash_attention_2 when the `flash_attn` package imports, in float32 and bf16, at the
                     initialisation and with peaked maps; Llama and DiffLlama as baselines; max |Δ| against a tolerance
    (b) compile      `torch.compile(fullgraph=True)` decoding with a StaticCache gives `generate()`'s tokens (Llama
                     as the baseline; a difference is classed as a rounding tie or a mismatch)
    (c) speed        training step (forward + backward) and decode tokens/s of Llama, DiffLlama, V1 and V2 at a ~1B
                     config at T = 2048 and 4096, models interleaved (the harness's builders and measures)
    (d) V1 core      the model's padded one-call layout against kernels that take q/k of width d with v of width 2d
                     (SDPA forced to the memory-efficient and to the cuDNN backend, FlexAttention with its own V
                     width), two calls (q1,k1,v) and (q2,k2,v) then a1 − λ·a2: equality to the padded layout and
                     CUDA-event times (the schemes of `benchmarks.harness.cores`)
    (e) compiled     decode tok/s of the models of (c) through `generate()` on a StaticCache, which generate()
                     compiles on a GPU (the fast path for batch-1 decoding, where eager steps are launch-bound);
                     each model in a process of its own

Writes `benchmarks/results/gpu_check/gpu_check.md` and `.json`. Sizes are chosen so that the whole run takes a few
minutes on one H100 (bf16). Without CUDA the script prints one line and exits 0; `--cpu-dry-run` runs every section
with tiny sizes on CPU in float32 (skipping only what needs CUDA: flash_attention_2, the forced SDPA backends are
replaced by the math backend) and writes the same tables, to test the script without a GPU.

    bash benchmarks/gpu/gpu_check.sh                      # on a GPU machine without this project installed
    python -m benchmarks.gpu.gpu_check                    # on one H100 with the project installed, a few minutes
    python -m benchmarks.gpu.gpu_check --cpu-dry-run      # tiny sizes on CPU (the smoke test runs this)
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace

import torch

from benchmarks.harness.cores import core_llama, core_maps, core_padded, core_two_calls, make_inputs, split_query
from benchmarks.harness.models import ROOT, build_model, config_numbers, parameter_count, random_ids
from benchmarks.harness.report import (
    add_run_arguments,
    command,
    header,
    machine_info,
    parse_with_argv,
    table,
    write_text,
)
from benchmarks.harness.timing import decode_seconds, time_interleaved, train_step_seconds

# tolerance on max |Δlogit| relative to the largest reference logit; bf16 keeps ~3 significant digits
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

SIZES = {
    "gpu": {
        "device": "cuda",
        "dtypes": [torch.float32, torch.bfloat16],  # (a) and (b) check both; (c) and (d) time the last one
        "correctness": dict(hidden=512, layers=4, heads=16, kv_heads=4, vocab=4096, intermediate=1376, T=256, batch=2,
                            qk_scales=[1, 8]),
        "compile": dict(hidden=512, layers=4, heads=16, kv_heads=4, vocab=4096, intermediate=1376, prompt=16, new=32),
        # ~1.1B parameters: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, MLP 8192) with a 32K vocabulary
        "speed": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000,
                      seq_lens=[2048, 4096], new_tokens=64, repeats=5),
        # one T: each new shape is one more FlexAttention compilation (training, inference, decode)
        "kernels": dict(heads=32, kv_heads=8, head_dim=64, seq_lens=[4096], cache_lens=[4096], check_len=4096,
                        repeats=10, decode_steps=20),
    },
    "cpu-dry-run": {
        "device": "cpu",
        "dtypes": [torch.float32],
        "correctness": dict(hidden=64, layers=2, heads=8, kv_heads=4, vocab=97, intermediate=96, T=12, batch=2,
                            qk_scales=[8]),
        "compile": dict(hidden=64, layers=2, heads=8, kv_heads=4, vocab=97, intermediate=96, prompt=6, new=5),
        "speed": dict(hidden=64, layers=2, heads=8, kv_heads=4, intermediate=96, vocab=97, seq_lens=[32, 64],
                      new_tokens=4, repeats=1),
        "kernels": dict(heads=8, kv_heads=4, head_dim=16, seq_lens=[32, 64], cache_lens=[64], check_len=32, repeats=1,
                        decode_steps=2),
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def device_seconds(fn, device: str) -> float:
    """Seconds of `fn()`: CUDA events on a GPU (kernel time, the queue drained), the wall clock on CPU."""
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def small_numbers(s: dict) -> dict:
    """Config numbers of the small models of sections (a) and (b)."""
    return config_numbers(SimpleNamespace(**s), max_positions=1024)


@functools.lru_cache(maxsize=1)
def float32_is_ieee():
    """Turn TF32 off for float32 matmuls and convolutions (a float32 row then checks float32); return what was set."""
    before = {"torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
              "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
              "float32_matmul_precision": torch.get_float32_matmul_precision()}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return before


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


# ----------------------------------------------------------------------------------------------------------------
# (a) correctness against the plain-torch reference
# ----------------------------------------------------------------------------------------------------------------


def section_correctness(mode: dict) -> tuple[str, dict]:
    """Logits of V1, V2, Llama and DiffLlama on every attention implementation and dtype, against float64.

    V1 and V2 are checked against `modeling_diff_eval.reference` (the equations, one head at a time); Llama and
    DiffLlama, the baselines that say what bf16 costs any attention, against their own float64 forward on CPU.
    """
    from modeling_diff_eval.reference import causal_lm_forward

    s, device = mode["correctness"], mode["device"]
    tf32_before = float32_is_ieee()
    implementations = ["eager", "sdpa", "flex_attention"]
    skipped = []
    if device == "cuda" and flash_attn_available():
        implementations.append("flash_attention_2")
    else:
        reason = "needs CUDA" if device != "cuda" else "flash_attn does not import"
        skipped.append(f"flash_attention_2 ({reason})")
    ids = random_ids(s["vocab"], s["batch"] * s["T"], seed=1).view(s["batch"], s["T"])
    labels = {"llama": "Llama", "diffllama": "DiffLlama", "diff-v1": "V1", "diff-v2": "V2"}
    raw = []
    for qk_scale in s["qk_scales"]:
        for name, label in labels.items():
            model = build_model(name, small_numbers(s), "eager", seed=len(raw))
            with torch.no_grad():  # a q/k scale > 1 peaks the softmax maps, as the tests do
                for layer in model.model.layers:
                    layer.self_attn.q_proj.weight.mul_(qk_scale)
                    layer.self_attn.k_proj.weight.mul_(qk_scale)
                if name.startswith("diff-"):
                    reference, _ = causal_lm_forward(model, ids)
                else:
                    reference = copy.deepcopy(model).double()(ids).logits
            scale = reference.abs().max().item()
            for dtype in mode["dtypes"]:
                for attn in implementations:
                    if attn == "flash_attention_2" and dtype == torch.float32:
                        continue  # flash kernels take half precision only
                    row = {"model": label, "qk_scale": qk_scale, "attn": attn, "dtype": dtype_name(dtype),
                           "reference_max_abs_logit": scale, "max_abs_diff": None, "relative": None}
                    try:
                        other = copy.deepcopy(model)
                        other.set_attn_implementation(attn)
                        with torch.no_grad():
                            if dtype == torch.float32:  # the same model and backend on CPU: what float32 costs here
                                cpu_logits = other(ids).logits.double()
                                row["cpu_relative"] = (cpu_logits - reference).abs().max().item() / scale
                            other.to(device=device, dtype=dtype)
                            logits = other(ids.to(device)).logits.double().cpu()
                        row["max_abs_diff"] = (logits - reference).abs().max().item()
                        row["relative"] = row["max_abs_diff"] / scale
                    except Exception as err:  # one implementation failing must not hide the others
                        row["error"] = f"ERROR {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    raw.append(row)

    # float32: a fixed tolerance, or 4× what float32 costs the same model and backend on CPU (the path the test
    # suite checks) when the problem is ill-conditioned enough for that to be larger. bf16: what bf16 costs Llama on
    # the same problem (×2, two maps per head), or the fixed tolerance when that is larger.
    llama = {(r["qk_scale"], r["attn"], r["dtype"]): r["relative"] for r in raw if r["model"] == "Llama"}
    rows = []
    for r in raw:
        tolerance = TOLERANCE[getattr(torch, r["dtype"])]
        baseline = llama.get((r["qk_scale"], r["attn"], r["dtype"]))
        if r["dtype"] == "float32" and r.get("cpu_relative") is not None:
            tolerance = max(tolerance, 4 * r["cpu_relative"])
        elif baseline is not None:
            tolerance = max(tolerance, 2 * baseline)
        r["tolerance"] = tolerance
        if "error" in r:
            r["verdict"] = r["error"]
        elif r["model"] == "Llama" and r["dtype"] != "float32":
            r["verdict"] = "baseline"
        else:
            r["verdict"] = "PASS" if r["relative"] <= tolerance else "FAIL"
        numbers = ["-", "-"] if "error" in r else [f"{r['max_abs_diff']:.3g}", f"{r['relative']:.2e}"]
        cpu = f"{r['cpu_relative']:.2e}" if r.get("cpu_relative") is not None else "-"
        rows.append([r["model"], f"×{r['qk_scale']:g}", r["attn"], r["dtype"], *numbers, cpu, f"{tolerance:.2e}",
                     r["verdict"]])
    text = (
        f"Random models (hidden {s['hidden']}, {s['layers']} layers, {s['heads']} query / {s['kv_heads']} KV heads, "
        f"vocab {s['vocab']}; q_proj and k_proj scaled by the factor shown: ×1 is the initialisation, ×8 peaks the "
        f"maps as the tests do), batch {s['batch']} × T={s['T']}. V1 and V2 against `modeling_diff_eval.reference` "
        "(one head at a time, materialised maps, float64 on CPU); Llama and DiffLlama (transformers) against their "
        "own float64 eager forward on CPU. Error: max |Δlogit| / max |reference logit|; CPU error: the same model and "
        "backend run in float32 on CPU, the path the test suite checks. Tolerance in float32 (TF32 turned off for the "
        f"check; found: {tf32_before}): the larger of {TOLERANCE[torch.float32]:g} and 4× the CPU error (at ×8 "
        "float32 itself loses digits, for Llama too). In bfloat16: the larger of "
        f"{TOLERANCE[torch.bfloat16]:g} and twice the Llama baseline's error on the same problem, backend and dtype "
        "(bf16 rounds q and k to 8 bits of mantissa, which peaked maps amplify for any attention).\n\n"
        + table(["model", "q/k scale", "attn_implementation", "dtype", "max abs Δlogit", "error", "CPU error",
                 "tolerance", "verdict"], rows)
        + ("\n\nNot run: " + "; ".join(skipped) if skipped else "")
    )
    return text, {"rows": raw, "skipped": skipped, "tf32_before": tf32_before}


# ----------------------------------------------------------------------------------------------------------------
# (b) compiled static-cache decode equals generate()
# ----------------------------------------------------------------------------------------------------------------


def section_compile(mode: dict) -> tuple[str, dict]:
    """torch.compile(fullgraph) of the forward, decoding on a StaticCache, against generate()'s greedy tokens.

    Llama runs the same check as the baseline. Where the tokens differ, the row says whether it is a rounding tie:
    generate()'s top-1 − top-2 logit margin at the first difference against the largest |Δlogit| between the two
    paths up to there.
    """
    from transformers import StaticCache

    s, device = mode["compile"], mode["device"]
    float32_is_ieee()
    rows, raw = [], []
    prompt = random_ids(s["vocab"], s["prompt"], seed=2).to(device)
    for dtype in mode["dtypes"]:
        for name, label in (("llama", "Llama"), ("diff-v1", "V1"), ("diff-v2", "V2")):
            torch._dynamo.reset()
            model = build_model(name, small_numbers(s), "sdpa", seed=3).to(device=device, dtype=dtype)
            out = model.generate(prompt, do_sample=False, max_new_tokens=s["new"], pad_token_id=0, eos_token_id=None,
                                 output_logits=True, return_dict_in_generate=True)
            expected, expected_logits = out.sequences[0, s["prompt"]:], torch.cat(out.logits).float()
            cache = StaticCache(config=model.config, max_cache_len=s["prompt"] + s["new"] + 8)
            step = torch.compile(model.forward, fullgraph=True, dynamic=False)
            started = time.perf_counter()
            with torch.no_grad():
                logits = model(prompt, cache=cache, use_cache=True).logits[:, -1]
                all_logits = [logits]
                for position in range(s["prompt"], s["prompt"] + s["new"] - 1):
                    token = logits.argmax(-1, keepdim=True)
                    position_ids = torch.tensor([[position]], device=device)
                    logits = step(token, cache=cache, use_cache=True, position_ids=position_ids).logits[:, -1]
                    all_logits.append(logits)
            synchronize(device)
            seconds = time.perf_counter() - started
            compiled_logits = torch.cat(all_logits).float()
            compiled = compiled_logits.argmax(-1)
            same = torch.equal(compiled, expected)
            first = next((i for i in range(len(expected)) if compiled[i] != expected[i]), None)
            last = len(expected) - 1 if first is None else first  # the steps both paths took from the same tokens
            delta = (compiled_logits[: last + 1] - expected_logits[: last + 1]).abs().max().item()
            margin = None
            if first is not None:
                top2 = expected_logits[first].topk(2).values
                margin = (top2[0] - top2[1]).item()
            verdict = "equal" if same else ("rounding tie" if margin <= 2 * delta else "MISMATCH")
            rows.append([label, dtype_name(dtype), s["new"], "yes" if same else "NO", "-" if first is None else first,
                         "-" if margin is None else f"{margin:.3g}", f"{delta:.3g}", verdict, f"{seconds:.1f}"])
            raw.append({"model": label, "dtype": dtype_name(dtype), "equal": same, "first_difference": first,
                        "top2_margin": margin, "max_abs_diff_logits": delta, "verdict": verdict,
                        "compiled": compiled.tolist(), "generate": expected.tolist()})
    text = (
        f"Random models (hidden {s['hidden']}, {s['layers']} layers, {s['heads']} query / {s['kv_heads']} KV heads), "
        f"sdpa, a {s['prompt']}-token prompt: the prefill runs eagerly on a StaticCache, then every one-token step "
        "through `torch.compile(model.forward, fullgraph=True, dynamic=False)`; `generate()` is greedy with the "
        "default dynamic cache. Llama (transformers) is the baseline. Where the tokens differ: generate()'s top-1 − "
        "top-2 margin at the first difference and the largest |Δlogit| between the paths up to there; a margin within "
        "twice that difference is a rounding tie (two kernels, two roundings), anything else a MISMATCH.\n\n"
        + table(["model", "dtype", "new tokens", "tokens equal", "first difference", "top-2 margin there",
                 "max abs Δlogit", "verdict", "seconds (compile incl.)"], rows)
    )
    return text, {"rows": raw}


# ----------------------------------------------------------------------------------------------------------------
# (c) training step and decode at ~1B, against Llama and DiffLlama
# ----------------------------------------------------------------------------------------------------------------


SPEED_NAMES = ["llama", "diffllama", "diff-v1", "diff-v2"]


def speed_models(mode: dict, names: list[str] = SPEED_NAMES) -> dict:
    """The speed benchmark's models (default: all four) at the `speed` sizes, randomly initialised on the device in the
    timed dtype; each model's weights depend only on its name (`build_model` seeds them), not on which others are
    built."""
    s, device, dtype = mode["speed"], mode["device"], mode["dtypes"][-1]
    numbers = config_numbers(SimpleNamespace(**s), max_positions=max(s["seq_lens"]) + 2 * s["new_tokens"])
    with torch.device(device):  # built in place on the GPU: initialising 4 × 1B parameters on the CPU takes minutes
        return {name: build_model(name, numbers, "sdpa", dtype) for name in names}


def section_speed(mode: dict) -> tuple[str, dict]:
    """Interleaved training-step and decode times of the speed benchmark's four models at the `speed` sizes."""
    s, device, dtype = mode["speed"], mode["device"], mode["dtypes"][-1]
    names, models = SPEED_NAMES, speed_models(mode)
    params = {name: parameter_count(model) for name, model in models.items()}
    ids = {t: random_ids(s["vocab"], t, seed=t).to(device) for t in s["seq_lens"]}

    def decode_per_token(model, prompt):
        # decode_seconds times its loop without draining the GPU queue: time the whole call on the device
        # clock, with and without the new tokens, and keep the difference (the prefill cancels)
        with_tokens = device_seconds(lambda: decode_seconds(model, prompt, s["new_tokens"]), device)
        prefill_only = device_seconds(lambda: decode_seconds(model, prompt, 0), device)
        return (with_tokens - prefill_only) / s["new_tokens"]

    measures = {}
    for t in s["seq_lens"]:
        measures[f"train_{t}"] = lambda m, t=t: device_seconds(lambda: train_step_seconds(m, ids[t]), device)
        measures[f"decode_{t}"] = lambda m, t=t: decode_per_token(m, ids[t])
    raw = time_interleaved(models, list(measures.items()), s["repeats"])  # repetition 0 is the warm-up
    times = {key: {name: raw[name][key] for name in names} for key in measures}
    del models
    median = {key: {name: statistics.median(v) for name, v in per.items()} for key, per in times.items()}
    rows = [["parameters"] + [f"{params[n] / 1e6:.1f} M" for n in names]]
    for key in measures:
        kind, t = key.split("_")
        m = median[key]
        if kind == "train":
            rows.append([f"training step fwd+bwd, T={t}"]
                        + [f"{m[n] / m['llama']:.3f}× · {m[n] * 1e3:.1f} ms" for n in names])
        else:
            rows.append([f"decode tok/s after a {t}-token prompt"]
                        + [f"{m['llama'] / m[n]:.3f}× · {1 / m[n]:.1f} tok/s" for n in names])
    text = (
        f"The speed benchmark's models (same config numbers: hidden {s['hidden']}, {s['layers']} layers, "
        f"{s['heads']} query / {s['kv_heads']} KV heads, MLP {s['intermediate']}, vocab {s['vocab']}, untied), "
        f"{dtype_name(dtype)}, sdpa, batch 1, on {device}. Median of {s['repeats']} after a warm-up, models "
        f"interleaved. Decode: {s['new_tokens']} greedy one-token forwards on the DynamicCache after a T-token prompt "
        "(the prefill is subtracted). Each cell: ratio to Llama (for tok/s higher is better) · absolute.\n\n"
        + table(["measure", "Llama", "DiffLlama", "Diff V1", "Diff V2"], rows)
    )
    return text, {"seconds": times, "median": median, "params": params}


# ----------------------------------------------------------------------------------------------------------------
# (d) V1's attention core: the padded one-call layout against kernels with their own V width
# ----------------------------------------------------------------------------------------------------------------


def core_flex_two_calls(q, key, value, lam, causal, block_masks=None):
    """FlexAttention with its own V width: (q1, k1, v) and (q2, k2, v), q/k of width d and v of width 2d, then
    a1 − λ·a2. Output (B, T, H/2, 2d) like the schemes of attention_kernels.py."""
    dim, groups = q.shape[-1], key.shape[1]
    q1, q2 = split_query(q, groups)  # (B, G, P, T, d)
    batch, _, per_group, length, _ = q1.shape
    mask = causal_block_mask(length, key.shape[-2], str(q.device)) if causal else None

    def call(query, k):
        query = query.reshape(batch, groups * per_group, length, dim)
        return compiled_flex()(query, k, value, block_mask=mask, enable_gqa=True, scale=dim**-0.5)

    out = torch.addcmul(call(q1, key[..., :dim]), lam, call(q2, key[..., dim:]), value=-1)
    out = out.view(batch, groups, per_group, length, 2 * dim)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, length, groups * per_group, 2 * dim)


@functools.lru_cache(maxsize=None)
def causal_block_mask(length: int, source: int, device: str):
    """FlexAttention's causal block mask for `length` queries at the end of `source` keys, built once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = source - length
    return create_block_mask(lambda b, h, qi, ki: qi + offset >= ki, None, None, length, source, device=device)


_FLEX = {}


def compiled_flex():
    """flex_attention compiled once (uncompiled it runs a slow reference path)."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def forced_sdpa(backend_name: str, device: str):
    """core_two_calls with the SDPA backend forced; on CPU (dry run) the math backend stands in for CUDA's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name) if device == "cuda" else SDPBackend.MATH

    def core(q, key, value, lam, causal):
        with sdpa_kernel(backend):
            try:
                return core_two_calls(q, key, value, lam, causal)
            except RuntimeError:  # this kernel refuses GQA: one K/V head per differential head (the same function)
                REPEATED_KV.add(backend_name)
                per_group = q.shape[2] // (2 * key.shape[1])
                key, value = key.repeat_interleave(per_group, 1), value.repeat_interleave(per_group, 1)
                return core_two_calls(q, key, value, lam, causal)

    return core


REPEATED_KV = set()  # forced SDPA backends that needed K/V repeated per head (noted under the table)


def section_kernels(mode: dict) -> tuple[str, dict]:
    """Equality to the padded layout and device times of each V1 core scheme (forward+backward, one decode step)."""
    s, device, dtype = mode["kernels"], mode["device"], mode["dtypes"][-1]
    dry = "" if device == "cuda" else " (dry run: math backend)"
    schemes = {
        "llama": ("Llama core: 1 sdpa call, q/k/v width d (baseline)", core_llama),
        "padded": ("V1 padded: q zero-padded to 2d, key k1‖k2, 1 sdpa call (the model)", core_padded),
        "mem-efficient": ("V1 2 calls, q/k width d, v width 2d, SDPA memory-efficient" + dry,
                          forced_sdpa("EFFICIENT_ATTENTION", device)),
        "cudnn": ("V1 2 calls, q/k width d, v width 2d, SDPA cuDNN" + dry, forced_sdpa("CUDNN_ATTENTION", device)),
        "flex": ("V1 2 calls, q/k width d, v width 2d, FlexAttention (compiled)", core_flex_two_calls),
    }
    args = SimpleNamespace(heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["head_dim"])

    def inputs(name, length, source, grad):
        q, key, value, lam = make_inputs(name, length, source, args, requires_grad=False)
        return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, key, value, lam)]

    # equality: every V1 scheme against the padded layout (same dtype) and the float32 materialised maps
    checks, errors = {}, {}
    for name in list(schemes)[2:]:
        worst_padded = worst_maps = 0.0
        try:
            for length, source, causal in ((s["check_len"], s["check_len"], True), (1, s["check_len"], False)):
                x = inputs(name, length, source, False)
                with torch.no_grad():
                    out = schemes[name][1](*x, causal=causal).float()
                    padded = core_padded(*x, causal=causal).float()
                    maps = core_maps(*[t.float() for t in x], causal=causal)
                worst_padded = max(worst_padded, (out - padded).abs().max().item())
                worst_maps = max(worst_maps, (out - maps).abs().max().item())
            checks[name] = (worst_padded, worst_maps)
        except Exception as err:
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"

    measures = [(f"train_{t}", t, t, True) for t in s["seq_lens"]]
    measures += [(f"decode_{c}", 1, c, False) for c in s["cache_lens"]]
    times = {key: {name: [] for name in schemes} for key, *_ in measures}
    for key, length, source, training in measures:
        prepared = {name: inputs(name, length, source, training) for name in schemes}
        failed = set(errors)  # a scheme that failed its equality check, or this measure, is not timed further
        for repetition in range(s["repeats"] + 1):  # 0 is the warm-up (and the compilation of flex)
            for name in [n for n in (schemes if repetition % 2 == 0 else list(schemes)[::-1]) if n not in failed]:
                core, x = schemes[name][1], prepared[name]

                def run(core=core, x=x):
                    if training:
                        for t in x:
                            t.grad = None
                        out = core(*x, causal=True)
                        out.backward(torch.ones_like(out))
                    else:
                        with torch.no_grad():
                            for _ in range(s["decode_steps"]):
                                core(*x, causal=False)

                try:
                    seconds = device_seconds(run, device) / (1 if training else s["decode_steps"])
                except Exception as err:  # e.g. no backward for flex_attention on CPU
                    failed.add(name)
                    errors[f"{name}, {key}"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                    continue
                if repetition:
                    times[key][name].append(seconds)
        print(f"  (d) {key} done", flush=True)
    median = {key: {n: (statistics.median(v) if v else None) for n, v in per.items()} for key, per in times.items()}

    def cell(key, name):
        value, base = median[key][name], median[key]["llama"]
        if value is None:
            return "failed"
        return f"{value / base:.2f}× · {value * 1e3:.3f} ms" if base else f"{value * 1e3:.3f} ms"

    header = ["scheme"] + [f"fwd+bwd T={t}" for t in s["seq_lens"]] + [f"decode step S={c}" for c in s["cache_lens"]]
    header += ["max abs Δ to padded", "max abs Δ to fp32 maps"]
    rows = []
    for name, (label, _) in schemes.items():
        check = checks.get(name)
        rows.append([label] + [cell(key, name) for key, *_ in measures]
                    + ([f"{check[0]:.3g}", f"{check[1]:.3g}"] if check else ["-", "-"]))
    text = (
        f"{s['heads']} query heads, {s['kv_heads']} KV heads (Llama's counting), head_dim {s['head_dim']}, batch 1, "
        f"{dtype_name(dtype)}, on {device}; times are {'CUDA events' if device == 'cuda' else 'wall clock'}, median "
        f"of {s['repeats']} after a warm-up, schemes interleaved; a decode step is one query token per head against "
        f"a cache of S tokens (mean of {s['decode_steps']}). Each cell: ratio to Llama's core · time. Equality is "
        f"checked on a {s['check_len']}-token causal problem and a decode step, against the padded layout in the "
        "same dtype and against materialised maps in float32.\n\n" + table(header, rows)
        + ("\n\nFailures: " + "; ".join(f"{n}: {e}" for n, e in errors.items()) if errors else "")
        + ("\n\nK/V repeated per head (the kernel refused GQA): " + ", ".join(sorted(REPEATED_KV))
           if REPEATED_KV else "")
    )
    return text, {"seconds": times, "median": median, "checks": checks, "errors": errors,
                  "repeated_kv": sorted(REPEATED_KV)}


# ----------------------------------------------------------------------------------------------------------------
# (e) decode through generate()'s own compilation (static cache), at ~1B
# ----------------------------------------------------------------------------------------------------------------


def compiled_decode_worker(mode: dict, name: str) -> dict:
    """One model's part of (e), in a process of its own: seconds per decoded token (one per repetition), its tokens,
    eager decoding's tokens, and whether generate() compiled. With all four compiled ~1B models in one process,
    torch's CUDA-graph trees failed ("storage data ptrs are not allocated in pool"), so each model gets a process."""
    from transformers import StaticCache

    s, device = mode["speed"], mode["device"]
    length, new = s["seq_lens"][0], s["new_tokens"]
    model = speed_models(mode, [name])[name]
    prompt = random_ids(s["vocab"], length, seed=length).to(device)
    cache = StaticCache(config=model.config, max_cache_len=length + new + 8)
    last = {}

    @torch.inference_mode()
    def generate(tokens):
        cache.reset()  # one cache, reused: the compiled step keeps its shapes
        last["tokens"] = model.generate(prompt, cache=cache, max_new_tokens=tokens, min_new_tokens=tokens,
                                        do_sample=False, pad_token_id=0, eos_token_id=None)[0, length:].tolist()

    seconds = []
    for repetition in range(s["repeats"] + 1):  # 0 is the warm-up, which compiles
        prefill_only = device_seconds(lambda: generate(1), device)
        with_tokens = device_seconds(lambda: generate(new + 1), device)
        if repetition:
            seconds.append((with_tokens - prefill_only) / new)
    with torch.inference_mode():  # eager decoding on the default dynamic cache
        eager = model.generate(prompt, max_new_tokens=new + 1, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, length:].tolist()
    compiled = model._valid_auto_compile_criteria({"cache": cache}, model.generation_config)
    return {"seconds": seconds, "tokens": last["tokens"], "eager_tokens": eager, "compiled": compiled}


def section_compiled_decode(mode: dict) -> tuple[str, dict]:
    """Decode tok/s of `generate()` on a StaticCache (which generate() compiles on a GPU) for the four models.

    Batch-1 decoding at this size is bound by the launches of small kernels, so eager tok/s ratios mostly count
    operators; the compiled step (CUDA graphs) removes that cost, and this is the fast path a user would take.
    Each model runs in its own process (`compiled_decode_worker`), one after the other.
    """
    s = mode["speed"]
    length, new = s["seq_lens"][0], s["new_tokens"]
    results, errors = {}, {}
    for name in SPEED_NAMES:
        argv = [sys.executable, "-m", "benchmarks.gpu.gpu_check", "--compiled-decode-worker", name]
        if mode["device"] == "cpu":
            argv.append("--cpu-dry-run")
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if done.returncode == 0:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            errors[name] = lines[-1][:300]
        print(f"  (e) {name} {'done' if name in results else 'failed'}", flush=True)
    median = {name: statistics.median(r["seconds"]) for name, r in results.items()}

    def speed_cell(name):
        if name not in median:
            return "failed"
        ratio = f"{median['llama'] / median[name]:.3f}× · " if "llama" in median else ""
        return f"{ratio}{1 / median[name]:.1f} tok/s"

    def agreement(name):
        if name not in results:
            return "failed"
        compiled, eager = results[name]["tokens"], results[name]["eager_tokens"]
        return f"{next((i for i in range(new + 1) if compiled[i] != eager[i]), new + 1)} of {new + 1}"

    rows = [[f"decode tok/s after a {length}-token prompt"] + [speed_cell(n) for n in SPEED_NAMES],
            ["leading tokens equal to eager DynamicCache decoding"] + [agreement(n) for n in SPEED_NAMES]]
    compiled = any(r["compiled"] for r in results.values())
    text = (
        f"The models of (c), {dtype_name(mode['dtypes'][-1])}, batch 1, each in its own process: "
        f"`generate(prompt, cache=StaticCache(...))`, greedy, {new} new tokens after a {length}-token prompt, minus "
        f"the same call with 1 new token (the prefill); generate() "
        f"{'compiles' if compiled else 'does NOT compile (no GPU)'} its decoding step on this device. Median of "
        f"{s['repeats']} after a warm-up that compiles. Each cell: ratio to Llama · absolute. The last row compares "
        "the tokens with eager decoding on the default cache (bf16 ties can part them).\n\n"
        + table(["measure", "Llama", "DiffLlama", "Diff V1", "Diff V2"], rows)
        + ("\n\nFailures: " + "; ".join(f"{n}: {e}" for n, e in errors.items()) if errors else "")
    )
    return text, {"results": results, "median": median, "errors": errors}


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

SECTIONS = {
    "correctness": ("(a) Correctness against the plain-torch reference", section_correctness),
    "compile": ("(b) Compiled static-cache decode equals generate()", section_compile),
    "speed": ("(c) Training step and decode at ~1B parameters", section_speed),
    "kernels": ("(d) V1's attention core: the padded layout against kernels with their own V width", section_kernels),
    "compiled": ("(e) Decode through generate()'s compiled static-cache step at ~1B", section_compiled_decode),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="for testing the script without a GPU: run every section with tiny sizes on CPU in "
                        "float32 (CUDA-only kernels skipped or replaced) and write the same markdown")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="which sections to run (default: all)")
    parser.add_argument("--compiled-decode-worker", metavar="MODEL", choices=SPEED_NAMES,
                        help=argparse.SUPPRESS)  # internal: section (e) runs each model in a process of its own
    add_run_arguments(parser, "gpu_check", "gpu_check.md")
    args = parse_with_argv(parser, argv)
    return args


def write_report(args, info: dict, parts: list[str], results: dict, seconds: float, done: int) -> str:
    """Write the markdown (header + the sections run so far) and the JSON; return the markdown."""
    dry = " (CPU dry run: tiny sizes, float32, the numbers mean nothing)" if args.cpu_dry_run else ""
    lines = header(f"GPU check{dry}", command("benchmarks.gpu.gpu_check", args.argv), info,
                   f"{done} of {len(args.sections)} sections in {seconds:.0f} s; CUDA {info['cuda']}")
    text = "\n".join(lines) + "\n" + "\n".join(parts)
    results["seconds"] = seconds
    write_text(args.out, text)
    write_text(args.out.with_suffix(".json"), json.dumps(results, indent=1, default=str))
    return text


def main(argv=None) -> int:
    """Run the sections, each guarded; write the markdown and JSON; return the exit status (0)."""
    args = parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("CUDA is not available: the GPU check was not run (use --cpu-dry-run to test the script on CPU).")
        return 0
    mode = SIZES["cpu-dry-run" if args.cpu_dry_run else "gpu"]
    if args.cpu_dry_run:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    if args.compiled_decode_worker:  # one model of section (e); the parent reads the last line
        print(json.dumps(compiled_decode_worker(mode, args.compiled_decode_worker)))
        return 0
    started = time.perf_counter()
    info = dict(machine_info(), cuda=torch.version.cuda)
    parts, results = [], {"machine": info, "sections": {}}
    for key in args.sections:
        title, section = SECTIONS[key]
        print(f"{title} ...", flush=True)
        section_start = time.perf_counter()
        try:
            text, raw = section(mode)
            status = "ok"
        except Exception as err:  # a failing section is recorded and the next one runs
            text = f"**FAILED** with `{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}`\n\n" \
                   f"```\n{traceback.format_exc(limit=6)}```"
            raw, status = {"error": f"{type(err).__name__}: {err}"}, "failed"
        seconds = time.perf_counter() - section_start
        print(f"{title}: {status} in {seconds:.0f} s", flush=True)
        parts.append(f"## {title}\n\n{text}\n\n_{status}, {seconds:.0f} s_\n")
        results["sections"][key] = {"status": status, "seconds": seconds, **raw}
        # written after every section, so that a run stopped by its time limit keeps what it measured
        text = write_report(args, info, parts, results, time.perf_counter() - started, done=len(parts))
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.json').name} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
