"""Every head Llama has, for both variants: Auto classes, `auto_map`, pipelines, and `trust_remote_code`."""

import json
import os
import textwrap

import pytest
import torch
from helpers import run_without_the_package, tiny_config, tiny_tokenizer
from pipeline_tasks import TASKS, run_task
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import modeling_diff
from modeling_diff import DiffTransformerForCausalLM, DiffTransformerForSequenceClassification

AUTO_CLASSES = [AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                AutoModelForTokenClassification, AutoModelForQuestionAnswering]  # fmt: skip
def assert_close(ours, theirs, path="result"):
    """Equal structure and strings; floats within 1e-5 (the same weights and code, another process)."""
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), path
        for key in ours:
            assert_close(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a, b, f"{path}[{i}]")
    elif isinstance(ours, float):
        assert ours == pytest.approx(theirs, abs=1e-5), path
    else:
        assert ours == theirs, path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A V1 folder saved from the causal LM and a V2 folder saved from the sequence classifier, with a tokenizer."""
    root = tmp_path_factory.mktemp("heads")
    tokenizer = tiny_tokenizer()
    folders = {}
    saved_from = {"v1": (1, DiffTransformerForCausalLM), "v2": (2, DiffTransformerForSequenceClassification)}
    for name, (version, head) in saved_from.items():
        torch.manual_seed(0)
        head(tiny_config(version, vocab_size=len(tokenizer))).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.mark.parametrize("head", list(modeling_diff.HEADS.values()), ids=lambda cls: cls.__name__)
def test_every_head_writes_every_head_into_auto_map(tmp_path, head):
    head(tiny_config(1)).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_diff_transformer.DiffTransformerConfig",
        **{auto.__name__: f"modeling_diff_transformer.{cls.__name__}" for auto, cls in modeling_diff.HEADS.items()},
    }


@pytest.mark.parametrize("version", [1, 2])
def test_heads_load_the_body_of_a_saved_causal_lm(tmp_path, version):
    torch.manual_seed(0)
    causal = DiffTransformerForCausalLM(tiny_config(version)).eval()
    causal.save_pretrained(tmp_path)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        expected = causal.model(ids).last_hidden_state
        for auto_class in AUTO_CLASSES:
            model = auto_class.from_pretrained(tmp_path).eval()
            assert type(model) is modeling_diff.HEADS[auto_class]
            body = model if auto_class is AutoModel else model.model
            assert torch.equal(body(ids).last_hidden_state, expected), auto_class.__name__
    for auto_class in AUTO_CLASSES[2:]:
        head = auto_class.from_pretrained(tmp_path, num_labels=3)
        out = head(ids)
        logits = out.start_logits if auto_class is AutoModelForQuestionAnswering else out.logits
        assert torch.isfinite(logits).all()


EVERY_HEAD = textwrap.dedent(
    """
    import json
    import transformers
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from pipeline_tasks import TASKS, run_task

    results = {}
    for folder in sys.argv[3:]:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        for auto_class in TASKS.values():
            model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True)
            assert "transformers_modules" in type(model).__module__, type(model).__module__
            head_folder = Path(folder + "-heads") / auto_class  # saved by the class loaded from the folder's code
            model.save_pretrained(head_folder)
            tokenizer.save_pretrained(head_folder)
        for task, auto_class in TASKS.items():
            results[f"{folder}:{task}"] = run_task(task, Path(folder + "-heads") / auto_class, trust_remote_code=True)
    Path(sys.argv[2]).write_text(json.dumps(results))
    """
)


@pytest.mark.slow
def test_every_head_loads_with_trust_remote_code_and_runs_its_pipeline_without_the_package(saved, tmp_path):
    out = tmp_path / "results.json"
    folders = [str(saved["v1"]), str(saved["v2"])]
    result = run_without_the_package(EVERY_HEAD, os.path.dirname(__file__), out, *folders, tmp_path=tmp_path,
                                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(out.read_text())
    for folder in folders:
        for task, auto_class in TASKS.items():
            head_folder = f"{folder}-heads/{auto_class}"
            auto_map = json.loads(open(f"{head_folder}/config.json").read())["auto_map"]
            assert set(auto_map) == {"AutoConfig", *TASKS.values()}, head_folder
            # the same pipeline in this process, through the package's registered classes
            assert_close(run_task(task, head_folder), theirs[f"{folder}:{task}"], f"{folder}:{task}")
