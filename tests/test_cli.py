"""The `diff-transformer` command: each subcommand's happy path and a failure, DDP, push, offline Hub."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import add_to_hub_cache, assert_one_line_error, error_line, save_tiny_models, tree_hash
from helpers import run_cli as cli
from modeling_diff_cli.main import COMMANDS, main
from modeling_diff_training.checkpoints import checkpoints_folder
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM

ROOT = Path(__file__).parent.parent


def tiny_train(source, output_dir, steps) -> list[str]:
    """`train SOURCE --output_dir OUT --max_steps N` at the tiny sizes every CLI training test uses."""
    return ["train", str(source), "--output_dir", str(output_dir), "--max_steps", str(steps), "--seq_len", "32",
            "--per_device_train_batch_size", "2"]


def train_interrupted_at_the_final_evaluation(argv: list, monkeypatch) -> int:
    """`diff-transformer ARGV` in-process, where training runs and then the Trainer's evaluation raises
    KeyboardInterrupt (Ctrl-C), so the checkpoints stay; its exit code."""
    from transformers import Trainer

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "evaluate", interrupt)
        return main(argv)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A tiny DiffTransformer V2 and a tiny Llama, saved with one shared tokenizer."""
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def help_text(command: str, capsys) -> str:
    """`diff-transformer COMMAND --help` in this process: argparse prints it and exits with status 0."""
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def test_help_texts_exist(capsys):
    for command in COMMANDS:
        text = help_text(command, capsys)
        assert text.startswith(f"usage: diff-transformer {command} ") and "--debug" in text, command


