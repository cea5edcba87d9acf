"""The model inside the engines users already have: the Trainer's optimizer grouping, PEFT, TRL."""

import math

import pytest
import torch
from helpers import tiny_config, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from modeling_diff import DiffTransformerForCausalLM


def weight_decay_by_parameter(model, tmp_path) -> dict[str, float]:
    """name -> the weight decay of its group in the optimizer the Trainer builds by default."""
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, report_to=[], use_cpu=True)
    optimizer = Trainer(model=model, args=args).create_optimizer()
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    return {name: decay_of[id(p)] for name, p in model.named_parameters()}


@pytest.mark.parametrize("version", [1, 2])
def test_trainer_exempts_norm_gains_and_lambda_vectors_from_weight_decay(version, tmp_path):
    model = DiffTransformerForCausalLM(tiny_config(version))
    decay = weight_decay_by_parameter(model, tmp_path)
    # every vector (norm gains, V1's λ vectors and head-norm gain) is exempt; every matrix decays,
    # V2's lambda_proj included (an ordinary linear projection of the hidden state)
    for name, param in model.named_parameters():
        assert decay[name] == (0.0 if param.dim() == 1 else 0.1), name
    attn = "model.layers.1.self_attn."
    if version == 1:
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "weight"):
            assert decay[attn + "head_norm." + name] == 0.0
    else:
        assert decay[attn + "lambda_proj.weight"] == 0.1
    assert decay["model.layers.1.input_layernorm.weight"] == decay["model.norm.weight"] == 0.0


def test_llama_grouping_is_the_same_rule(tmp_path):
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
    )
    decay = weight_decay_by_parameter(llama, tmp_path)
    for name, param in llama.named_parameters():
        assert decay[name] == (0.0 if param.dim() == 1 else 0.1), name


def test_checkpoints_keep_the_papers_parameter_names(tmp_path):
    model = DiffTransformerForCausalLM(tiny_config(1))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    attn = "model.layers.0.self_attn."
    assert {attn + n for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "subln.weight")} <= saved.keys()
    assert not any("head_norm" in key for key in saved)
    loaded = DiffTransformerForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_trainer_evaluation_hands_metrics_the_logits_without_the_cache(tmp_path):
    model = DiffTransformerForCausalLM(tiny_config(1)).eval()
    ids = torch.randint(3, 97, (4, 10))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    # use_cache=True: the model returns its cache beside the logits, and the config names the key to drop
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, use_cache=True, report_to=[], use_cpu=True
    )
    # the documented way to keep only what the metrics need; it receives the model's outputs minus the ignored keys
    trainer = Trainer(model=model, args=args, preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))
    predictions = trainer.predict(dataset).predictions
    with torch.no_grad():
        expected = model(ids).logits.argmax(-1)
    assert torch.equal(torch.from_numpy(predictions), expected)


# ------------------------------------------------------------------------------------------------------------- PEFT


def adapted_modules(model) -> set[str]:
    return {name.removesuffix(".base_layer") for name, _ in model.named_modules() if name.endswith(".base_layer")}


@pytest.mark.parametrize("version", [1, 2])
def test_lora_config_without_target_modules_adapts_what_it_adapts_in_llama(version):
    from peft import LoraConfig, get_peft_model

    config = tiny_config(version)
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=4)
    )  # fmt: skip
    ours = get_peft_model(DiffTransformerForCausalLM(config), LoraConfig(task_type="CAUSAL_LM"))
    theirs = get_peft_model(llama, LoraConfig(task_type="CAUSAL_LM"))
    assert adapted_modules(ours) == adapted_modules(theirs) != set()
    ids = torch.randint(3, 97, (2, 9))
    assert torch.isfinite(ours(ids, labels=ids).loss)


