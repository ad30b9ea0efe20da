"""The typed recipe schema.

Every key a recipe may set is declared here with its type and default, so OmegaConf rejects unknown
keys and wrong types (unlike TRL/Trainer, which silently ignore a misspelled key). Sections mirror
the pipeline: model -> lora -> data -> optim/schedule -> train -> eval -> track.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING  # noqa: F401  (re-exported for recipes that need a required value)

EMBEDDED_MODEL = "smollm2-135m-instruct"


@dataclass
class ModelConfig:
    name: str = EMBEDDED_MODEL           # embedded name, hub id or local directory
    scratch: Optional[dict[str, Any]] = None  # build randomly initialised from a config: {model_type: llama, ...}
    preset: Optional[str] = None         # a named scratch size (pythia-70m, llama-tiny, ...; ftlab.models.presets),
                                         # merged under model.scratch when the recipe loads
    tokenizer: Optional[str] = None      # defaults to the model's own (embedded tokenizer for scratch models)
    adapter: Optional[str] = None        # PEFT adapter directory loaded on top of the model
    revision: Optional[str] = None
    trust_remote_code: bool = False      # off unless a recipe turns it on
    attn_implementation: str = "sdpa"
    dtype: str = "fp32"                  # weights dtype: fp32 | bf16 | fp16 (autocast is train.precision)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    quantize: Optional[str] = None       # "nf4" = QLoRA (bitsandbytes, GPU only)
    last_layers: Optional[int] = None    # adapters on the last N transformer layers only (null: all); the
                                         # backward pass then stops at the lowest adapted layer


@dataclass
class DataConfig:
    task: str = "prontoqa"               # the task object that renders prompts/targets and scores answers
    task_options: dict[str, Any] = field(default_factory=dict)  # e.g. {proof: backward} for prontoqa
    train: Optional[str] = None          # JSONL path or HF datasets id
    train_split: str = "train"
    val: Optional[str] = None
    val_split: str = "validation"
    limit: Optional[int] = None          # use the first N training examples (dataset-size ablations)
    val_limit: Optional[int] = 64
    shots: int = 0
    chat_template: bool = True
    max_length: int = 512
    packing: bool = False                # pack examples into rows of max_length tokens, no cross-example attention
                                         # (pays off when examples are much shorter than max_length)
    group_by_length: bool = True
    max_bad_share: float = 0.05          # fail preflight when more examples than this are truncated/dropped
    filter_correct: bool = False         # keep only examples whose recorded model `response` the task scores
                                         # correct (seed 002; see ftlab.data.responses)


@dataclass
class OptimConfig:
    name: str = "adamw"                  # adamw | adamw_8bit | paged_adamw_8bit
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8                    # seed 003: 1e-8 gave NaNs on step 1-2 in bf16; 1e-6 is a recipe choice


@dataclass
class ScheduleConfig:
    name: str = "cosine"                 # constant | linear | cosine | cosine_with_min_lr
    warmup_steps: int = 0
    warmup_ratio: float = 0.0            # used when warmup_steps == 0
    min_lr: Optional[float] = None       # absolute floor for cosine_with_min_lr


@dataclass
class TrainConfig:
    method: str = "sft"
    epochs: float = 1.0
    max_steps: Optional[int] = None      # optimizer steps; overrides epochs
    token_budget: Optional[int] = None   # pretraining: predicted tokens to train on; sets the steps (wins over
                                         # epochs; train.max_steps still wins over it)
    max_minutes: Optional[float] = None  # wall-clock budget: stop cleanly after this many minutes
    batch_size: int = 8                  # examples (or packed rows) per micro-batch
    grad_accum: int = 1
    global_batch: Optional[int] = None   # examples (pairs, windows, GRPO completions) per optimizer step = batch_size x
                                         # grad_accum x processes; when set, grad_accum is computed from it at start
    dist_timeout: Optional[float] = None # seconds a collective may wait (the NCCL/gloo process-group time-out)
    sharding: str = "none"               # none | fsdp2: torch fully_shard over the processes (ftlab.train.fsdp)
    precision: str = "fp32"              # fp32 | bf16 | fp16 (autocast) | auto (see config.load.resolve_precision)
    fp16_init_scale: float = 65536.0     # first loss scale of the fp16 gradient scaler (halved on each overflow)
    grad_clip: Optional[float] = 1.0
    gradient_checkpointing: bool = False
    detach_prompt: bool = False          # SFT: prompt keys/values without gradient; backward covers responses only
                                         # (~1.5x faster steps on long prompts, an approximate gradient; see losses.py)
    log_every: int = 1
    eval_every: Optional[int] = None     # steps between validation loss/accuracy
    log_generations_every: Optional[int] = None
    save_every: Optional[int] = None
    keep_last: int = 2
    best_metric: Optional[str] = None    # keep best/ by this eval metric, e.g. eval/loss or eval/accuracy
                                         # (its direction: METRIC_DIRECTIONS)
    nan_policy: str = "stop"             # stop | skip
    resume: Optional[str] = None         # run directory or checkpoint directory; "latest" for the newest run
    save_merged: bool = False            # also export LoRA merged into the base weights
    save_final: bool = True


@dataclass
class DPOConfig:
    """train.method: dpo (see ftlab.train.dpo)."""

    beta: float = 0.1                    # strength of the pull towards the reference (higher: stay closer)
    loss_type: str = "sigmoid"           # sigmoid (DPO) | ipo | hinge
    label_smoothing: float = 0.0         # sigmoid only: conservative DPO (preference label flipped with this probability)
    nll_weight: float = 0.0              # + this x the chosen response's mean token NLL ("RPO")
    reference: Optional[str] = None      # reference model (an SFT model or adapter dir); null: the initial weights
    reference_cache: Optional[str] = None  # a run dir or reference_logps.pt to reuse (when its key matches)
    share_prompt: bool = True            # compute each pair's prompt once (sdpa attention); false: two sequences


@dataclass
class RewardConfig:
    """One GRPO reward (see ftlab.train.rewards): a built-in name, `module:function` or `file.py:function`."""

    fn: str = ""
    weight: float = 1.0
    name: Optional[str] = None           # as logged (rewards/<name>/mean); default: the function's name


@dataclass
class GRPOConfig:
    """train.method: grpo (see ftlab.train.grpo): online RL from rewards, G sampled completions per prompt.

    A step trains on train.batch_size x train.grad_accum x processes completions: that many / num_generations
    prompts, each sampled num_generations times."""

    num_generations: int = 8             # G: completions per prompt (a group); advantages are relative to it
    num_iterations: int = 1              # mu: optimizer steps on each round of completions (>1: PPO-style ratios)
    loss_type: str = "dapo"              # dapo | grpo | dr_grpo | bnpo (how token losses are averaged; TRL's)
    epsilon: float = 0.2                 # clip the ratio below at 1 - epsilon
    epsilon_high: Optional[float] = None # and above at 1 + epsilon_high (DAPO's clip-higher: 0.28); null: epsilon
    beta: float = 0.0                    # k3 KL penalty to the reference (0: no reference model held)
    scale_rewards: str = "group"         # group | batch | none: divide advantages by that std (none: Dr. GRPO)
    mask_truncated: bool = False         # completions cut at max_completion_length get no loss (DAPO)
    temperature: float = 1.0             # sampling temperature (> 0: greedy samples would all be the same)
    top_p: float = 1.0
    max_completion_length: int = 256     # new tokens per completion
    generation_batch_size: int = 64      # row slots of the generation engine
    rewards: list[RewardConfig] = field(default_factory=list)  # empty: the task's correctness
    log_completions_every: Optional[int] = 10  # print a group of completions every N steps (all: completions/)
    engine: str = "hf"                   # hf | vllm: vLLM in the training process (colocate), weights pushed each
                                         # round (GPU + vllm; falls back to hf with a warning elsewhere)
    vllm: dict[str, Any] = field(default_factory=dict)  # extra vllm.LLM arguments (gpu_memory_utilization, dtype, ...)
    vllm_sync_timeout: float = 300.0     # seconds a weight push to vLLM may take before the run fails in one line


@dataclass
class PretrainConfig:
    """train.method: pretrain (see ftlab.train.pretrain): random windows of a corpus made by `ftlab prepare-corpus`."""

    corpus: Optional[str] = None         # the corpus directory (tokens.bin, index.jsonl, splits.json, meta.json)
    seq_len: int = 128                   # tokens predicted per window (a window is seq_len + 1 tokens of one document)
    categories: Optional[list[str]] = None  # train on these categories; null: num_categories of them, or all
    num_categories: Optional[int] = None # K: the first K of a seeded shuffle of the eligible categories (nested in K)
    category_seed: Optional[int] = None  # seed of that shuffle; null: the recipe's seed
    min_category_docs: int = 1           # eligible for the K choice: at least this many usable training documents
    train_split: str = "train"
    val_split: str = "val"
    val_windows: int = 256               # fixed validation windows (eval/loss, eval/bits_per_byte; in-context loss)
    peak_tflops: Optional[float] = None  # declared peak per device for MFU (e.g. 989 for an H100/H200 in bf16)
    spike_factor: Optional[float] = None # a loss above this x the running median of recent losses is a spike
    spike_window: int = 50               # steps in that running median
    spike_action: str = "log"            # log | skip (skip: no optimizer update for that step)
    icl_early: int = 50                  # in-context-learning score = loss at icl_late - loss at icl_early
    icl_late: int = 500                  # (Olsson et al. 2022; clamped to the window length)


@dataclass
class SweepConfig:
    """`ftlab sweep` (ftlab.runs.sweep): one run per point of the grid's product x seeds, in sequence, resumable."""

    verb: str = "train"                  # what every point runs: train (SFT, DPO, GRPO, pretraining) | eval | loop
    grid: dict[str, Any] = field(default_factory=dict)  # dotted key -> its values, e.g. {data.limit: [128, 256]}
    seeds: Optional[list[int]] = None    # every grid point once per seed (null: the recipe's seed)
    num_categories: list[int] = field(default_factory=list)   # K values: shorthand for grid pretrain.num_categories
    dir: Optional[str] = None            # the sweep directory (re-running with it resumes); null: runs/sweep/<stamp>_<name>