@pytest.mark.slow
def test_train_happy_path_and_failures(models_dir, tmp_path, capsys):
    from modeling_diff_eval import train_eval_texts
    from modeling_diff_training import TokenBlocks

    result = cli(*tiny_train(models_dir / "diff", tmp_path / "trained", 3), "--logging_steps", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss " in result.stdout and "saved the trained model" in result.stdout
    assert "warning:" not in result.stderr  # no old spelling, no deprecation line
    trained = DiffTransformerForCausalLM.from_pretrained(tmp_path / "trained")
    before = DiffTransformerForCausalLM.from_pretrained(models_dir / "diff")
    assert not torch.equal(trained.lm_head.weight, before.lm_head.weight)
    assert not checkpoints_folder(tmp_path / "trained").exists()
    # the default schedule: a linear warm-up over a tenth of the steps (1 of 3), then cosine down from the peak 5e-5
    history = json.loads((tmp_path / "trained" / "trainer_state.json").read_text())["log_history"]
    rates = [e["learning_rate"] for e in history if "learning_rate" in e]
    assert rates == pytest.approx([0.0, 5e-5, 2.5e-5], abs=1e-12), rates
    # the held-out split is the Trainer's eval_dataset: its loss is the trained model's loss on the held-out blocks
    (eval_loss,) = [e["eval_loss"] for e in history if "eval_loss" in e]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "trained")
    blocks = TokenBlocks(train_eval_texts(None, 0.1, 0)[1], tokenizer, 32).blocks
    with torch.no_grad():
        expected = sum(trained(b, labels=b).loss.item() * len(b) for b in blocks.split(8)) / len(blocks)
    assert eval_loss == pytest.approx(expected, rel=1e-4)
    assert f"held-out loss {eval_loss:.4f}" in result.stdout

    (tmp_path / "empty.txt").write_text("\n\n")
    for extra, message in [
        (["--dataset", "no-such-dataset-anywhere"], "unknown dataset"),
        (["--dataset", tmp_path / "empty.txt"], "is empty"),
        (["--seq_len", 10**7, "--per_device_train_batch_size", 64], "GiB of activations"),
    ]:
        assert message in error_line(["train", models_dir / "diff", "--output_dir", tmp_path / "x", *extra,
                                      "--max_steps", 1], capsys)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_train_resumes_from_checkpoints(models_dir, tmp_path):
    from modeling_diff_conversion import load_model
    from modeling_diff_eval import train_eval_texts
    from modeling_diff_training import DiffTrainingArguments, train_model
    from modeling_diff_training.checkpoints import TrainedFrom

    checkpoints = checkpoints_folder(tmp_path / "out")
    model, tokenizer = load_model(str(models_dir / "diff"))
    args = DiffTrainingArguments(
        output_dir=str(checkpoints), max_steps=3, save_steps=1, logging_steps=1, per_device_train_batch_size=2,
        disable_tqdm=True,
    )
    # from Python, as the CLI does: the checkpoints record the model, so that the CLI may resume them
    source = TrainedFrom.of(models_dir / "diff")
    first = train_model(model, tokenizer, train_eval_texts(None)[0], args, seq_len=32, trained_from=source)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # none at the last step
    result = cli(*tiny_train(models_dir / "diff", tmp_path / "out", 4), "--logging_steps", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in result.stdout
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    assert losses[:2] == [(e["step"], e["loss"]) for e in first.state.log_history if "loss" in e][:2]  # checkpoint-2
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert "'epoch'" in result.stdout or "loss" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").exists() and not checkpoints.exists()


def test_train_help_lists_the_trainer_options(capsys):
    text = help_text("train", capsys)
    for option in ("--lr_scheduler_type", "--warmup_steps", "--report_to", "--push_to_hub", "--save_total_limit",
                   "--optim", "--max_grad_norm", "--eval_strategy", "--resume_from_checkpoint", "--seq_len",
                   "--overwrite_output_dir", "--debug", "--lr LEARNING_RATE"):
        assert option in text, option
    assert "use --learning_rate" in text  # the old spelling names its successor


def test_train_trainer_options_take_effect(models_dir, tmp_path, monkeypatch):
    """The options of the issue's example; an interruption at the final evaluation keeps the checkpoints to look at."""
    out = tmp_path / "out"
    options = ["--lr_scheduler_type", "constant", "--warmup_ratio", "0.1", "--save_total_limit", "1",
               "--save_steps", "1", "--logging_steps", "1", "--learning_rate", "1e-3"]
    argv = [*tiny_train(models_dir / "diff", out, 4), *options]
    assert train_interrupted_at_the_final_evaluation(argv, monkeypatch) == 130
    checkpoints = checkpoints_folder(out)
    # --save_total_limit 1: the newest checkpoint alone (the last step takes none: the model is saved at the end)
    assert sorted(p.name for p in checkpoints.iterdir()) == [".diff-transformer-checkpoints.json", "checkpoint-3"]
    state = json.loads((checkpoints / "checkpoint-3" / "trainer_state.json").read_text())
    rates = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    assert rates == [1e-3] * 3  # constant: no warm-up ramp, no decay
    assert not out.exists()


def test_train_old_spellings_still_work_with_one_deprecation_line_each(capsys):
    from modeling_diff_cli.main import build_parser
    from modeling_diff_cli.train import parse

    old = ["--lr", "1e-3", "--batch-size", "3", "--grad-accum", "2", "--epochs", "2", "--gradient-checkpointing",
           "--force", "--warmup_ratio", "0.2"]
    args = build_parser().parse_args(["train", "m", "--output-dir", "d", "--seq-len", "64", "--save-steps", "7", *old])
    model_args, data_args, training, config_file = parse(args)
    assert (training.learning_rate, training.per_device_train_batch_size, training.gradient_accumulation_steps) == (
        1e-3, 3, 2)
    assert training.num_train_epochs == 2 and training.max_steps == -1  # epochs: no default step count
    assert training.activation_checkpointing and training.overwrite_output_dir and training.warmup_steps == 0.2
    assert (model_args.model_name_or_path, data_args.seq_len, training.save_steps, training.output_dir) == (
        "m", 64, 7, "d")
    assert config_file is None
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 7 and all("is deprecated" in w for w in warnings), warnings
    assert "warning: --lr is deprecated and goes away in the next release; use --learning_rate" in warnings
    # every option also in its dashed form, as HfArgumentParser takes it: the issue's example, dashed
    dashed = ["--output-dir", "d", "--lr-scheduler-type", "constant", "--warmup-ratio", "0.1",
              "--save-total-limit", "1"]
    _, _, training, _ = parse(build_parser().parse_args(["train", "m", *dashed]))
    assert (training.output_dir, training.lr_scheduler_type.value, training.warmup_steps, training.save_total_limit) == (
        "d", "constant", 0.1, 1)


@pytest.mark.parametrize(
    "command, old, option, value",
    [
        (["convert", "s", "o"], "--force", "overwrite_output_dir", True),
        (["demo"], "--force", "overwrite_output_dir", True),
        (["demo"], "--lr", "learning_rate", 1e-3),
        (["demo"], "--batch-size", "per_device_train_batch_size", 3),
        (["demo"], "--eval-batches", "max_batches", 2),
        (["eval", "m"], "--batch-size", "per_device_eval_batch_size", 3),
    ],
)
def test_every_command_takes_the_old_spellings_with_one_deprecation_line(capsys, command, old, option, value):
    """One spelling per option across commands (the Trainer's); the old one sets it and says what replaces it."""
    from modeling_diff_cli.main import build_parser

    given = [] if value is True else [str(value)]
    assert getattr(build_parser().parse_args([*command, old, *given]), option) == value
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {old} is deprecated and goes away in the next release; use --{option}"
    ]
    for new in (f"--{option}", f"--{option.replace('_', '-')}"):  # the new name, as HfArgumentParser spells it
        assert getattr(build_parser().parse_args([*command, new, *given]), option) == value
    assert capsys.readouterr().err == ""


