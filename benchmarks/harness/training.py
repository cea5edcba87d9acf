"""The training studies' one recipe, for every model: the 🤗 Trainer with AdamW, the paper's warm-up then linear
decay (`paper_schedule`), gradient clipping, fp32 (`study_trainer`); and how a run shows its progress on the study's
bar (`reporter`, `progress_callback`)."""

from __future__ import annotations


def paper_schedule(optimizer, steps: int, warmup: int, min_lr_ratio: float):
    """Linear warmup for `warmup` steps, then linear decay to `min_lr_ratio` of the peak at `steps` (the paper's)."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 1.0 - (1.0 - min_lr_ratio) * progress

    return LambdaLR(optimizer, factor)


def study_trainer(model, data, settings, learning_rate: float, seed: int, output_dir: str, callbacks: list,
                  quiet: bool, sequential: bool = False, decay_parameters=None):
    """The 🤗 Trainer with the studies' one recipe, for any model: AdamW with `settings.adam_betas` and
    `settings.weight_decay`, gradient clipping 1.0, the paper's schedule (`paper_schedule`), fp32, `settings.steps`
    steps of `settings.batch_size`. `sequential` feeds the data in its stored order instead of shuffled by `seed`.

    `decay_parameters`, when given, is a callable(model, the Trainer's own names) -> the names of the parameters
    that take weight decay, in place of the Trainer's grouping (`Trainer.get_decay_parameter_names`).
    """
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    class StudyTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            if sequential:
                return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
            return super()._get_train_sampler(train_dataset)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = paper_schedule(optimizer or self.optimizer, num_training_steps,
                                                   max(1, round(settings.warmup_fraction * num_training_steps)),
                                                   settings.min_lr_ratio)
            return self.lr_scheduler

        def get_decay_parameter_names(self, model) -> list[str]:
            names = super().get_decay_parameter_names(model)
            return names if decay_parameters is None else decay_parameters(model, names)

    args = TrainingArguments(
        output_dir=output_dir, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=learning_rate, adam_beta1=settings.adam_betas[0], adam_beta2=settings.adam_betas[1],
        weight_decay=settings.weight_decay, max_grad_norm=1.0, logging_steps=max(1, settings.steps // 20),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=quiet, dataloader_num_workers=0,
    )
    return StudyTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def reporter(queue, tag: str):
    """The `report(kind, value)` through which a job shows its progress on the study's bar (nothing without a queue:
    a job run on its own)."""

    def report(kind, value=None):
        if queue is not None:
            queue.put((tag, kind, value))

    return report


def progress_callback(report):
    """A TrainerCallback that reports every finished step and every logged loss through `report(kind, value)`."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report("step", 1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                report("loss", logs["loss"])

    return Progress()
