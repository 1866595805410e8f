"""GRPO stage: group-relative policy optimisation of the SFT adapter with the brand rewards.

Reads ``<run>/data/grpo_train.jsonl`` (conversational ``prompt`` + ``product_id`` +
``content_type``) and the adapter of ``<run>/<grpo_from>``; writes ``<run>/grpo``. Rewards are
the plain functions of ``brandcopy.rewards`` named in ``grpo_reward_weights`` (a zero weight
leaves a reward out). With ``grpo_use_vllm`` generation runs in vLLM (colocated on the training
GPU; with Unsloth's fast_inference the weights are shared).
"""

from pathlib import Path

# trl.<Name> is looked up when a stage runs, not bound at import: importing unsloth (first, on the
# unsloth backend) rebinds trl's trainers and configs to its patched classes.
import trl

from brandcopy.backend import prepare_backend, vllm_problem
from brandcopy.config import ConfigError, GRPOStageConfig
from brandcopy.judge import judge_config
from brandcopy.llm import LLMConfig
from brandcopy.modeling import fix_special_tokens, load_adapter_model
from brandcopy.rewards import JUDGE_CONCURRENCY, REWARD_FUNCTIONS, cached_judge_client, judge_spec
from brandcopy.run import MetricsCallback, begin_stage, data_file, finish_stage, require_stage, stage_dir
from brandcopy.train.common import changed_params, load_split, param_fingerprint, save_adapter, trl_config

__all__ = ["GRPOStageConfig", "run_grpo", "grpo_config", "active_rewards", "judge_endpoint"]


def active_rewards(cfg: GRPOStageConfig) -> tuple[list, list[float]]:
    """The reward functions with a non-zero weight, and their weights, in config order."""
    names = [name for name, weight in cfg.grpo_reward_weights.items() if weight]
    if not names:
        raise ConfigError("grpo_reward_weights: every weight is zero; GRPO needs at least one reward")
    return [REWARD_FUNCTIONS[n] for n in names], [cfg.grpo_reward_weights[n] for n in names]


def check_batch(cfg: GRPOStageConfig) -> None:
    """GRPO scores completions in groups: a batch must hold whole groups.

    Raises:
        ConfigError: ``grpo_per_device_train_batch_size * grpo_gradient_accumulation_steps`` is not a
            multiple of ``grpo_num_generations``, or fewer than 2 generations (no group to compare).
    """
    if cfg.grpo_num_generations < 2:
        raise ConfigError(f"grpo_num_generations={cfg.grpo_num_generations}: GRPO needs at least 2 per prompt")
    batch, accumulation = cfg.grpo_per_device_train_batch_size, cfg.grpo_gradient_accumulation_steps
    if (batch * accumulation) % cfg.grpo_num_generations:
        raise ConfigError(
            f"grpo_per_device_train_batch_size ({batch}) x grpo_gradient_accumulation_steps ({accumulation}) must be "
            f"a multiple of grpo_num_generations ({cfg.grpo_num_generations})"
        )


def check_vllm(cfg: GRPOStageConfig) -> None:
    """With ``grpo_use_vllm``, vLLM must be installed in a version Unsloth accepts; checked before any weights load.

    Raises:
        ConfigError: vLLM is missing or rejected; the message names the install and ``grpo_use_vllm=false``.
    """
    problem = vllm_problem() if cfg.grpo_use_vllm else None
    if problem is not None:
        raise ConfigError(problem)


def grpo_config(cfg: GRPOStageConfig) -> "trl.GRPOConfig":
    """The TRL GRPOConfig for a stage config (``grpo_num_generations``, ``grpo_use_vllm``, ... passed through)."""
    _, weights = active_rewards(cfg)
    return trl_config(trl.GRPOConfig, cfg, reward_weights=weights)  # TRL's list, in the order of the reward functions


def fast_inference_share(cfg: GRPOStageConfig) -> float | None:
    """With Unsloth and vLLM, the GPU share for Unsloth's fast_inference engine (weights shared with training).

    Plain TRL (backend hf) starts its own colocated vLLM from ``GRPOConfig.use_vllm`` instead.
    """
    return cfg.grpo_vllm_gpu_memory_utilization if cfg.grpo_use_vllm and cfg.backend == "unsloth" else None


