"""Motif-2.6B -> DiffTransformer V1: the reference is Motif's maths, the import is exact on every layout, the result
saves, reloads without the package, fine-tunes, and goes through the CLI; what is not Motif-2.6B is refused."""

import json
import math
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import add_to_hub_cache, run_without_the_package, tiny_tokenizer, tree_hash
from modeling_diff_cli.main import main
from modeling_diff_conversion import ConversionError, convert
from modeling_diff_conversion.loading import load_model
from modeling_diff_conversion.motif import TensorReader
from modeling_diff_conversion.motif_reference import attention, causal_lm_logits, lambda_init, poly_norm
from safetensors.torch import load_file, save_file
from tokenizers import decoders

from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM
from modeling_diff.modeling_diff_transformer import DiffTransformerPolyNorm

LLAMA3_ROPE = {
    "type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
LAYOUTS = {  # name: (query heads, KV heads, tied, extra config.json keys)
    "mha": (8, 8, False, {}),
    # Motif's fork spells a 1:1 layout as a grouped one (num_noise_heads = heads / 2): the same function
    "gqa-tied": (8, 4, True, {"num_noise_heads": 4, "k_ratio": 1}),
    "gqa4-llama3-bias": (8, 2, False, {"rope_scaling": LLAMA3_ROPE, "use_bias": True}),
    "linear-rope-head-dim": (4, 2, True, {"rope_scaling": {"type": "linear", "factor": 2.0}, "head_dim": 24}),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def save_motif(folder: Path, heads=8, kv=4, tied=False, vocab=120, seed=0, tokenizer=None, dtype=torch.float32,
               bin_file=False, **keys) -> dict:
    """A random checkpoint in Motif-2.6B's format: its tensor names, its config.json keys (MotifForCausalLM, counting
    head_dim-wide sub-heads), float32 λ vectors whatever `dtype` the rest has. q and k are scaled so that the maps
    are peaked and a pairing mistake shows; λ, the head-norm gains and PolyNorm's weights are far from their initial
    values."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter, layers = 64, 96, 2
    d = keys.get("head_dim") or hidden // heads
    use_bias = keys.get("use_bias", False)

    def rand(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden, std=1.0), "model.norm.weight": 1 + rand(hidden)}
    if not tied:
        tensors["lm_head.weight"] = rand(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": 1 + rand(hidden),
            p + "post_attention_layernorm.weight": 1 + rand(hidden),
            p + "self_attn.q_proj.weight": rand(heads * d, hidden, std=0.5),
            p + "self_attn.k_proj.weight": rand(kv * d, hidden, std=0.5),
            p + "self_attn.v_proj.weight": rand(kv * d, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * d),
            p + "self_attn.subln.weight": 1 + rand(2 * d, std=0.3),
            p + "mlp.gate_proj.weight": rand(inter, hidden, std=0.3),
            p + "mlp.up_proj.weight": rand(inter, hidden, std=0.3),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "mlp.act_fn.weight": torch.tensor([0.5, -0.3, 0.9]) + rand(3),
            p + "mlp.act_fn.bias": rand(1, std=0.2),
            **{p + f"self_attn.lambda_{n}": rand(d, std=0.3) for n in ("q1", "k1", "q2", "k2")},
        }
        if use_bias:
            for name, size in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d), ("o_proj", hidden)):
                tensors[p + f"self_attn.{name}.bias"] = rand(size)
            for name, size in (("gate_proj", inter), ("up_proj", inter), ("down_proj", hidden)):
                tensors[p + f"mlp.{name}.bias"] = rand(size)
    tensors = {name: t if "lambda_" in name else t.to(dtype) for name, t in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    if bin_file:
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["MotifForCausalLM"],
        "model_type": "Motif",
        "auto_map": {"AutoConfig": "configuration_motif.MotifConfig", "AutoModelForCausalLM": "modeling_motif.Motif"},
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "hidden_act": "poly_norm",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "attn_rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "use_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **keys,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return config


def reference_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    config = json.loads((folder / "config.json").read_text())
    # vocabulary chunks of 48 rows: the LM head is read in slices, the last one short
    return causal_lm_logits(config, TensorReader([folder / "model.safetensors"], torch.float32), ids, vocab_chunk=48)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------------------------------
# The reference is Motif's maths: each unusual part against a small case computed by hand


def test_reference_poly_norm_against_a_hand_computed_case():
    # x = (2, 0): mean(x⁶) = 32, mean(x⁴) = 8, mean(x²) = 2, so every normalised power of the first entry is √2
    x = torch.tensor([2.0, 0.0], dtype=torch.float64)
    weight, bias = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    eps = 1e-6
    first = 1 * 8 / math.sqrt(32 + eps) + 2 * 4 / math.sqrt(8 + eps) + 3 * 2 / math.sqrt(2 + eps) + 0.5
    expected = torch.tensor([first, 0.5], dtype=torch.float64)
    assert abs(first - (6 * math.sqrt(2) + 0.5)) < 1e-5
    torch.testing.assert_close(poly_norm(x, weight, bias), expected, rtol=0, atol=1e-12)
    # the model's activation computes the same (in float32), and a sign flip of x keeps x² and flips x and x³
    module = DiffTransformerPolyNorm()
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    torch.testing.assert_close(module(x.float()).double(), expected, rtol=0, atol=1e-6)
    flipped = -8 / math.sqrt(32 + eps) + 2 * 4 / math.sqrt(8 + eps) - 3 * 2 / math.sqrt(2 + eps) + 0.5
    expected = torch.tensor([flipped, 0.5], dtype=torch.float64)
    torch.testing.assert_close(poly_norm(-x, weight, bias), expected, rtol=0, atol=1e-12)


def test_reference_lambda_init_is_shifted_by_one_layer():
    assert lambda_init(0) == pytest.approx(0.8 - 0.6 * math.exp(0.3)) == pytest.approx(-0.0099152845, abs=1e-9)
    assert lambda_init(1) == pytest.approx(0.2)  # where the paper's schedule has layer 0
    assert lambda_init(5) == pytest.approx(0.8 - 0.6 * math.exp(-1.2))
    motif = DiffTransformerConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                  lambda_init_layer_offset=1)
    paper = DiffTransformerConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=32)
    assert [motif.lambda_init_for_layer(i) for i in range(6)] == pytest.approx([lambda_init(i) for i in range(6)])
    assert paper.lambda_init_for_layer(0) == pytest.approx(0.2)  # existing checkpoints keep the paper's schedule


def test_reference_head_norm_gain_and_lambda_against_a_hand_computed_case():
    """One token, one differential head: both maps are 1, so the head is subln((1 - λ)·v)·(1 - λ_init)."""
    config = {"num_attention_heads": 2, "num_key_value_heads": 2, "hidden_size": 4, "attn_rms_norm_eps": 1e-5}
    eye = torch.eye(4, dtype=torch.float64)
    tensors = {
        "q_proj.weight": torch.randn(4, 4, dtype=torch.float64),
        "k_proj.weight": torch.randn(4, 4, dtype=torch.float64),
        "v_proj.weight": eye,  # v_0 = x[:2], v_1 = x[2:]: the group's value is x
        "o_proj.weight": eye,
        "lambda_q1": torch.tensor([1.0, 0.0], dtype=torch.float64),
        "lambda_k1": torch.tensor([0.5, 3.0], dtype=torch.float64),  # λq1·λk1 = 0.5
        "lambda_q2": torch.tensor([0.0, 2.0], dtype=torch.float64),
        "lambda_k2": torch.tensor([7.0, 0.1], dtype=torch.float64),  # λq2·λk2 = 0.2
        "subln.weight": torch.tensor([2.0, 1.0, 0.5, 3.0], dtype=torch.float64),
    }

    def weights(name, missing_ok=False, rows=None):
        return tensors.get(name) if missing_ok else tensors[name]

    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]], dtype=torch.float64)
    for layer in (0, 3):
        init = 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))
        lam = math.exp(0.5) - math.exp(0.2) + init
        diff = [(1 - lam) * v for v in (3.0, 4.0, 0.0, 0.0)]
        rms = math.sqrt(sum(v * v for v in diff) / 4 + 1e-5)
        expected = [g * v / rms * (1 - init) for g, v in zip((2.0, 1.0, 0.5, 3.0), diff)]
        out = attention(config, weights, "", layer, x)
        torch.testing.assert_close(out[0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# The import


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_import_is_exact(tmp_path, layout):
    heads, kv, tied, keys = LAYOUTS[layout]
    save_motif(tmp_path / "motif", heads, kv, tied, **keys)
    report = convert(str(tmp_path / "motif"), str(tmp_path / "out"), progress=False)
    v = report.verification
    assert report.variant == "v1" and report.architecture == "MotifForCausalLM" and report.preserves_function
    assert v.passed and v.greedy_identical and v.greedy_agreement == 1.0 and v.dtype == "float32"

    model = DiffTransformerForCausalLM.from_pretrained(tmp_path / "out").eval()
    config = model.config
    assert (config.diff_version, config.num_attention_heads, config.num_key_value_heads) == (1, heads, kv)
    assert (config.hidden_act, config.lambda_init_layer_offset, config.head_norm_eps) == ("poly_norm", 1, 1e-5)
    assert model.model.layers[0].self_attn.head_norm.variance_epsilon == 1e-5
    ids = torch.randint(0, 120, (40,), generator=torch.Generator().manual_seed(1))  # past the original 16 positions
    expected = reference_logits(tmp_path / "motif", ids)
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()
    assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()  # float32 round-off
    # each Motif-specific setting matters here: with the paper's λ_init the logits are far off
    paper = DiffTransformerForCausalLM.from_pretrained(tmp_path / "out", lambda_init_layer_offset=0).eval()
    with torch.no_grad():
        assert (paper(ids[None]).logits[0].double() - expected).abs().max() > 1e-2


def test_bfloat16_checkpoint_with_float32_lambdas_imports_exactly(tmp_path):
    """A bf16 checkpoint whose λ vectors are float32 (how the ports keep them), read from a .bin file: `auto` keeps
    every tensor's dtype, `float32` widens all, `bfloat16` rounds the λ too; each import is checked as it rounded."""
    save_motif(tmp_path / "motif", 8, 4, dtype=torch.bfloat16, bin_file=True)
    for dtype, lambda_dtype in (("auto", torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        report = convert(str(tmp_path / "motif"), str(tmp_path / dtype), dtype=dtype, progress=False)
        assert report.verification.passed and report.verification.dtype == "float32", dtype
        saved = load_file(tmp_path / dtype / "model.safetensors")
        assert saved["model.layers.1.self_attn.lambda_q1"].dtype == lambda_dtype, dtype
        config = json.loads((tmp_path / dtype / "config.json").read_text())
        assert config["dtype"] == ("float32" if dtype == "float32" else "bfloat16"), dtype


def test_imported_model_saves_reloads_without_the_package_and_fine_tunes(tmp_path):
    heads, kv, tied, keys = LAYOUTS["gqa4-llama3-bias"]
    save_motif(tmp_path / "motif", heads, kv, tied, **keys)
    convert(str(tmp_path / "motif"), str(tmp_path / "out"), progress=False)
    source = load_file(tmp_path / "motif" / "model.safetensors")
    imported = load_file(tmp_path / "out" / "model.safetensors")
    assert imported.keys() == source.keys() and all(torch.equal(imported[k], source[k]) for k in source)

    model = DiffTransformerForCausalLM.from_pretrained(tmp_path / "out").eval()
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == source.keys()  # Motif's names survive a save: act_fn, lambda_q1, subln
    ids = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    script = """
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
        print(type(model).__module__)
    """
    result = run_without_the_package(script, tmp_path / "saved", tmp_path / "ids.pt", tmp_path / "logits.pt",
                                     tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)

    # one fine-tuning step: every parameter (PolyNorm's and the biases included) gets a gradient, and the loss drops
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(ids, labels=ids).loss
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == []
    assert "model.layers.0.mlp.act_fn.weight" in dict(model.named_parameters())
    optimizer.step()
    with torch.no_grad():
        assert model(ids, labels=ids).loss < loss


def test_refusals_say_why_and_leave_nothing_behind(tmp_path):
    cases = {
        "grouped": ({"num_attention_heads": 10, "num_noise_heads": 2}, "grouped differential attention"),
        "k-ratio": ({"k_ratio": 2}, "grouped differential attention"),
        "moe": ({"num_experts": 8, "experts_top_k": 2}, "Motif-3 style model (num_experts=8"),
        "latent": ({"kv_lora_rank": 64}, "Motif-3 style model (kv_lora_rank=64"),
        "activation": ({"hidden_act": "gelu"}, "hidden_act='gelu'; a Motif import supports poly_norm and silu"),
        "sliding": ({"use_sliding_window": True}, "sets use_sliding_window"),
        "yarn": ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        "odd": ({"num_key_value_heads": 1}, "even num_key_value_heads"),
    }
    for name, (keys, message) in cases.items():
        config = save_motif(tmp_path / name, 8, 4)
        (tmp_path / name / "config.json").write_text(json.dumps(config | keys))
        with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
            convert(str(tmp_path / name), str(tmp_path / "out"), progress=False)
        assert not (tmp_path / "out").exists()
    # missing config keys, a missing tensor, v2
    config = save_motif(tmp_path / "motif")
    del config["attn_rms_norm_eps"]
    (tmp_path / "nokey").mkdir()
    (tmp_path / "nokey" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="lacks attn_rms_norm_eps, which every Motif-2.6B config.json has"):
        convert(str(tmp_path / "nokey"), str(tmp_path / "out"), progress=False)
    with pytest.raises(ConversionError, match="is inside the input"):
        convert(str(tmp_path / "motif"), str(tmp_path / "motif" / "out"), progress=False)
    with pytest.raises(ConversionError, match="--variant v1 only"):
        convert(str(tmp_path / "motif"), str(tmp_path / "out"), variant="v2", progress=False)
    tensors = load_file(tmp_path / "motif" / "model.safetensors")
    del tensors["model.layers.1.mlp.act_fn.weight"]
    save_file(tensors, str(tmp_path / "motif" / "model.safetensors"))
    with pytest.raises(ConversionError, match="lacks 1 tensor.*model.layers.1.mlp.act_fn.weight"):
        convert(str(tmp_path / "motif"), str(tmp_path / "out"), progress=False)
    # yarn imports when the user gives up the check
    report = convert(str(tmp_path / "yarn"), str(tmp_path / "out"), verify_output=False, progress=False)
    assert report.verification is None and "Verification was skipped" in (tmp_path / "out" / "README.md").read_text()
    assert leftovers(tmp_path) == []


def test_hub_id_import_names_its_source_and_licence(tmp_path, monkeypatch):
    save_motif(tmp_path / "motif", tokenizer=tiny_tokenizer(), vocab=400)
    (tmp_path / "motif" / "README.md").write_text("---\nlicense: other\nlicense_name: motif-license\n---\n# Motif\n")
    (tmp_path / "motif" / "LICENSE").write_text("MOTIF LICENSE TEXT\n")
    (tmp_path / "motif" / "generation_config.json").write_text('{"repetition_penalty": 1.3, "eos_token_id": 2}')
    add_to_hub_cache(tmp_path / "hub", "motif-org/Tiny-Motif", tmp_path / "motif")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    report = convert("motif-org/Tiny-Motif", str(tmp_path / "out"), progress=False)
    assert report.verification.passed  # plain greedy decoding, whatever repetition penalty the source sets
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:\n- motif-org/Tiny-Motif\n") and "license: other" in card
    assert "- motif" in card and "Source: `motif-org/Tiny-Motif` (MotifForCausalLM)" in card
    assert "the source's LICENSE is copied into this folder" in card
    assert (out / "LICENSE").read_text() == "MOTIF LICENSE TEXT\n"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "motif" / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DiffTransformerForCausalLM"] and config["model_type"] == "diff_transformer"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_diff_transformer.DiffTransformerForCausalLM"


# ---------------------------------------------------------------------------------------------------------------------
# The CLI takes a Motif folder where it takes any model


@pytest.mark.parametrize("layout", ["mha", "gqa4-llama3-bias"])
def test_a_motif_folder_loads_in_memory_as_its_import(tmp_path, monkeypatch, layout):
    """`load_model` (what every command loads through) builds the translated config and loads Motif's own tensors:
    the logits equal those of the folder `convert` writes, and nothing is written anywhere."""
    heads, kv, tied, keys = LAYOUTS[layout]
    save_motif(tmp_path / "motif", heads, kv, tied, **keys)
    convert(str(tmp_path / "motif"), str(tmp_path / "converted"), verify_output=False, progress=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    before = tree_hash(tmp_path)
    tokenizer = tiny_tokenizer()
    loaded, _ = load_model(str(tmp_path / "motif"), tokenizer=tokenizer)
    assert tree_hash(tmp_path) == before and not (tmp_path / "hf").exists()
    converted, _ = load_model(str(tmp_path / "converted"), tokenizer=tokenizer)
    assert type(loaded) is DiffTransformerForCausalLM and loaded.config.lambda_init_layer_offset == 1
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted(ids).logits)


@pytest.fixture
def motif_with_chat_tokenizer(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    tokenizer.chat_template = CHAT_TEMPLATE
    save_motif(tmp_path / "motif", 8, 4, False, vocab=len(tokenizer), tokenizer=tokenizer, pad_token_id=0)
    return tmp_path / "motif"


@pytest.mark.slow
def test_cli_convert_generate_train_and_serve_a_motif_folder(motif_with_chat_tokenizer, tmp_path, capsys):
    from modeling_diff_cli.generate import prompt_ids
    from benchmarks.harness.servers import start_server
    from openai import OpenAI

    motif = motif_with_chat_tokenizer
    assert main(["convert", str(motif), str(tmp_path / "converted")]) == 0
    assert "PASS (same function)" in capsys.readouterr().out
    before = tree_hash(motif.parent)

    # generate: the folder loads as the V1 model it is, in memory
    assert main(["generate", str(motif), "--prompt", "def main():", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr()
    model, tokenizer = load_model(str(tmp_path / "converted"))
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert printed.out.strip() == tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert tree_hash(motif.parent) == before  # nothing written

    argv = ["train", str(motif), "--output_dir", str(tmp_path / "trained"), "--max_steps", "2", "--seq_len", "32",
            "--per_device_train_batch_size", "2"]
    assert main(argv) == 0
    trained = DiffTransformerForCausalLM.from_pretrained(tmp_path / "trained")
    assert trained.config.hidden_act == "poly_norm" and trained.config.lambda_init_layer_offset == 1
    assert not torch.equal(trained.model.layers[0].mlp.act_fn.weight, model.model.layers[0].mlp.act_fn.weight)

    question = "What does the with statement do?"
    ids = prompt_ids(tokenizer, question, chat=True)
    answer = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with start_server(motif, "--num-blocks", "16", timeout=180) as (base, _process):
        reply = OpenAI(base_url=f"{base}/v1", api_key="unused").chat.completions.create(
            model=str(motif), messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0
        )
    assert reply.choices[0].message.content == tokenizer.decode(answer[0, ids.shape[1] :], skip_special_tokens=True)


def test_cli_refuses_a_grouped_motif_folder_in_one_line(tmp_path, capsys):
    config = save_motif(tmp_path / "motif", 8, 4)
    (tmp_path / "motif" / "config.json").write_text(json.dumps(config | {"num_noise_heads": 2}))
    for argv in (["convert", str(tmp_path / "motif"), str(tmp_path / "out")],
                 ["generate", str(tmp_path / "motif"), "--prompt", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "grouped differential attention" in err[0]
    assert not (tmp_path / "out").exists()