def test_training_defaults_and_warmup_scale_with_epochs(tmp_path):
    from modeling_diff_training import DiffTrainingArguments

    steps = DiffTrainingArguments(output_dir=str(tmp_path))
    assert (steps.max_steps, steps.learning_rate, steps.per_device_train_batch_size) == (100, 5e-5, 4)
    assert (steps.lr_scheduler_type.value, steps.weight_decay, steps.save_total_limit, steps.seed) == (
        "cosine", 0.01, 2, 0)
    assert steps.get_warmup_steps(100) == 10  # as before: a tenth of the default 100 steps
    epochs = DiffTrainingArguments(output_dir=str(tmp_path), num_train_epochs=3)
    assert epochs.max_steps == -1 and epochs.get_warmup_steps(900) == 90  # a tenth of however many steps
    assert DiffTrainingArguments(output_dir=str(tmp_path), warmup_steps=7).get_warmup_steps(900) == 7


@pytest.mark.slow
def test_train_reads_a_config_file(models_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {models_dir / 'diff'}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 2\nseq_len: 32\n"
        "per_device_train_batch_size: 2\nlogging_steps: 1\nlr_scheduler_type: constant\ndo_eval: false\n"
    )
    result = cli("train", config)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [e["learning_rate"] for e in history if "learning_rate" in e] == [5e-5, 5e-5]
    assert not any("eval_loss" in e for e in history)

    assert "the only argument: put --max_steps" in error_line(["train", config, "--max_steps", 3], capsys)
    (tmp_path / "bad.json").write_text('{"output_dir": "x", "learning_rat": 1}')
    assert "['learning_rat'] (the options are the names" in error_line(["train", tmp_path / "bad.json"], capsys)
    assert not (tmp_path / "x").exists()


def test_train_push_to_hub_uploads_the_trained_folder(models_dir, tmp_path, monkeypatch, capsys):
    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs.get("private"))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_create_commit(self, repo_id, operations, commit_message=None, revision=None, **kwargs):
        calls["files"] = sorted(op.path_in_repo for op in operations)
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message=commit_message,
            commit_description="", oid="abc",
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
    extra = ["--push_to_hub", "--hub_model_id", "me/tiny-trained", "--hub_private_repo", "true", "--do_eval", "false",
             "--hub_token", "hf_" + "x" * 34]
    assert main([*tiny_train(models_dir / "diff", tmp_path / "out", 1), *extra]) == 0
    # what the Trainer got otherwise than given, one line each, as training started
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: the Trainer's checkpoints go to {checkpoints_folder(tmp_path / 'out')}; the trained model to "
        f"{tmp_path / 'out'}, at the end",
        "note: --push_to_hub uploads the trained model to me/tiny-trained at the end, no checkpoint",
        "note: --hub_token is kept off disk (the Trainer saves its arguments into every checkpoint)",
    ]
    assert calls["repo"] == ("me/tiny-trained", True)
    assert calls["files"] == sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert "model.safetensors" in calls["files"] and "trainer_state.json" in calls["files"]


