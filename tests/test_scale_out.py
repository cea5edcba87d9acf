"""Scale out: tensor parallelism (tp_plan="auto"), FSDP2 training and LoRA adapters, with 2 CPU processes on gloo.

Each torchrun job is started once and checked for several things (the spawns dominate the runtime).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, tiny_tokenizer
from modeling_diff_cli.main import main
from modeling_diff_eval.corpus import python_docs_texts
from modeling_diff_training import (
    DiffTrainingArguments,
    TokenBlocks,
    add_lora_adapters,
    train_model,
)
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from modeling_diff import DiffTransformerForCausalLM

TESTS = Path(__file__).parent


def torchrun(*args, port: int) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 ARGS`: two CPU processes on gloo, one thread each."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        timeout=600,
    )


def train_args(model, output_dir, *extra, steps=4, batch=4) -> list[str]:
    """A few training steps at tiny sizes; the global batch is 4 sequences (pass batch=2 under torchrun)."""
    settings = f"--max_steps {steps} --seq_len 32 --logging_steps 1 --learning_rate 1e-2".split()
    settings += ["--per_device_train_batch_size", str(batch)]
    return ["train", str(model), "--output-dir", str(output_dir), *settings, *extra]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny V1 and V2 models with GQA and a shared tokenizer, saved as folders."""
    root = tmp_path_factory.mktemp("scale_out")
    tokenizer = tiny_tokenizer()
    for name, version, kv_heads in (("v1", 1, 4), ("v2", 2, 2)):
        torch.manual_seed(0)
        config = tiny_config(version, heads=8, kv_heads=kv_heads, vocab_size=len(tokenizer), intermediate_size=128)
        DiffTransformerForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def blocks(models):
    """Eight training blocks of 32 tokens: the batch every loss below is measured on."""
    from transformers import AutoTokenizer

    return TokenBlocks(python_docs_texts()[:40], AutoTokenizer.from_pretrained(models / "v1"), 32).blocks[:8]


def lm_loss(model, blocks) -> float:
    with torch.no_grad():
        return model(blocks, labels=blocks).loss.item()


# ----------------------------------------------------------------------------------------------- tensor parallel


def test_tp_plan_names_each_variants_modules_and_refuses_layouts_that_cannot_split():
    v1, v2 = tiny_config(1, heads=8, kv_heads=4), tiny_config(2, heads=8, kv_heads=2)
    assert v1.base_model_tp_plan["layers.*.self_attn.q_proj"] == "colwise"
    assert v1.base_model_tp_plan["layers.*.mlp.down_proj"] == "rowwise"
    assert v1.base_model_tp_plan["layers.*.self_attn.head_norm"] == "replicated_with_grad_allreduce"
    assert "layers.*.self_attn.lambda_proj" not in v1.base_model_tp_plan
    assert v2.base_model_tp_plan["layers.*.self_attn.lambda_proj"] == "colwise"
    assert "layers.*.self_attn.head_norm" not in v2.base_model_tp_plan

    v1.check_tensor_parallel(DistributedConfig(tp_size=2))  # 2 KV groups over 2 ranks
    with pytest.raises(ValueError, match=r"tp_size=4 .* 2 KV groups .* Use tp_size in \[2\]"):
        v1.check_tensor_parallel(DistributedConfig(tp_size=4))
    with pytest.raises(ValueError, match=r"tp_size=4 .* 2 KV heads .* Use tp_size in \[2\]"):
        v2.check_tensor_parallel(DistributedConfig(tp_size=4))
    v2.check_tensor_parallel(DistributedConfig(tp_size=4, tp_plan={}))  # no TP plan: nothing is split
    with pytest.raises(ValueError, match="cannot be split by heads; use tp_size=1"):
        tiny_config(2, heads=8, kv_heads=1).distributed_config = DistributedConfig(tp_size=2)