def perturbed_lora(model, **lora_config):
    """LoRA with its B matrices moved off zero, so that the adapter changes the output."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(**lora_config))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return lora.eval()


@pytest.mark.parametrize("version", [1, 2])
def test_adapter_saved_without_task_type_reloads_with_the_import_allowlist(tmp_path, version):
    from peft import AutoPeftModelForCausalLM

    DiffTransformerForCausalLM(tiny_config(version)).save_pretrained(tmp_path / "base")
    lora = perturbed_lora(DiffTransformerForCausalLM.from_pretrained(tmp_path / "base"))  # a plain PeftModel
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        expected = lora(ids).logits
    # PEFT imports the base model's class from its module, only from packages on its allowlist
    with pytest.raises(ValueError, match="import_allowlist"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", import_allowlist=["modeling_diff"])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_adapter_saved_with_task_type_reloads_through_the_auto_class(tmp_path):
    from peft import AutoPeftModelForCausalLM

    DiffTransformerForCausalLM(tiny_config(1)).save_pretrained(tmp_path / "base")
    lora = perturbed_lora(DiffTransformerForCausalLM.from_pretrained(tmp_path / "base"), task_type="CAUSAL_LM")
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 97, (2, 9))
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lora(ids).logits)



@pytest.mark.parametrize("version", [1, 2])
def test_lora_trains_and_saves_the_lambda_modules_through_modules_to_save(tmp_path, version):
    """V1's λ vectors live in `head_norm`, V2's in `lambda_proj`: PEFT's own `modules_to_save` keeps them."""
    from peft import AutoPeftModelForCausalLM

    DiffTransformerForCausalLM(tiny_config(version)).save_pretrained(tmp_path / "base")
    base = DiffTransformerForCausalLM.from_pretrained(tmp_path / "base")
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # as docs/scale-out.md
    lora = perturbed_lora(
        base, task_type="CAUSAL_LM", target_modules=projections, modules_to_save=["head_norm", "lambda_proj"]
    )
    lambdas = [(n, p) for n, p in lora.named_parameters() if "modules_to_save" in n]
    assert lambdas and all(p.requires_grad for _, p in lambdas)
    assert {n.split("modules_to_save.default.")[1] for n, _ in lambdas} == (
        {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "weight"} if version == 1 else {"weight"}
    )
    with torch.no_grad():
        for _, param in lambdas:
            param.add_(0.1)
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 97, (2, 9))
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lora(ids).logits)

# -------------------------------------------------------------------------------------------------------------- TRL


def trl_data():
    from datasets import Dataset

    texts = ["def add(a, b):\n    return a + b", "for i in range(3):\n    print(i)", "x = [1, 2, 3]", "import os"]
    sft = Dataset.from_dict({"text": texts})
    dpo = Dataset.from_dict(
        {"prompt": ["def f(", "x = ", "import ", "for i"], "chosen": ["a):", "1", "os", " in y:"],
         "rejected": ["!!", "??", "]]", "))"]}
    )  # fmt: skip
    return sft, dpo


def assert_saved_model_reloads(model, folder):
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.cpu()), name


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_trl_sft_and_dpo_steps(tmp_path, version):
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer()
    sft_data, dpo_data = trl_data()
    common = dict(max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True, save_strategy="no")

    model = DiffTransformerForCausalLM(tiny_config(version, vocab_size=len(tokenizer)))
    sft = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "sft"), max_length=32, **common),
                     train_dataset=sft_data, processing_class=tokenizer)  # fmt: skip
    assert math.isfinite(sft.train().training_loss)
    sft.save_model(str(tmp_path / "sft"))
    assert_saved_model_reloads(sft.model, tmp_path / "sft")

    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tmp_path / "sft"),
                     args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=32, **common),
                     train_dataset=dpo_data, processing_class=tokenizer)  # fmt: skip
    assert math.isfinite(dpo.train().training_loss)
    dpo.save_model(str(tmp_path / "dpo"))
    assert_saved_model_reloads(dpo.model, tmp_path / "dpo")
