"""Issue 29, point by point: nothing the user owns is deleted, overwritten, mixed in or uploaded by mistake.

Each test reproduces one numbered point of the issue as a careless user or an attacker would meet it (the CLI run
in-process), hashes the user's files before and after, and checks the one line the command prints. The new API is
imported inside the tests, so that each test fails on its own against the code before the fix.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import error_line, outcome, save_tiny_models, tree_hash, undeletable
from modeling_diff_cli.main import main
from modeling_diff_training.checkpoints import checkpoints_folder
from transformers import AutoModelForCausalLM, Trainer


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tiny_train(models_dir):
    """`tiny_train(SOURCE, OUTPUT_DIR, STEPS, *EXTRA)`: the argv of a tiny `train` run, on a small text (a few of
    Python's reference docs), so that its held-out evaluation is quick."""
    from modeling_diff_eval.corpus import python_docs_texts

    corpus = models_dir / "corpus.txt"
    corpus.write_text("\n\n".join(python_docs_texts()[:12]))

    def argv(source, output_dir, steps, *extra) -> list[str]:
        return ["train", str(source), "--output_dir", str(output_dir), "--max_steps", str(steps), "--seq_len", "32",
                "--per_device_train_batch_size", "2", "--dataset", str(corpus), *map(str, extra)]

    return argv


@contextlib.contextmanager
def model_never_loads(monkeypatch):
    """Within the block, loading a model fails loudly: a refusal that comes first is one that comes before it."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    with monkeypatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", loaded)
        yield


def interrupted_at_the_final_evaluation(argv: list, monkeypatch) -> int:
    """`diff-transformer ARGV`, where training runs and then Ctrl-C comes during the final evaluation: the checkpoints
    stay. Its exit status."""

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "evaluate", interrupt)
        return main([str(a) for a in argv])


@contextlib.contextmanager
def bind_mount(source: Path, target: Path):
    """`mount --bind SOURCE TARGET` for the block; yields whether it could (it needs root)."""
    mounted = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted and subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=True)


def intercept_uploads(monkeypatch) -> dict:
    """Replace the Hub calls of an upload: returns the dict where the committed paths will be."""
    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))

    def create_commit(self, repo_id, operations, commit_message=None, revision=None, **kwargs):
        calls["files"] = sorted(op.path_in_repo for op in operations)
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
                                          commit_message=commit_message, commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return calls


# ------------------------------------------------------------------------------------------------------------ 1


def test_1_force_replaces_only_an_output_this_tool_wrote(models_dir, tiny_train, tmp_path, monkeypatch, capsys):
    llama = models_dir / "llama"
    home, docs, work = tmp_path / "home", tmp_path / "docs", tmp_path / "work"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("the user's key")
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.txt").write_text("x")
    (docs / ".draft").write_text("y")
    (docs / "sub" / "chapter1.txt").write_text("z")
    work.mkdir()
    (work / "plan.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    assert main(["convert", str(llama), str(tmp_path / "earlier"), "--no-verify"]) == 0  # an earlier output
    (tmp_path / "link").symlink_to(tmp_path / "earlier")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    before = tree_hash(tmp_path)
    for output, says in (
        (docs, f"{docs} was not written by diff-transformer (it has no .diff-transformer.json): --overwrite_output_dir replaces "
               "only an earlier output of this tool"),
        (".", ". is the working directory: name a new folder for the output"),
        ("~", "~ is the home directory"),
        (tmp_path, "holds the working directory"),
        (tmp_path / "file.txt", "is a file, not an output folder"),
        (tmp_path / "link", f"is a symlink (to {tmp_path / 'earlier'})"),
    ):
        assert says in error_line(["convert", llama, output, "--overwrite_output_dir", "--no-verify"], capsys)
    assert "--overwrite_output_dir replaces only an earlier output of this tool" in error_line(
        [*tiny_train(models_dir / "diff", docs, 1), "--overwrite_output_dir"], capsys)
    assert tree_hash(tmp_path) == before

    # an earlier output that now holds a file of the user's, or a file the user changed, is the user's too
    earlier = tmp_path / "earlier"
    (earlier / "notes.txt").write_text("mine")
    assert "holds what diff-transformer did not write there (notes.txt)" in error_line(
        ["convert", llama, earlier, "--overwrite_output_dir", "--no-verify"], capsys)
    (earlier / "notes.txt").unlink()
    card = (earlier / "README.md").read_bytes()
    (earlier / "README.md").write_bytes(card + b"\nmy own notes\n")
    assert "(README.md (changed since))" in error_line(["convert", llama, earlier, "--overwrite_output_dir", "--no-verify"], capsys)
    (earlier / "README.md").write_bytes(card)
    assert main(["convert", str(llama), str(earlier), "--overwrite_output_dir", "--no-verify"]) == 0  # the tool's own: replaced
    assert json.loads((earlier / ".diff-transformer.json").read_text())["written_by"] == "diff-transformer convert"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "earlier", "file.txt", "home", "link", "work"]

    # a mount point, even an empty one
    (tmp_path / "empty").mkdir()
    (tmp_path / "mnt").mkdir()
    with bind_mount(tmp_path / "empty", tmp_path / "mnt") as mounted:
        if mounted:
            assert "is a mount point" in error_line(["convert", llama, tmp_path / "mnt", "--no-verify"], capsys)
    if not mounted:
        pytest.skip("mount --bind needs root: every case but the mount point ran")


# ------------------------------------------------------------------------------------------------------------ 2


def test_2_eval_json_never_overwrites_an_input(models_dir, tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(models_dir / "diff", model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some text to evaluate on.\n\n" * 200)
    (tmp_path / "mine.json").write_text('{"my": "results"}\n')
    before = tree_hash(tmp_path)
    evaluate = ["eval", model, "--dataset", corpus, "--seq-len", 32, "--max-batches", 1, "--json"]
    ran = outcome([*evaluate, model / "config.json"], capsys)  # the case: the model no longer loaded
    assert tree_hash(tmp_path) == before
    says = f"the --json file {model / 'config.json'} is inside the input {model} (MODEL)"
    assert says in error_line(None, capsys, ran)
    with model_never_loads(monkeypatch):
        for target, says in (
            (model / "results.json", "is inside the input"),
            (corpus, f"is the input {corpus} (--dataset)"),
            (tmp_path / "mine.json", "exists and was not written by diff-transformer eval: move it away"),
            (model, "is the input"),
        ):
            assert says in error_line([*evaluate, target], capsys)
    assert tree_hash(tmp_path) == before

    results = tmp_path / "results.json"
    assert main([str(a) for a in [*evaluate, results]]) == 0
    first = json.loads(results.read_text())
    assert first["written_by"] == "diff-transformer eval" and first["perplexity"] > 1
    assert main([str(a) for a in [*evaluate, results]]) == 0  # its own results file: replaced
    assert tree_hash(model) == {k[len("model/"):]: v for k, v in before.items() if k.startswith("model/")}


# ------------------------------------------------------------------------------------------------------------ 3


def test_3_the_hub_token_never_reaches_a_file_nor_the_hub(models_dir, tiny_train, tmp_path, monkeypatch, capsys):
    from transformers import TrainingArguments

    token = "hf_" + "Ab1" * 12
    out = tmp_path / "out"
    train = [*tiny_train(models_dir / "diff", out, 3, "--save_steps", 1, "--hub_token", token)]

    def holding_the_token(root: Path) -> list[str]:
        return [p.name for p in root.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]

    assert interrupted_at_the_final_evaluation(train, monkeypatch) == 130  # the checkpoints stay, with their args
    assert (checkpoints_folder(out) / "checkpoint-2" / "training_args.bin").is_file()
    assert holding_the_token(tmp_path) == []
    assert main(train) == 0
    assert (out / "training_args.bin").is_file() and holding_the_token(tmp_path) == []

    # a folder from before (or made by hand) whose files hold secrets: push holds them back, and says why
    old = tmp_path / "old"
    shutil.copytree(models_dir / "diff", old)
    torch.save(TrainingArguments(output_dir=str(tmp_path / "x"), hub_token=token), old / "training_args.bin")
    (old / "deploy.txt").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n")
    capsys.readouterr()
    assert main(["push", str(old), "me/tiny", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "   skipped  training_args.bin: holds a Hugging Face token (hf_Ab…): delete it" in listed
    assert "   skipped  deploy.txt: holds a private key (-----…)" in listed
    assert token not in listed and "2 skipped" in listed
    calls = intercept_uploads(monkeypatch)
    assert main(["push", str(old), "me/tiny"]) == 0
    assert calls["files"] == sorted(p.name for p in (models_dir / "diff").iterdir())


# ------------------------------------------------------------------------------------------------------------ 4


def test_4_every_option_is_checked_before_the_model_loads_and_anything_is_deleted(models_dir, tiny_train, tmp_path,
                                                                                   monkeypatch, capsys):
    out = tmp_path / "run"
    checkpoints = checkpoints_folder(out)
    train = tiny_train(models_dir / "diff", out, 3, "--save_steps", 1)
    assert interrupted_at_the_final_evaluation(train, monkeypatch) == 130
    kept = tree_hash(checkpoints)
    assert "checkpoint-2/model.safetensors" in kept
    (tmp_path / "short.txt").write_text("Too short for a block.")
    ran = outcome([*train, "--overwrite_output_dir", "--seed", "-1"], capsys)  # the case
    assert tree_hash(checkpoints) == kept and not out.exists()
    assert "seed must be an integer from 0 to 4294967295, got -1" in error_line(None, capsys, ran)
    with model_never_loads(monkeypatch):
        for extra, says in (
            (["--adam_beta1", "5"], "adam_beta1 must be a finite number at least 0 and below 1, got 5.0"),
            (["--adam_beta2", "nan"], "adam_beta2 must be a finite number at least 0 and below 1, got nan"),
            (["--dataset", tmp_path / "short.txt"], "fewer than one block of seq_len 32"),
        ):
            assert says in error_line([*train, "--overwrite_output_dir", *extra], capsys)
            assert tree_hash(checkpoints) == kept and not out.exists()
        with undeletable(checkpoints / "checkpoint-2" / "model.safetensors"):  # would be deleted half-way
            error = error_line([*train, "--overwrite_output_dir"], capsys)
            assert f"cannot delete the earlier checkpoint {checkpoints / 'checkpoint-2'}: " in error
    assert tree_hash(checkpoints) == kept and not out.exists()


# ------------------------------------------------------------------------------------------------------------ 5


def test_5_replacing_an_output_is_atomic(models_dir, tiny_train, tmp_path, monkeypatch, capsys):
    from modeling_diff_conversion import ConversionError
    from modeling_diff_conversion.output import atomic_output_dir

    llama, earlier = models_dir / "llama", tmp_path / "earlier"
    assert main(["convert", str(llama), str(earlier), "--no-verify"]) == 0
    before = tree_hash(tmp_path)
    undeletable_says = "immutable or append-only" if os.geteuid() == 0 else "read-only for this user"
    with undeletable(earlier / "config.json"), model_never_loads(monkeypatch):  # found before any work
        error = error_line(["convert", llama, earlier, "--overwrite_output_dir", "--no-verify"], capsys)
        assert f"{earlier} cannot be replaced: " in error and undeletable_says in error
        assert undeletable_says in error_line(
            [*tiny_train(models_dir / "diff", earlier, 20), "--overwrite_output_dir"], capsys)
    assert tree_hash(tmp_path) == before

    # the old output turns undeletable while the new one is written: nothing is swapped, the new one is kept beside
    with contextlib.ExitStack() as stack:
        replaced = f"{earlier} cannot be replaced: .*; it is unchanged, and the new output is at"
        with pytest.raises(ConversionError, match=replaced):
            with atomic_output_dir(earlier, force=True) as tmp:
                (tmp / "new.txt").write_text("the new output")
                stack.enter_context(undeletable(earlier / "config.json"))
        assert tree_hash(earlier) == {k[len("earlier/"):]: v for k, v in before.items() if k.startswith("earlier/")}
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith("earlier.new-")]
    assert (kept / "new.txt").read_text() == "the new output" and (kept / ".diff-transformer.json").is_file()

    # an output location that cannot be written is found before training, not after it
    locked = tmp_path / "locked"
    locked.mkdir()
    with undeletable(locked), model_never_loads(monkeypatch):  # nothing can be made in it
        assert f"cannot write in {locked}" in error_line(tiny_train(models_dir / "diff", locked / "out", 20), capsys)
    assert f"cannot write in {tmp_path / 'earlier' / 'config.json'}" in error_line(
        tiny_train(models_dir / "diff", earlier / "config.json" / "out", 20), capsys)
    assert not any(locked.iterdir()) and not (earlier / "config.json").is_dir()


# ------------------------------------------------------------------------------------------------------------ 6


def test_6_a_user_made_checkpoints_folder_is_never_deleted(models_dir, tiny_train, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    checkpoints = checkpoints_folder(out)
    checkpoints.mkdir()
    (checkpoints / "notes.txt").write_text("mine")
    before = tree_hash(tmp_path)
    ran = outcome(tiny_train(models_dir / "diff", out, 2), capsys)
    assert tree_hash(tmp_path) == before
    error = error_line(None, capsys, ran)
    assert f"{checkpoints} exists and was not made by diff-transformer train (it holds notes.txt)" in error
    with model_never_loads(monkeypatch):  # refused before any work
        assert "was not made by diff-transformer train" in error_line(tiny_train(models_dir / "diff", out, 2), capsys)

    # an empty folder the user made: used, and left where it was
    (checkpoints / "notes.txt").unlink()
    assert main(tiny_train(models_dir / "diff", out, 2)) == 0
    assert checkpoints.is_dir() and not any(checkpoints.iterdir())

    # the tool's own folder, where the user dropped a file between two runs: the run's checkpoints go, the file stays
    checkpoints.rmdir()
    shutil.rmtree(out)
    train = tiny_train(models_dir / "diff", out, 3, "--save_steps", 1)
    assert interrupted_at_the_final_evaluation(train, monkeypatch) == 130
    (checkpoints / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(train) == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == [".diff-transformer-checkpoints.json", "notes.txt"]
    assert f"note: kept {checkpoints}: it holds notes.txt, which this run did not write" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------ 7


def test_7_push_never_follows_a_symlink_out_of_the_folder(models_dir, tmp_path, monkeypatch, capsys):
    folder, outside = tmp_path / "pushme", tmp_path / "outside"
    shutil.copytree(models_dir / "diff", folder)
    outside.mkdir()
    (outside / "id_rsa").write_text("not for the Hub")
    (folder / "id_rsa_link").symlink_to("../outside/id_rsa")
    (folder / "outside_dir").symlink_to(outside)
    (folder / "same_config.json").symlink_to("config.json")  # a link that stays inside: uploaded
    capsys.readouterr()
    assert main(["push", str(folder), "me/tiny", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert f"   skipped  id_rsa_link: a symlink to {outside / 'id_rsa'}, outside the folder" in listed
    assert f"   skipped  outside_dir/: a symlink to {outside}, outside the folder" in listed
    calls = intercept_uploads(monkeypatch)
    assert main(["push", str(folder), "me/tiny"]) == 0
    assert calls["files"] == sorted([*(p.name for p in (models_dir / "diff").iterdir()), "same_config.json"])


# ------------------------------------------------------------------------------------------------------------ 8


def test_8_one_run_per_output_folder(models_dir, tiny_train, tmp_path, monkeypatch, capsys):
    from modeling_diff_conversion.output import lock_path, output_lock

    out = tmp_path / "run"
    with output_lock(out), model_never_loads(monkeypatch):  # another run holds it
        for argv in (tiny_train(models_dir / "diff", out, 2), ["convert", models_dir / "llama", out, "--no-verify"]):
            assert f"another diff-transformer run is writing {out} (pid {os.getpid()}): wait for it" in error_line(
                argv, capsys)
    assert not any(tmp_path.iterdir())

    # a run that died holding the lock: the kernel released it, its lock file stays, and the next run goes ahead
    script = (f"import fcntl, os, signal; fd = os.open({str(lock_path(out))!r}, os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9 and lock_path(out).exists()
    assert main(tiny_train(models_dir / "diff", out, 2)) == 0
    assert (out / "model.safetensors").is_file() and not lock_path(out).exists()


# ------------------------------------------------------------------------------------------------------------ 9


def test_9_inputs_and_outputs_are_compared_by_file_identity(models_dir, tmp_path, monkeypatch, capsys):
    source = tmp_path / "source"
    shutil.copytree(models_dir / "llama", source)
    os.link(source / "config.json", tmp_path / "hardlink.json")  # the input's config under another name
    before = tree_hash(source)
    ran = outcome(["eval", source, "--seq-len", 32, "--max-batches", 1, "--json", tmp_path / "hardlink.json"], capsys)
    assert tree_hash(source) == before
    assert f"is {source / 'config.json'}, a file of the input {source} (MODEL)" in error_line(None, capsys, ran)
    (tmp_path / "mnt").mkdir()
    with bind_mount(source, tmp_path / "mnt") as mounted:
        if mounted:  # the source itself, under another path
            for output, says in ((tmp_path / "mnt", "is the input"), (tmp_path / "mnt" / "o", "is inside the input")):
                assert says in error_line(["convert", source, output, "--overwrite_output_dir", "--no-verify"], capsys)
    assert tree_hash(source) == before
    if not mounted:
        pytest.skip("mount --bind needs root: the hard-link case ran")


# ----------------------------------------------------------------------------------------------------------- 10


def test_10_resuming_another_models_checkpoint_is_refused(models_dir, tiny_train, tmp_path, monkeypatch, capsys):
    from modeling_diff import DiffTransformerForCausalLM

    diff, llama, other = models_dir / "diff", models_dir / "llama", tmp_path / "other"
    shutil.copytree(diff, other)
    model = DiffTransformerForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # another model: the same architecture and tokenizer, other weights
    model.save_pretrained(other)
    assert interrupted_at_the_final_evaluation(tiny_train(diff, tmp_path / "a", 3, "--save_steps", 1), monkeypatch)
    checkpoint = checkpoints_folder(tmp_path / "a") / "checkpoint-2"
    resume = [*tiny_train(other, tmp_path / "b", 3), "--resume_from_checkpoint", checkpoint]
    error = error_line(resume, capsys)  # on the old code: trains the checkpoint's weights, saved as a fine-tune of B
    assert f"--resume_from_checkpoint {checkpoint} continues a run trained from {diff}, not from {other}" in error
    resume = [*tiny_train(llama, tmp_path / "b", 3), "--resume_from_checkpoint", checkpoint]
    with model_never_loads(monkeypatch):
        # a checkpoint that records no model (a plain Trainer's): its config says which model it belongs to
        unrecorded = tmp_path / "unrecorded"
        shutil.copytree(checkpoint, unrecorded)
        state = json.loads((unrecorded / "trainer_state.json").read_text())
        del state["stateful_callbacks"]["TrainedFrom"]
        (unrecorded / "trainer_state.json").write_text(json.dumps(state))
        error = error_line([*resume[:-1], unrecorded], capsys)
        assert "is a checkpoint of another model (model_type 'diff_transformer', " in error
    assert not (tmp_path / "b").exists()


def test_10_convert_refuses_shard_paths_that_leave_the_folder(models_dir, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(models_dir / "llama").save_pretrained(tmp_path / "other", max_shard_size="200KB")
    source = tmp_path / "source"
    shutil.copytree(tmp_path / "other", source)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (source / first).unlink()
    for elsewhere in (str(tmp_path / "other" / first), f"../other/{first}"):
        index["weight_map"] = {k: (elsewhere if v == first else v) for k, v in index["weight_map"].items()}
        (source / "model.safetensors.index.json").write_text(json.dumps(index))
        error = error_line(["convert", source, tmp_path / "out", "--no-verify"], capsys)
        assert f"names the shard {elsewhere!r}, outside its folder: shard names must be file names in" in error
        first = elsewhere
    assert not (tmp_path / "out").exists()


def test_10_generate_refuses_prompts_past_the_context_and_temperatures_that_cannot_sample(models_dir, tmp_path,
                                                                                          monkeypatch, capsys):
    says = "--temperature is -1.0: give a finite number >= 0"  # the old code decoded greedily instead
    assert says in error_line(["generate", models_dir / "diff", "--prompt", "hello", "--temperature", "-1"], capsys)
    with model_never_loads(monkeypatch):
        for extra, says in (
            (["--temperature", "nan"], "--temperature is nan"),
            (["--top-p", "0"], "--top_p is 0.0"),
            (["--max-new-tokens", "0"], "--max_new_tokens is 0"),
        ):
            assert says in error_line(["generate", models_dir / "diff", "--prompt", "hello", *extra], capsys)
    short = tmp_path / "short"
    shutil.copytree(models_dir / "diff", short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    assert "but the model's context is 16 (max_position_embeddings): shorten the prompt" in error_line(
        ["generate", short, "--prompt", "word " * 40], capsys)
    assert main(["generate", str(short), "--prompt", "def main", "--max-new-tokens", "40"]) == 0
    warning = capsys.readouterr().err
    assert "and --max_new_tokens 40 run past the model's context of 16 tokens: generating" in warning


def test_10_eval_refuses_zero_batches(models_dir, tmp_path, monkeypatch, capsys):
    # the old code loaded the model and divided by zero
    assert "max_batches is 0: give a positive number" in error_line(
        ["eval", models_dir / "diff", "--max-batches", "0"], capsys)
    with model_never_loads(monkeypatch):
        eval_batch = ["eval", models_dir / "diff", "--per_device_eval_batch_size", "0"]
        assert "batch_size is 0" in error_line(eval_batch, capsys)
    (tmp_path / "short.txt").write_text("Five words and no more.")
    assert "error: the texts hold 3 tokens, fewer than one window of 64" == error_line(
        ["eval", models_dir / "diff", "--dataset", tmp_path / "short.txt", "--seq-len", "64"], capsys)


def test_10_interruptions_say_what_they_left(models_dir, tiny_train, tmp_path, monkeypatch, capsys):
    from modeling_diff_conversion.convert import ShardWriter

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "add", interrupt)
        assert main(["convert", str(models_dir / "llama"), str(out), "--no-verify"]) == 130
    lines = capsys.readouterr().err.split("\n")
    assert f"interrupted: nothing was written; {out} is as it was before" in lines
    assert not any(tmp_path.iterdir())
    with monkeypatch.context() as patch:  # Ctrl-C mid-step, the Trainer's progress bar open
        patch.setattr(Trainer, "training_step", interrupt)
        assert main(tiny_train(models_dir / "diff", out, 3)) == 130
    assert "interrupted: nothing was written" in capsys.readouterr().err.split("\n")  # on a line of its own
    assert not any(tmp_path.iterdir())


def test_10_a_malformed_gguf_is_one_clean_line(tmp_path, capsys):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00cut short")
    for argv in (["convert", gguf, tmp_path / "out"], ["generate", gguf, "--prompt", "hi"]):
        error = error_line(argv, capsys)
        assert error.startswith("error: cannot read ") and "it is not a valid GGUF file (struct.error: " in error
        assert "error: error" not in error
    assert not (tmp_path / "out").exists()


def test_10_a_failed_convert_starts_its_error_on_its_own_line_and_leaves_no_parent_folders(models_dir, tmp_path,
                                                                                           capsys):
    source = tmp_path / "source"
    shutil.copytree(models_dir / "llama", source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))  # the MLP weights disagree
    capsys.readouterr()
    assert main(["convert", str(source), str(tmp_path / "a" / "b" / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "converting tensors" in err  # the progress bar ran, and the error comes after it, on its own line
    assert [line for line in err.split("\n") if "error:" in line][0].startswith("error: tensor ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no a/b/ left
