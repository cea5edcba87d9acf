"""The V1 question's settings (beside `v1_question.py`): its arms, their learning-rate grids, the runs it reuses.

Every arm trains on the text study's data and recipe (`config.py`: hidden 128, 4 layers, 700 steps of 16 × 256
tokens, AdamW, the paper's schedule), at equal parameters, and is measured by held-out perplexity. The text study's
settings are unchanged, so committed Llama runs of that study stay valid and are reused. What differs from it:

- every V1 arm uses Llama's RMSNorm epsilon (1e-6, the `LlamaConfig` default) for its block norms and its per-head
  norm, where `DiffTransformerConfig` defaults to 1e-5;
- every V1 arm states its weight-decay grouping (`ablations.DECAY_GROUPINGS`): the baseline's λ vectors and head-norm
  gains take no decay, like Llama's norm gains; the "decayed" ablation puts decay back on them;
- the 16-head arms keep the hidden size and the parameter count: twice the query heads at half the width (q/k
  width 8 instead of 16; V1's values 16 wide instead of 32).
"""

from dataclasses import dataclass, replace

from benchmarks.harness.report import RESULTS
from benchmarks.studies.text.config import PRESETS as TEXT_PRESETS

EPS = 1e-6  # Llama's RMSNorm epsilon, given to every V1 arm


@dataclass(frozen=True)
class Arm:
    """One model variant of the study."""

    model: str  # "llama" or "diff-v1"
    label: str
    head_factor: int = 1  # query heads = head_factor × the text study's heads, at hidden / (that) width
    ablation: str | None = None  # V1 only: one of ablations.ABLATIONS
    decay: str = "trainer"  # one of ablations.DECAY_GROUPINGS


ARMS = {
    "llama": Arm("llama", "Llama"),
    "v1": Arm("diff-v1", "V1", decay="exempt"),
    "llama-16h": Arm("llama", "Llama, 2× heads", head_factor=2),
    "v1-16h": Arm("diff-v1", "V1, 2× heads", head_factor=2, decay="exempt"),
    "v1-lambda-zero": Arm("diff-v1", "V1, λ fixed at 0", ablation="lambda-zero", decay="exempt"),
    "v1-no-head-norm": Arm("diff-v1", "V1, no head norm", ablation="no-head-norm", decay="exempt"),
    "v1-no-scale": Arm("diff-v1", "V1, no (1 − λ_init) scale", ablation="no-scale", decay="exempt"),
    "v1-decayed": Arm("diff-v1", "V1, decay on λ and head norm", decay="decayed"),
}
ABLATION_ARMS = ("v1-lambda-zero", "v1-no-head-norm", "v1-no-scale", "v1-decayed")  # at the best rate of "v1"
HEAD_ARMS = {"v1-16h": "v1", "llama-16h": "llama"}  # each at the best rate of its 8-head counterpart

# Minutes one run of an arm takes on one thread of the project's 2-core machine with nothing else running: 700
# training steps at the CPU time per step `v1_question --measure-costs` measured there (AMD EPYC guest, load average
# 0.5-0.9: Llama 0.526 s, V1 0.624, Llama with 16 heads of width 8 0.830, V1 with 16 heads 0.673, λ fixed at 0 0.610,
# no head norm 0.639, no (1 − λ_init) scale 0.652, decay on λ and the head norm 0.611), plus 0.3 min of data and
# perplexity. The text study's own runs went faster (Llama 0.42 s and V1 0.53 s per step, `train_seconds` in
# benchmarks/results/paper_effects/paper_effects.json), so these err long. The study orders its jobs by them (longest
# first) and prints its estimate from them.
RUN_MINUTES = {"llama": 6.4, "v1": 7.6, "llama-16h": 10.0, "v1-16h": 8.2, "v1-lambda-zero": 7.4,
               "v1-no-head-norm": 7.8, "v1-no-scale": 7.9, "v1-decayed": 7.4}


@dataclass(frozen=True)
class Plan:
    """What one run of the study trains beside its settings: the swept arms and their rates, how the sweep may be
    extended when a best rate lies on the edge of its grid, and the runs it may reuse."""

    sweeps: dict  # arm -> learning rates
    extend_up: float = 1.5  # a best rate on the top edge adds best × extend_up
    extend_down: float = 1 / 3  # a best rate on the bottom edge adds best × extend_down
    max_extensions: int = 2  # per arm
    reuse: tuple = ()  # results files of the text study whose Llama runs at identical settings are taken
    verify_reuse: bool = False  # re-train one reused run and report how far it lands from the saved one
    head_arms: bool = True  # train the 2×-heads arms


PRESETS = {  # the text study's settings, as the study runs them (`--seeds`, `--steps`, `--workers` change them)
    "default": replace(TEXT_PRESETS["default"], seeds=(0, 1, 2), workers=2, threads_per_worker=1),
    "smoke": replace(TEXT_PRESETS["smoke"], seeds=(0,), steps=3, workers=1, threads_per_worker=1),
}
PLANS = {
    "default": Plan(
        sweeps={"llama": (5e-4, 1.5e-3, 4.5e-3, 9e-3, 1.35e-2), "v1": (4.5e-3, 9e-3, 1.35e-2)},
        reuse=(RESULTS / "paper_effects" / "paper_effects_lr_sweep.json",),
    ),
    "smoke": Plan(sweeps={"llama": (1e-3, 3e-3), "v1": (1e-3, 3e-3)}, max_extensions=1, verify_reuse=True),
}