def grpo_dataset(cfg: GRPOStageConfig, split: str, judge: LLMConfig | None = None):
    """The GRPO prompts with the columns the rewards read (``brand``; ``reward_model`` and ``judge`` if used).

    ``judge`` is the judge reward's endpoint; None: ``judge_endpoint(cfg)``.
    """
    rows = load_split(cfg.data_path, "grpo", split)
    rows = rows.add_column("brand", [cfg.brand] * len(rows))
    if cfg.grpo_reward_weights.get("reward_model"):
        reward_dir = require_stage(cfg.run_dir, "reward", "grpo's reward_model reward")
        rows = rows.add_column("reward_model", [str(reward_dir)] * len(rows))
    if cfg.grpo_reward_weights.get("judge"):
        spec = judge_spec(judge or judge_endpoint(cfg), cfg.out_dir / "judge")
        cached_judge_client(spec)  # a missing key variable or a bad URL fails here, before training starts
        rows = rows.add_column("judge", [spec] * len(rows))
    return rows


def judge_endpoint(cfg: GRPOStageConfig) -> LLMConfig:
    """The judge reward's endpoint from the ``grpo_judge_*`` keys; answers are cached in
    ``<output_root>/llm-cache`` and recorded in ``<run>/grpo/judge``."""
    return judge_config(cfg.grpo_judge_model, cfg.grpo_judge_base_url, cfg.grpo_judge_api_key_env, JUDGE_CONCURRENCY,
                        str(Path(cfg.output_root) / "llm-cache"))


def run_grpo(cfg: GRPOStageConfig, callbacks: list | tuple = (), judge: LLMConfig | None = None) -> Path:
    """Train the GRPO adapter from ``<run>/<grpo_from>`` and write ``<run>/grpo``.

    Args:
        cfg: The stage config.
        callbacks: Extra ``transformers.TrainerCallback`` objects.
        judge: The judge reward's endpoint, serving for the whole training (only read when the
            judge reward has a weight); None: the ``grpo_judge_*`` keys (``judge_endpoint``).

    Returns:
        The stage folder.

    Raises:
        ConfigError: Batch sizes that do not hold whole groups, no reward with a weight, or
            ``grpo_use_vllm`` without a usable vLLM.
        StageInputError: The starting stage (or the reward stage, when its reward is used) is
            missing or unfinished, or the prompt file is missing or empty.
    """
    prepare_backend(cfg.backend, require_cuda=cfg.require_cuda)  # GPU checks; unsloth before trl
    check_batch(cfg)
    check_vllm(cfg)
    grpo_config(cfg)  # the TRL arguments (a preset's passed-through keys too) checked before a model loads
    funcs, _ = active_rewards(cfg)
    train = grpo_dataset(cfg, "train", judge)
    source = require_stage(cfg.run_dir, cfg.grpo_from, "grpo")
    resume_from = begin_stage(cfg)
    model, tokenizer = load_adapter_model(source, trainable=True, **cfg.load_options,
                                          gradient_checkpointing=cfg.gradient_checkpointing,
                                          vllm_gpu_memory_utilization=fast_inference_share(cfg))
    fix_special_tokens(model, tokenizer)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=funcs, args=grpo_config(cfg), train_dataset=train,
                          processing_class=tokenizer,
                          callbacks=[MetricsCallback(cfg.out_dir / "metrics.jsonl"), *callbacks])
    before = param_fingerprint(trainer.model)
    result = trainer.train(resume_from_checkpoint=resume_from)
    changed = changed_params(before, trainer.model)
    save_adapter(trainer.model, tokenizer, cfg.out_dir)
    files = [data_file(cfg.data_path, "grpo", "train")]
    extra = {"train_loss": result.training_loss, "global_step": result.global_step, "resumed_from": resume_from,
             "started_from": str(stage_dir(cfg.run_dir, cfg.grpo_from)), "changed_tensors": len(changed),
             "rewards": [f.__name__ for f in funcs]}
    keys = ("reward", *(f"rewards/{f.__name__}/mean" for f in funcs), "kl", "completions/mean_length")
    return finish_stage(cfg, files, keys, extra)