@dataclass
class LoopConfig:
    """`ftlab loop`: SOKRATES's OaK loop (ftlab.loops.oak). SFT on optionized traces (data.task: sokrates), then
    per iteration: sample -> verify -> pairs -> [option head] -> DPO from the previous policy -> held-out eval
    (loop.optimizer: grpo: GRPO from the previous policy on the problems -> held-out eval)."""

    dir: Optional[str] = None            # the loop directory (re-running resumes it); null: <output_dir>/loop/<name>
    iterations: int = 2                  # OaK iterations after SFT (may be raised to continue a finished loop)
    sft: bool = True                     # stage 0: SFT on data.train from model.*; false: start from model.* as is
    sft_overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys for the SFT stage only
    dpo_overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys for the DPO stages (lr, epochs, beta)
    optimizer: str = "dpo"               # dpo: traces -> pairs -> DPO; grpo: GRPO on the problems, rewarded by the
                                         # verifier's step validity and the answer (ftlab.loops.oak)
    grpo_overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys for the GRPO stages (lr, steps,
                                         # grpo.rewards and their weights, grpo.num_generations, ...)
    problems: Optional[str] = None       # problems to sample on; null: data.train
    max_problems: Optional[int] = None   # the first N of them (the seed: 1,500)
    heldout: Optional[str] = None        # held-out problems for evaluation; null: data.val
    heldout_limit: Optional[int] = None
    samples: int = 8                     # traces per problem and iteration (the seed: 8, cut to 2 for time)
    temperature: float = 0.7             # the seed: greedy decoding gave identical traces, hence no pairs
    top_p: float = 1.0
    max_new_tokens: int = 384
    batch_size: int = 64                 # generation row slots (HF engine)
    engine: str = "hf"                   # hf | vllm (GPU; falls back to hf with a warning elsewhere)
    vllm: dict[str, Any] = field(default_factory=dict)  # extra vllm.LLM arguments (gpu_memory_utilization, ...)
    constrained: bool = False            # constrained decoding of Action lines (hf engine only)
    max_pairs_per_problem: Optional[int] = 4   # per kind (outcome, prefix, step); null: all
    outcome_pairs: bool = True           # whole traces: each rejected one against a chosen one
    prefix_pairs: bool = True            # also pairs that share the steps before the first invalid one
    step_pairs: bool = False             # one step: the first invalid one against a chosen trace's step there,
                                         # both cut after it (Step-DPO; see sokrates/pairs.py)
    gold_chosen: bool = False            # a problem without a valid sample takes its optionized gold proof as chosen
    eval_samples: int = 4                # sampled traces per held-out problem for pass@k (0: greedy only)
    pass_k: list[int] = field(default_factory=lambda: [1, 4])
    option_head: bool = False            # train and calibrate a step-validity head on the sampled traces
    head_epochs: int = 200               # full-batch logistic-regression steps
    head_lr: float = 0.05
    head_holdout: float = 0.2            # share of problems whose steps calibrate the head
    calibration_bins: int = 10


@dataclass
class EvalConfig:
    task: Optional[str] = None           # defaults to data.task
    source: Optional[str] = None         # JSONL path or HF datasets id; defaults to data.val
    split: str = "test"
    offset: int = 0                      # skip the first N rows (e.g. the rows a setting was chosen on)
    limit: Optional[int] = None
    shots: int = 0
    chat_template: bool = True
    engine: str = "hf"                   # hf | vllm
    batch_size: int = 64                 # generation row slots (see generate/base.py)
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_line_repeats: int = 0           # stop a row when one of its lines (digits ignored) occurs this often; 0 = off
    precision: str = "fp32"              # fp32 | bf16 autocast during generation | auto


@dataclass
class TrackConfig:
    wandb: bool = False
    tensorboard: bool = False
    project: str = "ftlab"


@dataclass
class QuickstartConfig:
    """The main job: generated PrOntoQA training data, held-out evaluation before and after SFT."""

    train_examples: int = 600
    train_hops: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    more_queries: int = 0           # other claims about each training context, trained as follow-up turns
    lookups: int = 0                # "which sentences mention P?" drills per training context (follow-up turns)
    data_seed: int = 1234
    # Authors' files (used when the folder exists), else ftlab-generated held-out problems.
    heldout_dir: str = "../shared/data/prontoqa"   # relative to the working directory
    heldout_hops: list[int] = field(default_factory=lambda: [1, 3, 5])
    heldout_sizes: list[int] = field(default_factory=lambda: [50, 100, 50])  # problems per entry of heldout_hops
    heldout_offset: int = 0         # rows of each authors' file skipped first (e.g. rows set aside for choices)
    heldout_seed: int = 987654


@dataclass
class Recipe:
    name: str = "run"
    kind: str = "sft"                    # run-directory group: runs/<kind>/...
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    quickstart: QuickstartConfig = field(default_factory=QuickstartConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    # Free-form section for job-specific settings (e.g. the quickstart's data generator and held-out sets).
    job: dict[str, Any] = field(default_factory=dict)


CHOICES = {
    "model.dtype": ("fp32", "bf16", "fp16"),
    "lora.quantize": (None, "nf4"),
    "optim.name": ("adamw", "adamw_8bit", "paged_adamw_8bit"),
    "schedule.name": ("constant", "linear", "cosine", "cosine_with_min_lr"),
    "train.method": ("sft", "dpo", "pretrain", "grpo"),
    "dpo.loss_type": ("sigmoid", "ipo", "hinge"),
    "grpo.loss_type": ("dapo", "grpo", "dr_grpo", "bnpo"),
    "grpo.scale_rewards": ("group", "batch", "none"),
    "train.precision": ("fp32", "bf16", "fp16", "auto"),
    "train.nan_policy": ("stop", "skip"),
    "train.sharding": ("none", "fsdp2"),
    "pretrain.spike_action": ("log", "skip"),
    "eval.engine": ("hf", "vllm"),
    "loop.engine": ("hf", "vllm"),
    "loop.optimizer": ("dpo", "grpo"),
    "sweep.verb": ("train", "eval", "loop"),
    "grpo.engine": ("hf", "vllm"),
    "eval.precision": ("fp32", "bf16", "fp16", "auto"),
}

# Numeric ranges, checked right after a recipe loads (`ftlab.config.load.check_ranges`), before any
# model or data: a value outside its range is a one-line error naming the key, never silently
# different work (eval.limit=0 used to score one row, train.save_every=0 to save nothing).
# Specs: ">= 1", "> 0", "[0, 1]", "[0, 1)", "(0, 1]". A list value is checked element by element.
# A null is always allowed for Optional keys; NULL_MEANS says what null does, for the message.
RANGES: dict[str, str] = {
    "seed": ">= 0",                      # numpy (via accelerate's set_seed) rejects negative seeds
    "lora.r": ">= 1",
    "lora.alpha": "> 0",
    "lora.dropout": "[0, 1)",
    "lora.last_layers": ">= 1",
    "data.limit": ">= 1",
    "data.val_limit": ">= 1",
    "data.shots": ">= 0",
    "data.max_length": ">= 1",
    "data.max_bad_share": "[0, 1]",
    "optim.lr": "> 0",
    "optim.weight_decay": ">= 0",
    "optim.betas": "[0, 1)",
    "optim.eps": "> 0",
    "schedule.warmup_steps": ">= 0",
    "schedule.warmup_ratio": "[0, 1]",
    "schedule.min_lr": ">= 0",
    "train.epochs": "> 0",
    "train.max_steps": ">= 1",
    "train.token_budget": ">= 1",
    "train.max_minutes": "> 0",
    "train.batch_size": ">= 1",
    "train.fp16_init_scale": "> 0",
    "train.grad_accum": ">= 1",
    "train.global_batch": ">= 1",
    "train.dist_timeout": "> 0",
    "train.grad_clip": "> 0",
    "train.log_every": ">= 1",
    "train.eval_every": ">= 1",
    "train.log_generations_every": ">= 1",
    "train.save_every": ">= 1",
    "train.keep_last": ">= 0",
    "dpo.beta": "> 0",
    "dpo.label_smoothing": "[0, 0.5)",
    "dpo.nll_weight": ">= 0",
    "grpo.num_generations": ">= 2",
    "grpo.num_iterations": ">= 1",
    "grpo.epsilon": "> 0",
    "grpo.epsilon_high": "> 0",
    "grpo.beta": ">= 0",
    "grpo.temperature": "> 0",
    "grpo.top_p": "(0, 1]",
    "grpo.max_completion_length": ">= 1",
    "grpo.generation_batch_size": ">= 1",
    "grpo.log_completions_every": ">= 1",
    "grpo.vllm_sync_timeout": "> 0",
    "pretrain.seq_len": ">= 1",
    "pretrain.num_categories": ">= 1",
    "pretrain.category_seed": ">= 0",
    "pretrain.min_category_docs": ">= 1",
    "pretrain.val_windows": ">= 1",
    "pretrain.peak_tflops": "> 0",
    "pretrain.spike_factor": "> 1",
    "pretrain.spike_window": ">= 1",
    "pretrain.icl_early": ">= 0",
    "pretrain.icl_late": ">= 1",
    "sweep.seeds": ">= 0",
    "sweep.num_categories": ">= 1",
    "eval.offset": ">= 0",
    "eval.limit": ">= 1",
    "eval.shots": ">= 0",
    "eval.batch_size": ">= 1",
    "eval.max_new_tokens": ">= 1",
    "eval.stop_line_repeats": ">= 0",
    "eval.temperature": ">= 0",
    "eval.top_p": "(0, 1]",
    "eval.n": ">= 1",
    "quickstart.train_examples": ">= 1",
    "quickstart.train_hops": ">= 1",
    "quickstart.more_queries": ">= 0",
    "quickstart.lookups": ">= 0",
    "quickstart.data_seed": ">= 0",
    "quickstart.heldout_hops": ">= 1",
    "quickstart.heldout_sizes": ">= 1",
    "quickstart.heldout_offset": ">= 0",
    "quickstart.heldout_seed": ">= 0",
    "loop.iterations": ">= 0",
    "loop.max_problems": ">= 1",
    "loop.heldout_limit": ">= 1",
    "loop.samples": ">= 1",
    "loop.temperature": ">= 0",
    "loop.top_p": "(0, 1]",
    "loop.max_new_tokens": ">= 1",
    "loop.batch_size": ">= 1",
    "loop.max_pairs_per_problem": ">= 1",
    "loop.eval_samples": ">= 0",
    "loop.pass_k": ">= 1",
    "loop.head_epochs": ">= 1",
    "loop.head_lr": "> 0",
    "loop.head_holdout": "(0, 1)",
    "loop.calibration_bins": ">= 1",
}

# Which way each evaluation metric improves, for train.best_metric. Matched on the name after "eval/" by
# prefix, so eval/accuracy_strict is an accuracy and eval/bits_per_byte (pretraining's headline) goes down.
METRIC_DIRECTIONS: dict[str, str] = {
    "accuracy": "higher", "parse_rate": "higher",
    "loss": "lower", "bits_per_byte": "lower", "perplexity": "lower", "ece": "lower", "mae": "lower",
    "wasserstein": "lower",
}


def metric_direction(name: str) -> str | None:
    """"higher" or "lower" is better for this metric (with or without "eval/"); None for an unknown one."""
    key = name.removeprefix("eval/")
    for prefix, direction in METRIC_DIRECTIONS.items():
        if key == prefix or key.startswith(prefix + "_"):
            return direction
    return None


NULL_MEANS: dict[str, str] = {
    "data.limit": "every training example",
    "data.val_limit": "every validation example",
    "schedule.min_lr": "no floor",
    "train.max_steps": "train for train.epochs",
    "train.max_minutes": "no time limit",
    "train.token_budget": "train for train.epochs",
    "pretrain.num_categories": "every category",
    "pretrain.category_seed": "the recipe's seed",
    "pretrain.peak_tflops": "no MFU",
    "pretrain.spike_factor": "no spike detection",
    "train.grad_clip": "no clipping",
    "train.global_batch": "train.batch_size x train.grad_accum x processes",
    "train.dist_timeout": "torch's default time-out",
    "grpo.epsilon_high": "grpo.epsilon",
    "grpo.log_completions_every": "never printed",
    "train.eval_every": "no periodic validation",
    "train.log_generations_every": "no generation logs",
    "train.save_every": "no intermediate checkpoints",
    "eval.limit": "every row after eval.offset",
    "loop.max_problems": "every problem",
    "loop.heldout_limit": "every held-out problem",
    "loop.max_pairs_per_problem": "every pair",
}
