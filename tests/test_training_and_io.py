"""Training (Trainer, gradient accumulation, checkpointing) and I/O (safetensors, trust_remote_code)."""

import ast
import json
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import make_model, run_without_the_package, tiny_config, tiny_tokenizer
from modeling_diff_eval.corpus import python_docs_texts
from modeling_diff_training import DiffTrainingArguments, train_model
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from modeling_diff import DiffTransformerForCausalLM


class PatternDataset(Dataset):
    """Sequences that repeat a short random motif: learnable in a few dozen steps."""

    def __init__(self, n=64, length=24, vocab=97, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            motif = torch.randint(3, vocab, (4,), generator=g)
            self.items.append(motif.repeat(length // 4))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


@pytest.mark.parametrize("version", [1, 2])
def test_trainer_lowers_loss_with_gradient_accumulation(tmp_path, version):
    model = DiffTransformerForCausalLM(tiny_config(version))
    data = PatternDataset()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=120, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=10, warmup_steps=10, report_to=[], save_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < 0.6 * losses[0], losses


def test_loss_uses_num_items_in_batch_for_accumulation():
    """Micro-batches with different numbers of real labels, accumulated, equal the gradient of the full batch."""
    model = DiffTransformerForCausalLM(tiny_config(1))
    ids = torch.randint(3, 97, (4, 10))
    labels = ids.clone()
    labels[0, :7] = -100  # uneven padding: micro-batch 1 has fewer real labels than micro-batch 2
    labels[1, :5] = -100
    full = model(ids, labels=labels).loss
    full.backward()
    full_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    n_items = (labels[:, 1:] != -100).sum()
    for part in (slice(0, 2), slice(2, 4)):
        model(ids[part], labels=labels[part], num_items_in_batch=n_items).loss.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, full_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("version, reentrant", [(1, False), (1, True), (2, False)])
def test_gradient_checkpointing_gives_the_same_gradients(version, reentrant):
    """Layer checkpointing, reentrant or not, wraps V1's own recomputation of a1 - λ·a2 and its norm unchanged."""
    model = DiffTransformerForCausalLM(tiny_config(version)).train()
    ids = torch.randint(3, 97, (2, 16))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.model.layers[0].gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(plain[n].abs().sum() > 0 for n in plain if "lambda" in n)


@pytest.mark.parametrize("version", [1, 2])
def test_safetensors_round_trip(tmp_path, version):
    model = DiffTransformerForCausalLM(tiny_config(version)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "diff_transformer" and config["diff_version"] == version
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_diff_transformer.DiffTransformerForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 97, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


LOAD_AND_RUN = textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(ids).logits, sys.argv[3])
    print(type(model).__module__)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_saved_folder_loads_with_trust_remote_code_without_the_package(tmp_path, version):
    model = DiffTransformerForCausalLM(tiny_config(version)).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert (folder / "modeling_diff_transformer.py").exists()
    assert (folder / "configuration_diff_transformer.py").exists()
    ids = torch.randint(3, 97, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    result = run_without_the_package(LOAD_AND_RUN, folder, tmp_path / "ids.pt", tmp_path / "logits.pt",
                                     tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout  # the class came from the copied code files
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


LAYERS = {  # folder: the project packages its code may import (docs/design.md, "Layers", draws them)
    "modeling_diff": set(),
    "conversion": {"modeling_diff"},
    "evaluation": {"modeling_diff"},
    "training": {"modeling_diff", "modeling_diff_conversion", "modeling_diff_eval"},
    "serving": {"modeling_diff", "modeling_diff_conversion"},
}
PROJECT_PACKAGES = {
    "modeling_diff", "modeling_diff_conversion", "modeling_diff_training", "modeling_diff_eval", "modeling_diff_cli",
    "modeling_diff_serving",
}
ROOT = Path(__file__).parent.parent


def project_imports(path: Path) -> set[str]:
    """The project packages a Python file imports (absolute imports, wherever they sit in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & PROJECT_PACKAGES


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_library_packages_import_only_the_layers_below(folder):
    """model <- conversion, evaluation <- training, serving <- CLI: no library imports the CLI or a layer above."""
    for path in sorted((ROOT / folder).glob("*.py")):
        assert project_imports(path) <= LAYERS[folder], f"{path.name} imports {project_imports(path) - LAYERS[folder]}"


PACKAGE_OF = {"conversion": "modeling_diff_conversion", "evaluation": "modeling_diff_eval",
              "training": "modeling_diff_training", "serving": "modeling_diff_serving", "cli": "modeling_diff_cli"}


@pytest.mark.parametrize("folder", sorted(PACKAGE_OF))
def test_modules_import_without_a_cycle(folder):
    """Inside a package, a module never imports one that imports it back (in functions too): a call leaves a module
    and does not return to it, the flow docs/design.md draws."""
    modules = {path.stem: path for path in (ROOT / folder).glob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                graph[name] |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE_OF[folder] + "."):
                graph[name].add(node.module.split(".")[1])
        graph[name] &= set(modules) - {"__init__"}

    def visit(name, path):
        assert name not in path, f"import cycle: {' -> '.join([*path, name])}"
        for other in graph[name]:
            visit(other, [*path, name])

    for name in graph:
        visit(name, [])


def test_no_benchmark_imports_the_cli():
    """Benchmarks and studies call the libraries; the CLI only parses and calls them (a benchmark may still run the
    `diff-transformer` command in a subprocess, to measure the command itself)."""
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        assert "modeling_diff_cli" not in project_imports(path), f"{path.relative_to(ROOT)} imports the CLI"


def test_a_bf16_train_model_leaves_a_float32_model(tmp_path):
    """After the Trainer's bf16 autocast, the returned model computes in float32 again, as before training."""
    model = make_model("v2-gqa", peaked=False, vocab_size=400)
    args = DiffTrainingArguments(
        output_dir=str(tmp_path), max_steps=1, bf16=True, save_strategy="no", per_device_train_batch_size=2
    )
    train_model(model, tiny_tokenizer(), python_docs_texts()[:5], args, seq_len=32)
    fresh = type(model)(model.config).eval()  # the same weights in a model that never went through the Trainer
    fresh.load_state_dict(model.state_dict())
    ids = torch.randint(3, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, fresh(ids).logits)