def test_distillation_loss_and_lambda_warmup(models_dir):
    from modeling_diff_conversion import load_model
    from modeling_diff_training import DistillationTrainer, LambdaWarmup
    from transformers import TrainingArguments

    student, _ = load_model(str(models_dir / "diff"))
    teacher, _ = load_model(str(models_dir / "diff"))  # an identical teacher: the KL term must vanish
    ids = torch.randint(3, len(_), (2, 16))
    args = TrainingArguments(output_dir="/tmp/unused", report_to=[], use_cpu=True)
    trainer = DistillationTrainer(model=student, args=args, teacher=teacher, distill_weight=1.0)
    loss = trainer.compute_loss(student, {"input_ids": ids, "labels": ids})
    torch.testing.assert_close(loss, student(ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # a different teacher adds a positive KL
        teacher.lm_head.weight.mul_(3)
    assert trainer.compute_loss(student, {"input_ids": ids, "labels": ids}) > loss + 1e-3

    warmup = LambdaWarmup(student, warmup_steps=4)

    class State:
        global_step = 0

    scales = []
    for step in (0, 2, 4, 6):
        State.global_step = step
        warmup.on_step_begin(None, State, None)
        scales.append(student.config.lambda_scale)
    warmup.on_train_end(None, State, None)
    assert scales == [0.0, 0.5, 1.0, 1.0] and student.config.lambda_scale == 1.0


@pytest.mark.slow
def test_train_with_distillation_cli(models_dir, tmp_path):
    result = cli(
        *tiny_train(models_dir / "diff", tmp_path / "d", 2),
        "--distill-from",
        models_dir / "llama",
        "--lambda_warmup_steps",
        2,
        "--activation_checkpointing",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "d" / "model.safetensors").exists()


@pytest.mark.slow
def test_generate_streams_the_greedy_answer(models_dir, tmp_path, capsys):
    from modeling_diff_conversion import load_model

    result = cli("generate", models_dir / "diff", "--prompt", "def main():", "--max-new-tokens", 12)
    assert result.returncode == 0, result.stderr[-2000:]
    model, tokenizer = load_model(str(models_dir / "diff"))
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    assert result.stdout.strip() == text.strip()

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((models_dir / "diff" / "config.json").read_text())
    assert "has no weights" in error_line(["generate", tmp_path / "noweights", "--prompt", "x"], capsys)


@pytest.mark.slow
def test_eval_ppl_json_and_hub_failure(models_dir, tmp_path, capsys):
    result = cli("eval", models_dir / "diff", "--seq-len", 32, "--max-batches", 2, "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["perplexity"] > 1 and data["tokens_per_second"] > 0
    assert len(data["lambda"]) == 2 and 0 < data["lambda"][0]["lambda"] < 1  # V2: mean sigmoid gate
    assert "λ per layer" in result.stdout
    needle = ["eval", models_dir / "diff", "--task", "needle", "--needles", 2, "--context-len", 128, "--samples", 2,
              "--json", tmp_path / "n.json"]
    assert main(needle) == 0  # in this process: the subprocess above ran the command as a user does
    assert 0 <= json.loads((tmp_path / "n.json").read_text())["accuracy"] <= 1
    assert "not in the local HF cache" in error_line(["eval", "nobody/no-such-model"], capsys)


def test_push_dry_run_and_intercepted_upload(models_dir, monkeypatch, capsys):
    assert main(["push", str(models_dir / "diff"), "me/tiny-diff", "--dry-run"]) == 0
    out = capsys.readouterr().out
    files = sorted(p.name for p in (models_dir / "diff").iterdir())
    for name in files:
        assert name in out
    assert "dry run: nothing was uploaded" in out

    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs.get("private"))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_create_commit(self, repo_id, operations, commit_message=None, revision=None, **kwargs):
        calls["commit"] = (repo_id, sorted(op.path_in_repo for op in operations), commit_message, revision)
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message=commit_message,
            commit_description="",
            oid="abc",
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", lambda self, *a, **k: None)
    assert (
        main(
            [
                "push",
                str(models_dir / "diff"),
                "me/tiny-diff",
                "--private",
                "--revision",
                "dev",
                "--commit-message",
                "first",
            ]
        )
        == 0
    )
    assert calls["repo"] == ("me/tiny-diff", True)
    assert calls["commit"] == ("me/tiny-diff", files, "first", "dev")
    assert main(["push", str(models_dir), "me/tiny-diff"]) == 2  # not a model folder
    assert "is not a model folder" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_training_with_two_cpu_processes(models_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "modeling_diff_cli.main",
            *tiny_train(models_dir / "diff", tmp_path / "ddp", 2),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("saved the trained model") == 1  # rank 0 alone writes
    assert (tmp_path / "ddp" / "model.safetensors").exists()
    # one DDP job, not two lone processes: each step took 2 sequences from each of the 2 ranks
    from modeling_diff_eval import train_eval_texts
    from modeling_diff_training import TokenBlocks

    tokenizer = PreTrainedTokenizerFast.from_pretrained(models_dir / "diff")
    blocks = len(TokenBlocks(train_eval_texts(None)[0], tokenizer, 32))
    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(2 / math.ceil(blocks / 4), rel=1e-3)


BLOCKED_HUB_LOAD = textwrap.dedent(
    """
    import sys, torch
    sys.modules["modeling_diff"] = None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("someone/tiny-diff", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("someone/tiny-diff", trust_remote_code=True)
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(out[0].tolist())
    """
)


@pytest.mark.slow
def test_model_from_offline_hub_cache_with_remote_code_generates(models_dir, tmp_path):
    add_to_hub_cache(tmp_path / "hub", "someone/tiny-diff", models_dir / "diff")
    (tmp_path / "load.py").write_text(BLOCKED_HUB_LOAD)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            HF_HUB_CACHE=str(tmp_path / "hub"),
            HF_MODULES_CACHE=str(tmp_path / "modules"),
            PYTHONPATH="",
        ),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = DiffTransformerForCausalLM.from_pretrained(models_dir / "diff").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(models_dir / "diff")
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert result.stdout.strip().splitlines()[-1] == str(expected[0].tolist())


@pytest.mark.slow
def test_demo_end_to_end_with_tiny_settings(tmp_path):
    """The user's --max_steps and --seq_len: no time budget, the Llama baseline fine-tuned alike."""
    result = cli(
        "demo",
        "--output_dir",
        tmp_path / "demo",
        "--max_steps",
        2,
        "--max_batches",
        1,
        "--seq_len",
        64,
        "--per_device_train_batch_size",
        2,
        "--max_new_tokens",
        8,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "PASS (same function)" in out and "max |Δlogit|" in out
    llama_answer = out.split("SmolLM2 (Llama) :")[1].splitlines()[0].strip()
    diff_answer = out.split("DiffTransformer :")[1].splitlines()[0].strip()
    assert llama_answer == diff_answer and llama_answer
    assert "plan: 2 step(s) of 2 x 64 tokens for DiffTransformer V2 and the Llama baseline" in out
    assert "why: your --max_steps and --seq_len: no time budget" in out and "timing a training step" not in out
    assert "the same fine-tuning for the source Llama" in out
    assert "diff-transformer push" in out
    demo = tmp_path / "demo"
    card = (demo / "README.md").read_text()
    assert "held-out ppl before" in card and "λ per layer" in card and "base_model:" in card
    assert "(not fine-tuned)" not in card and "- DiffTransformer V2 vs the Llama fine-tuned alike:" in card
    assert (demo / "training_loss.png").stat().st_size > 1000
    assert (demo / "modeling_diff_transformer.py").exists() and (demo / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_demo_fails_at_start_up_without_matplotlib(tmp_path, monkeypatch, capsys):
    """A package the demo needs only at its end (for training_loss.png) is checked before any work."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError in this process
    status = main(["demo", "--output-dir", str(tmp_path / "demo")])
    captured = capsys.readouterr()
    result = subprocess.CompletedProcess([], status, captured.out, captured.err)
    assert_one_line_error(result, "the demo needs matplotlib")
    assert "Convert SmolLM2" not in captured.out
    assert not (tmp_path / "demo").exists()


def test_demo_fails_cleanly_on_a_bad_dataset(tmp_path, capsys):
    assert "unknown dataset" in error_line(["demo", "--output-dir", tmp_path / "demo", "--dataset",
                                            "no-such-dataset-anywhere"], capsys)
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------------------------------------------- bad input, lost data (issue)


def test_convert_force_never_touches_a_source(models_dir, tmp_path, capsys):
    import shutil

    parent = tmp_path / "P"
    shutil.copytree(models_dir / "llama", parent / "llama")
    (tmp_path / "link").symlink_to(parent / "llama")
    before = tree_hash(tmp_path)
    for source, output, relation in (
        (parent / "llama", parent / "llama", "is the input"),
        (parent / "llama", parent, "contains the input"),
        (parent / "llama", parent / "llama" / "diff", "is inside the input"),
        (tmp_path / "link", parent / "llama", "is the input"),  # a symlink to the source is the source
        (parent / "llama", tmp_path / "link", "is the input"),
    ):
        assert f"{relation} {source}" in error_line(["convert", source, output, "--overwrite_output_dir", "--no-verify"], capsys)
    assert tree_hash(tmp_path) == before


def test_train_refuses_checkpoints_of_another_model(models_dir, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(models_dir / "diff", tmp_path / "a")
    b = DiffTransformerForCausalLM.from_pretrained(models_dir / "diff")
    with torch.no_grad():
        b.lm_head.weight.mul_(-1)  # model B: the same architecture and tokenizer, other weights
    b.save_pretrained(tmp_path / "b")
    shutil.copy(models_dir / "diff" / "tokenizer.json", tmp_path / "b")
    shutil.copy(models_dir / "diff" / "tokenizer_config.json", tmp_path / "b")
    out = tmp_path / "out"
    checkpoints = checkpoints_folder(out)
    train = [*tiny_train(tmp_path / "a", out, 3), "--save_steps", "1", "--learning_rate", "1e-2"]

    assert train_interrupted_at_the_final_evaluation(train, monkeypatch) == 130
    err = capsys.readouterr().err
    assert f"interrupted: the checkpoints in {checkpoints} are kept; the same command resumes from checkpoint-2" in err
    kept = tree_hash(checkpoints)
    record = json.loads((checkpoints / "checkpoint-2" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert record["TrainedFrom"]["args"]["model"] == str((tmp_path / "a").resolve())

    train_b = [*tiny_train(tmp_path / "b", out, 3), "--save_steps", "1", "--learning_rate", "1e-2"]
    error = error_line(train_b, capsys)
    assert (f"holds checkpoints of a run trained from {(tmp_path / 'a').resolve()}, not from "
            f"{(tmp_path / 'b').resolve()}: pass --overwrite_output_dir to start afresh") in error
    assert "--resume_from_checkpoint PATH" in error
    assert tree_hash(checkpoints) == kept and not out.exists()
    # the same model, changed in place, is another model too
    with torch.no_grad():
        b.lm_head.weight.mul_(2)
    b.save_pretrained(tmp_path / "a")
    assert "an earlier version of" in error_line(train, capsys)

    assert main([*train_b, "--overwrite_output_dir"]) == 0
    trained = DiffTransformerForCausalLM.from_pretrained(out).lm_head.weight
    from_a = (trained - DiffTransformerForCausalLM.from_pretrained(models_dir / "diff").lm_head.weight).abs().max()
    from_b = (trained - DiffTransformerForCausalLM.from_pretrained(tmp_path / "b").lm_head.weight).abs().max()
    assert from_b < 0.1 < from_a, (from_a, from_b)  # a fine-tune of B, not of A's checkpoint
    assert not checkpoints.exists()


@pytest.mark.slow
def test_train_skips_incomplete_checkpoints_and_resumes_the_newest_complete_one(models_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    checkpoints = checkpoints_folder(out)
    train = [*tiny_train(models_dir / "diff", out, 4), "--save_steps", "1", "--save_total_limit", "3"]
    assert train_interrupted_at_the_final_evaluation(train, monkeypatch) == 130
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    weights = checkpoints / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a disk that filled up during a save
    (checkpoints / "checkpoint-2" / "trainer_state.json").unlink()  # a kill during a save: the state comes last

    result = cli(*train, "--disable_tqdm", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {checkpoints / 'checkpoint-1'}" in result.stdout
    skipped = f"skipping the incomplete checkpoint {checkpoints / 'checkpoint-3'}: its model.safetensors is cut short"
    assert skipped in result.stderr
    assert "checkpoint-2: it has no trainer_state.json" in result.stderr
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[-2]["step"] == 4 and "eval_loss" in history[-1]


def test_train_interrupted_after_its_last_step_ends_where_an_uninterrupted_run_ends(models_dir, tmp_path, monkeypatch):
    """Ctrl-C during the final evaluation, after the last step: the same command redoes that step from the checkpoint
    before it (the Trainer resumed from a checkpoint of the last step would train a step more)."""

    def train(output):
        return [*tiny_train(models_dir / "diff", output, 3), "--save_steps", "1", "--logging_steps", "1",
                "--lr_scheduler_type", "constant", "--learning_rate", "1e-2", "--disable_tqdm", "true"]

    assert main(train(tmp_path / "reference")) == 0
    assert train_interrupted_at_the_final_evaluation(train(tmp_path / "out"), monkeypatch) == 130
    assert main(train(tmp_path / "out")) == 0
    history, reference = (json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
                          for name in ("out", "reference"))
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    assert abs(history[-1]["eval_loss"] - reference[-1]["eval_loss"]) < 1e-4
    trained = DiffTransformerForCausalLM.from_pretrained(tmp_path / "out")
    uninterrupted = DiffTransformerForCausalLM.from_pretrained(tmp_path / "reference")
    for (name, weight), expected in zip(trained.named_parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(weight, expected, atol=1e-6, rtol=0, msg=name)


def test_train_failed_start_leaves_nothing_and_says_so(models_dir, tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    nan = [*tiny_train(models_dir / "diff", tmp_path / "nan", 2), "--learning_rate", "nan"]
    assert "learning_rate must be a finite number above 0, got nan" in error_line(nan, capsys)

    def fail(self, *args, **kwargs):
        raise RuntimeError("the step failed")

    monkeypatch.setattr(Trainer, "training_step", fail)  # after the Trainer made its output folder
    assert main(tiny_train(models_dir / "diff", tmp_path / "fail", 2)) == 2
    assert "error: RuntimeError: the step failed" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no model folder, no -checkpoints folder


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max_steps", "-3"], "max_steps must be a finite number at least 1 (or -1), got -3"),
        (["--max_steps", "0"], "max_steps must be a finite number at least 1"),
        (["--learning_rate", "0"], "learning_rate must be a finite number above 0, got 0.0"),
        (["--learning_rate", "inf"], "learning_rate must be a finite number above 0, got inf"),
        (["--num_train_epochs", "-1"], "num_train_epochs must be a finite number above 0"),
        (["--warmup_steps", "nan"], "warmup_steps must be a finite number at least 0"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be a finite number at least 1"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be a finite number at least 1"),
        (["--seq_len", "0"], "seq_len must be a finite number at least 1, got 0"),
        (["--eval_fraction", "1.5"], "eval_fraction must be below 1"),
        (["--lambda_warmup_steps", "-1"], "lambda_warmup_steps must be a finite number at least 0"),
        (["--push_to_hub", "--hub_model_id", "user/na me"], "is not valid on the Hub"),
        (["--fsdp", "full_shard"], "pass --fsdp alone"),
    ],
)
def test_train_refuses_out_of_range_options_before_any_work(models_dir, tmp_path, capsys, extra, message):
    assert main([*tiny_train(models_dir / "diff", tmp_path / "out", 2), *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_train_refuses_a_dataset_that_is_not_text(models_dir, tmp_path, capsys):
    import random

    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 64)  # NUL bytes
    (tmp_path / "random.txt").write_bytes(random.Random(0).randbytes(20_000))
    (tmp_path / "ok.txt").write_bytes(b"A stray byte: \xff.\n\n" + b"Some plain text in a block.\n\n" * 199)
    for name in ("weights.bin", "random.txt"):
        dataset = tmp_path / name
        assert main([*tiny_train(models_dir / "diff", tmp_path / "out", 1), "--dataset", str(dataset)]) == 2
        assert f"error: {dataset} is not a text file" in capsys.readouterr().err
    from modeling_diff_eval import load_texts

    assert len(load_texts(str(tmp_path / "ok.txt"))) == 200  # a few undecodable bytes in a text file pass
    assert not (tmp_path / "out").exists()


def test_implausible_configs_are_refused_before_any_tensor(models_dir, tmp_path, capsys):
    import re
    import shutil

    def with_million_layers(model) -> float:
        """The parameter count of `model` with 10**6 decoder layers, from the saved 2-layer model's own tensors."""
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        return sum(p.numel() for p in model.parameters()) + (10**6 - model.config.num_hidden_layers) * layer

    for model in ("diff", "llama"):
        config = json.loads((models_dir / model / "config.json").read_text())
        for name, change in (("zero_heads", {"num_attention_heads": 0}), ("huge", {"num_hidden_layers": 10**6})):
            shutil.copytree(models_dir / model, tmp_path / model / name)
            (tmp_path / model / name / "config.json").write_text(json.dumps({**config, **change}))
    zero_heads = "config.json has num_attention_heads=0: it must be a positive integer"
    assert zero_heads in error_line(["generate", tmp_path / "diff" / "zero_heads", "--prompt", "x"], capsys)
    assert zero_heads in error_line(["convert", tmp_path / "llama" / "zero_heads", tmp_path / "out"], capsys)
    for command, model in (["generate", "diff"], ["convert", "llama"]):
        args = [tmp_path / model / "huge", *(["--prompt", "x"] if command == "generate" else [tmp_path / "out"])]
        error = error_line([command, *args], capsys)
        assert "B parameters (1000000 layers of hidden size 64" in error, error
        estimate = float(re.search(r"about ([0-9.]+)B parameters", error).group(1)) * 1e9
        actual = with_million_layers(AutoModelForCausalLM.from_pretrained(models_dir / model))
        if model == "llama":  # Llama's layout, norms left out: never above the real count, so never a false refusal
            assert 0.99 * actual < estimate <= actual, (estimate, actual)
        else:  # a DiffTransformer V2's o_proj is half as wide as Llama's
            assert abs(estimate - actual) < 0.1 * actual, (estimate, actual)
        assert ("GiB of weights, but" if command == "generate" else "the config does not match the weights") in error
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="num_attention_heads=0: a differential head subtracts two softmax maps"):
        DiffTransformerConfig(num_attention_heads=0)


def test_push_dry_run_validates_the_repo_id(models_dir, capsys):
    for repo_id in ("user/na me", "/x", "a/"):
        assert main(["push", str(models_dir / "diff"), repo_id, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: repo id {repo_id!r} is not valid on the Hub"), err


def test_generate_refuses_an_empty_prompt(models_dir, capsys):
    assert "--prompt is empty" in error_line(["generate", models_dir / "diff", "--prompt", ""], capsys)


def test_convert_keeps_only_tokenizer_code_it_copies(models_dir, tmp_path):
    import shutil

    source = tmp_path / "llama"
    shutil.copytree(models_dir / "llama", source)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {
        "AutoTokenizer": ["tokenization_absent.SlowTokenizer", "tokenization_present.FastTokenizer"],
        "AutoProcessor": "processing_absent.Processor",
    }
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (source / "tokenization_present.py").write_text("# the source's tokenizer code\n")
    assert main(["convert", str(source), str(tmp_path / "out"), "--no-verify"]) == 0
    converted = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert converted["auto_map"] == {"AutoTokenizer": [None, "tokenization_present.FastTokenizer"]}
    assert (tmp_path / "out" / "tokenization_present.py").read_text() == "# the source's tokenizer code\n"
    assert not (tmp_path / "out" / "tokenization_absent.py").exists()


def final_losses(folder: Path) -> tuple[float, float]:
    """(the last training loss, the held-out loss) of a finished run, from its trainer_state.json."""
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [e["loss"] for e in history if "loss" in e][-1], [e["eval_loss"] for e in history if "eval_loss" in e][-1]


def train_interrupted_at(argv: list, step: int, where: str, monkeypatch) -> int:
    """`diff-transformer ARGV` in this process, where Ctrl-C lands exactly at a chosen point of training step `step`:
    "mid-step" (its backward done, its optimizer step not) or "mid-save" (its checkpoint's weights written, its
    trainer_state.json not yet). A real SIGINT that the process sends itself from inside the step, synchronously: no
    sleep, no race with the signal. Returns the exit status."""
    import signal

    from transformers import Trainer

    training_step, save_model = Trainer.training_step, Trainer.save_model

    def step_then_interrupt(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        if where == "mid-step" and self.state.global_step == step - 1:  # global_step counts finished steps
            signal.raise_signal(signal.SIGINT)
        return loss

    def save_then_interrupt(self, output_dir=None, _internal_call=False):
        save_model(self, output_dir, _internal_call)
        if where == "mid-save" and _internal_call and self.state.global_step == step:
            signal.raise_signal(signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "training_step", step_then_interrupt)
        patch.setattr(Trainer, "save_model", save_then_interrupt)
        return main([str(a) for a in argv])


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_uninterrupted_result(models_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a step, then in the middle of a checkpoint's save (at steps drawn once from a seeded
    generator), then a kill during a save (simulated: the newest complete checkpoint's weights cut to half), each
    followed by the same command: the final training and held-out losses equal those of an uninterrupted run.
    Deterministic: the interruptions land where the test says (`train_interrupted_at`)."""
    import random

    def train(output):
        return [*tiny_train(models_dir / "diff", output, 30), "--save_steps", "1", "--logging_steps", "1",
                "--learning_rate", "1e-2", "--disable_tqdm", "true"]

    assert main(train(tmp_path / "reference")) == 0
    out = tmp_path / "out"
    checkpoints = checkpoints_folder(out)
    first, second = sorted(random.Random(0).sample(range(3, 25), 2))
    capsys.readouterr()
    assert train_interrupted_at(train(out), first, "mid-step", monkeypatch) == 130
    kept = f"interrupted: the checkpoints in {checkpoints} are kept; the same command resumes from checkpoint-"
    assert f"{kept}{first - 1}" in capsys.readouterr().err.split("\n")
    assert not (checkpoints / f"checkpoint-{first}").exists()
    assert train_interrupted_at(train(out), second, "mid-save", monkeypatch) == 130
    assert f"{kept}{second - 1}" in capsys.readouterr().err.split("\n")
    assert not (checkpoints / f"checkpoint-{second}" / "trainer_state.json").exists()  # cut short: skipped
    weights = checkpoints / f"checkpoint-{second - 1}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    assert main(train(out)) == 0
    assert f"resuming from {checkpoints / f'checkpoint-{second - 2}'}" in capsys.readouterr().out
    loss, eval_loss = final_losses(out)
    reference_loss, reference_eval_loss = final_losses(tmp_path / "reference")
    assert abs(loss - reference_loss) < 1e-4 and abs(eval_loss - reference_eval_loss) < 1e-4, (
        loss, reference_loss, eval_loss, reference_eval_loss)
