"""One run of the text studies (one model, learning rate and seed): train with the studies' recipe, then measure."""

import time
from pathlib import Path

from benchmarks.harness.models import init_model, parameter_count
from benchmarks.harness.training import progress_callback, reporter, study_trainer
from benchmarks.studies.text.config import Settings, model_configs
from benchmarks.studies.text.data import corpus, train_tokenizer, training_sequences


def load_tokenizer(path: str):
    """The study's tokenizer, saved once by the parent process (`tokenizer.json`)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=path, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def train(model, tokenizer, settings: Settings, seed: int, scratch: str, report,
          decay_parameters=None) -> tuple[dict, list[str]]:
    """Train `model` on the seed's sequences with the study recipe; returns the training record of the run and the
    names of the parameters that took weight decay (`study_trainer`'s `decay_parameters` sets them)."""
    from transformers.trainer_callback import PrinterCallback

    train_texts, _ = corpus()
    data = training_sequences(tokenizer, train_texts, settings, seed)
    started = time.time()
    trainer = study_trainer(model, data, settings, settings.learning_rate, seed, scratch, [progress_callback(report)],
                            quiet=True, decay_parameters=decay_parameters)
    trainer.remove_callback(PrinterCallback)  # progress goes to the study's own bar
    history = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {"train_loss_last": losses[-1] if losses else None, "train_loss_curve": losses,
              "train_seconds": time.time() - started,
              "train_tokens": settings.steps * settings.batch_size * settings.seq_len,
              "train_loss_mean": history.training_loss}
    return record, trainer.get_decay_parameter_names(model)


def measure(model, tokenizer, settings: Settings, seed: int, perplexity_only: bool = False) -> dict:
    """Held-out perplexity, and unless `perplexity_only` the needle grid, the attention shares and the outliers."""
    from modeling_diff_eval.tasks import run_task

    started = time.time()
    model.eval()
    results = {"ppl": run_task("ppl", model, tokenizer, seq_len=settings.seq_len, progress=False)["perplexity"]}
    if not perplexity_only:
        needle = {}
        for n in settings.eval_needles:
            queries = 1 if n == 1 else 2  # paper Table 2: R = 1 for N = 1, R = 2 otherwise
            for length in settings.eval_context_lens:
                out = run_task("needle", model, tokenizer, needles=n, context_len=length, queries=queries,
                               samples=settings.eval_samples, seed=1000 + seed, progress=False)
                needle[f"{n}/{length}"] = out["accuracy"]
        results["needle"] = needle
        noise = run_task("attention-noise", model, tokenizer, needles=1, context_len=settings.noise_context_len,
                         samples=settings.noise_samples, seed=2000 + seed, progress=False)
        results["attention"] = {k: noise[k] for k in ("answer_share", "noise_share", "answer_to_noise", "maps")}
        outliers = run_task("outliers", model, tokenizer, seq_len=settings.seq_len,
                            max_batches=settings.outlier_batches, progress=False)
        results["outliers"] = {kind: {k: outliers[kind][k] for k in ("top1_ratio", "top10_ratio", "top1", "median")}
                               for kind in ("attention_logits", "hidden_states")}
    results["eval_seconds"] = time.time() - started
    return results


def prepare(settings: Settings, scratch: Path) -> tuple[str, dict]:
    """Train the study's tokenizer (saved for the workers) and check the three models' parameters are equal within
    2%; returns the tokenizer file and the parameter counts."""
    train_texts, _ = corpus()
    tokenizer = train_tokenizer(train_texts, settings.vocab_size)
    tokenizer_file = str(scratch / "tokenizer.json")
    tokenizer.backend_tokenizer.save(tokenizer_file)
    params = {name: parameter_count(init_model(config, 0))
              for name, config in model_configs(settings, len(tokenizer)).items()}
    spread = max(params.values()) / min(params.values()) - 1
    assert spread <= 0.02, f"parameter counts differ by {spread:.1%}: {params}"
    print("parameters: " + ", ".join(f"{m} {p:,}" for m, p in params.items()) + f" (spread {spread:.2%})")
    return tokenizer_file, params


def run_job(job: dict, queue=None) -> dict:
    """Train `job["model"]` with `job["seed"]` and run every measurement; returns a JSON-serialisable dict."""
    import torch

    settings = Settings(**job["settings"])
    torch.set_num_threads(settings.threads_per_worker)
    name, seed = job["model"], job["seed"]
    report = reporter(queue, f"{name} seed {seed}")
    tokenizer = load_tokenizer(job["tokenizer_file"])
    model = init_model(model_configs(settings, len(tokenizer))[name], seed)
    record, _ = train(model, tokenizer, settings, seed, job["scratch"], report)
    report("phase", "eval")
    result = {"model": name, "seed": seed, "learning_rate": settings.learning_rate,
              "parameters": parameter_count(model), **record, **measure(model, tokenizer, settings, seed)}
    report("done", None)
    return result