@pytest.mark.slow
def test_tensor_parallel_over_two_processes_matches_one_process(tmp_path):
    for name, version, kv_heads in (("v1", 1, 4), ("v2", 2, 2), ("v1_one_group", 1, 2)):
        torch.manual_seed(0)
        config = tiny_config(version, heads=8, kv_heads=kv_heads, tie_word_embeddings=True, vocab_size=96)
        DiffTransformerForCausalLM(config).save_pretrained(tmp_path / name)
    out = tmp_path / "tp.json"
    result = torchrun(
        str(TESTS / "scale_out_tp_worker.py"),
        *(str(tmp_path / n) for n in ("v1", "v2", "v1_one_group")),
        str(out),
        port=29531,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(out.read_text())
    for name in ("v1", "v2"):
        r = found[name]
        # sharded matmuls sum in another order: fp32 round-off on logits of order 1
        assert r["max_logit_diff"] < 1e-5, (name, r["max_logit_diff"])
        assert r["same_greedy_tokens"], name
        assert r["q_proj_local"] == [r["q_proj_full"][0] // 2, r["q_proj_full"][1]], name  # half of the rows
        assert r["down_proj_local"] == [r["down_proj_full"][0], r["down_proj_full"][1] // 2], name  # half the columns
        # the tied embedding and head are one parameter, vocab-sharded once
        assert r["head_is_embedding"] and r["embedding_placements"] == ["S(0)"], name
        assert r["embedding_local"] == [r["embedding_full"][0] // 2, r["embedding_full"][1]], name
        # gradients, the λ parameters' included (replicated, their partial gradients summed over ranks)
        assert any("lambda" in n for n in r["grad_diff"]), name
        for param, diff in r["grad_diff"].items():
            assert diff <= 1e-4 * r["grad_scale"][param] + 1e-9, (name, param, diff)
    assert "tp_size=2" in found["unsplittable_error"] and "1 KV groups" in found["unsplittable_error"]


# ----------------------------------------------------------------------------------------------------------- FSDP


@pytest.mark.slow
def test_fsdp_training_matches_one_process_and_saves_a_plain_model(models, blocks, tmp_path):
    result = torchrun(
        "-m",
        "modeling_diff_cli.main",
        *train_args(models / "v1", tmp_path / "fsdp", "--fsdp", batch=2),
        port=29532,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    held, total = (
        int(n.replace(",", ""))
        for n in re.search(r"rank 0 held ([\d,]+) of the model's ([\d,]+)", result.stdout).groups()
    )
    assert held < 0.6 * total  # really sharded: each rank keeps about half of the weights
    assert main(train_args(models / "v1", tmp_path / "one")) == 0  # same global batch

    fsdp = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")  # one process, no distributed config
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    base = AutoModelForCausalLM.from_pretrained(models / "v1")
    assert type(fsdp) is DiffTransformerForCausalLM
    # the FSDP unit is the decoder layer, the model's _no_split_modules
    assert base.fsdp_plan["model.layers.*"] == "free_full_weight"
    assert set(base._no_split_modules) == {type(base.model.layers[0]).__name__}
    assert "modeling_diff_transformer.DiffTransformerForCausalLM" in (tmp_path / "fsdp" / "config.json").read_text()
    moved = max((p - q).abs().max().item() for p, q in zip(one.parameters(), base.parameters()))
    apart = max((p - q).abs().max().item() for p, q in zip(one.parameters(), fsdp.parameters()))
    # Same data, same global batch: the runs differ only in fp32 summation order (two half-batch gradients
    # reduce-scattered vs one batch). Those ~1e-7 relative differences pass through Adam's normalised step and stay
    # far below what training moved the weights (on the 2-core CPU machine: apart 7.6e-7, moved 2.0e-2, a ratio of
    # 4e-5); 1e-3 of the movement leaves room for other reduction orders (other machines, thread counts).
    assert apart < 1e-3 * moved, (apart, moved)
    assert abs(lm_loss(fsdp, blocks) - lm_loss(one, blocks)) < 1e-4
    assert lm_loss(one, blocks) < lm_loss(base, blocks)


# ----------------------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_lora_adapter_reloads_with_its_lambda_parameters(models, blocks, tmp_path, version):
    """The λ modules (V1's head_norm, V2's lambda_proj) train in full through PEFT's modules_to_save, and PEFT's own
    save_pretrained / AutoPeftModelForCausalLM keep them."""
    base = AutoModelForCausalLM.from_pretrained(models / version)
    lambdas = {name: param.detach().clone() for name, param in base.named_parameters() if ".lambda_" in name}
    tokenizer = tiny_tokenizer()
    model = add_lora_adapters(base, r=8, alpha=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert {n.split(".modules_to_save.default.")[1] for n in trainable if ".modules_to_save." in n} == (
        {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "weight"} if version == "v1" else {"weight"}
    )
    args = DiffTrainingArguments(
        output_dir=str(tmp_path), max_steps=6, learning_rate=1e-2, per_device_train_batch_size=4, save_strategy="no",
        disable_tqdm=True,
    )
    train_model(model, tokenizer, python_docs_texts()[:40], args, seq_len=32)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")

    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(model(blocks).logits, reloaded(blocks).logits)
    merged = reloaded.merge_and_unload()
    for name, before in lambdas.items():
        after = merged.get_parameter(name)
        assert (after - before).abs().max() > 1e-4, name  # trained, and restored from the adapter file
    assert any(".lambda_" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_lora_cli_lowers_the_loss_merges_and_runs_under_torchrun(models, blocks, tmp_path):
    lora = ["--lora", "--lora-r", "8", "--lora-alpha", "16"]
    assert main(train_args(models / "v1", tmp_path / "adapter", *lora, steps=12)) == 0
    assert (
        main(train_args(models / "v1", tmp_path / "merged", *lora, "--merge-lora", steps=12)) == 0
    )
    ddp = torchrun(
        "-m",
        "modeling_diff_cli.main",
        *train_args(models / "v1", tmp_path / "ddp", *lora, steps=12, batch=2),
        port=29533,
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((models / "v1").resolve())
    assert sorted(config["target_modules"]) == sorted(
        "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split()
    )
    base = AutoModelForCausalLM.from_pretrained(models / "v1")
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert lm_loss(adapter, blocks) < lm_loss(base, blocks) - 0.01
    with torch.no_grad():
        # the same deterministic run; merging W + (alpha/r)·B·A rounds once per weight
        torch.testing.assert_close(merged(blocks).logits, adapter(blocks).logits, atol=1e-5, rtol=1e-5)
        # 2 processes x 2 sequences = the same global batch: fp32 reduction order only (see the FSDP test)
        ddp_adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ddp")
        torch.testing.assert_close(ddp_adapter(blocks).logits, adapter(blocks).logits, atol=1e-4, rtol=1e-4)
    merged_lambda, base_lambda = (m.model.layers[0].self_attn.head_norm.lambda_q1 for m in (merged, base))
    assert (merged_lambda - base_lambda).abs().max() > 1e-4

    # without this package: the base folder carries the model code, so trust_remote_code=True suffices
    torch.save(blocks, tmp_path / "blocks.pt")
    subprocess.run(
        [sys.executable, "-c", LOAD_ADAPTER_WITHOUT_PACKAGE, str(tmp_path / "adapter"), str(tmp_path)],
        check=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), adapter(blocks).logits, atol=0, rtol=0)


LOAD_ADAPTER_WITHOUT_PACKAGE = """
import sys, torch
sys.modules["modeling_diff"] = None
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2] + "/blocks.pt")).logits, sys.argv[2] + "/logits.pt")
"""


@pytest.mark.slow
def test_scale_out_flags_fail_cleanly(models, tmp_path, capsys):
    for extra, message in (
        (["--merge-lora"], "error: --merge-lora, --lora-r and --lora-alpha need --lora"),
        (["--fsdp"], "error: --fsdp shards the model over several processes: run under torchrun --nproc_per_node"),
        (["--lora", "--fsdp"], "error: --lora with --fsdp is not supported"),
        (["--lora", "--lora-r", "0"], "error: lora_r must be a finite number at least 1, got 0"),
    ):
        assert main(train_args(models / "v1", tmp_path / "out", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_lora_without_peft_is_refused_before_the_model_loads(models, tmp_path, capsys, monkeypatch):
    """Where PEFT is not installed (the package's plain install), --lora says which extra to install, before work."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    monkeypatch.setattr("modeling_diff_training.run.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(train_args(models / "v1", tmp_path / "out", "--lora")) == 2
    assert capsys.readouterr().err.strip() == "error: --lora needs PEFT: pip install 'modeling-diff[lora]'"
    assert not any(tmp_path.iterdir())
