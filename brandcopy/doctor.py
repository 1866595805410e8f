"""``brandcopy doctor``: the environment, and a VRAM plan for a preset on a given card.

The plan is arithmetic on the model's shape and the preset's settings; docs/vram.md derives each
term and compares the totals with Unsloth's published figures. Nothing here loads a model.
"""

import importlib.util
import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from brandcopy.config import (
    DPOStageConfig,
    GRPOStageConfig,
    RewardStageConfig,
    SFTStageConfig,
    load_stage_config,
)

GIB = 1024**3
NF4_BYTES = 0.5 + 0.127 / 8  # 4-bit weight + double-quantized absmax (bitsandbytes, block 64)
OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS workspace, allocator fragmentation


@dataclass
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# config.json values of the models the presets name, for when the model is not on local disk.
KNOWN_SHAPES = {
    "qwen2.5-0.5b-instruct": ModelShape(896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b-instruct": ModelShape(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-3b-instruct": ModelShape(2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b-instruct": ModelShape(3584, 18944, 28, 28, 4, 152064, False),
}


@dataclass
class EnvReport:
    """What the machine offers: Python, torch, CUDA, GPU, and the optional GPU packages."""

    python: str
    platform: str
    torch: str
    cuda_available: bool
    cuda_version: str | None
    gpu_name: str | None
    gpu_total_gib: float | None
    bf16_supported: bool
    packages: dict[str, str | None]


@dataclass
class VRAMPlan:
    """Estimated peak GPU memory per stage (GiB) for one preset on one card."""

    model: str
    gpu_gib: float
    params_b: float
    weights_16bit_gib: float
    weights_4bit_gib: float
    weights_gib: float
    lora_params_m: float
    lora_state_gib: float
    activations_gib: dict[str, float]
    activations_no_gc_gib: dict[str, float]
    grpo_generation_gib: float
    grpo_vllm_reserve_gib: float
    stage_peak_gib: dict[str, float]
    residents_gib: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {what: GiB}
    warnings: list[str] = field(default_factory=list)


@dataclass
class DoctorReport:
    """The environment, what stops a preset from running here, and (with a preset) its VRAM plan."""

    env: EnvReport
    plan: VRAMPlan | None
    problems: list[str] = field(default_factory=list)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> EnvReport:
    """Describe the environment without importing unsloth or vllm (they patch libraries on import)."""
    import torch

    cuda = torch.cuda.is_available()
    names = ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth", "unsloth_zoo", "vllm",
             "flash_attn", "triton")
    return EnvReport(
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        cuda_available=cuda,
        cuda_version=torch.version.cuda,
        gpu_name=torch.cuda.get_device_name(0) if cuda else None,
        gpu_total_gib=round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if cuda else None,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        packages={n: _version(n) if importlib.util.find_spec(n) else None for n in names},
    )


def model_shape(name_or_path: str) -> ModelShape:
    """Read a model's shape from its local config.json, or from ``KNOWN_SHAPES`` by name.

    Raises:
        ValueError: Neither a local folder with config.json nor a known model name.
    """
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text(encoding="utf-8"))
        return ModelShape(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                          c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]),
                          c["vocab_size"], c.get("tie_word_embeddings", False))
    key = name_or_path.rstrip("/").split("/")[-1].lower().removesuffix("-bnb-4bit").removesuffix("-unsloth")
    if key not in KNOWN_SHAPES:
        raise ValueError(f"model '{name_or_path}': no local config.json and not one of {', '.join(KNOWN_SHAPES)}")
    return KNOWN_SHAPES[key]


def linear_shapes(s: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of the seven projections of one layer."""
    kv = s.kv_heads * s.head_dim
    return {"q_proj": (s.hidden, s.hidden), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv),
            "o_proj": (s.hidden, s.hidden), "gate_proj": (s.hidden, s.intermediate),
            "up_proj": (s.hidden, s.intermediate), "down_proj": (s.intermediate, s.hidden)}


def param_counts(s: ModelShape) -> tuple[int, int]:
    """(parameters in the projections, parameters elsewhere: embeddings, lm_head, norms)."""
    linear = s.layers * sum(i * o for i, o in linear_shapes(s).values())
    other = s.vocab * s.hidden * (1 if s.tied_embeddings else 2) + (2 * s.layers + 1) * s.hidden
    return linear, other


def lora_params(s: ModelShape, rank: int, targets: list[str]) -> int:
    """Trainable LoRA parameters: r * (in + out) per targeted projection per layer."""
    return s.layers * sum(rank * (i + o) for name, (i, o) in linear_shapes(s).items() if name in targets)


def activation_bytes_per_token(s: ModelShape, checkpointing: bool) -> float:
    """Bytes of saved activations per token for the backward pass (bf16, SDPA/flash attention).

    Without checkpointing each layer keeps ~9h + 3*kv + 4*I values (norm inputs/outputs, q/k/v,
    rotated q/k, attention output, residual, gate/up/act/product of the MLP). With it, only
    each layer's input (h values) is kept, plus one layer's full set while it is recomputed.
    """
    kv = s.kv_heads * s.head_dim
    per_layer = 2 * (9 * s.hidden + 3 * kv + 4 * s.intermediate)
    if checkpointing:
        return 2 * s.hidden * s.layers + per_layer
    return per_layer * s.layers


def logits_bytes(s: ModelShape, tokens: int, seq_len: int, fused: bool) -> float:
    """Memory of the LM-head logits for the loss.

    Plain transformers/TRL: fp32 logits and their gradient for every token (an upper bound).
    Unsloth's fused cross-entropy works through the sequence in chunks: about one sequence of
    bf16 logits at a time.
    """
    return 2 * s.vocab * seq_len if fused else 2 * 4 * s.vocab * tokens


def kv_cache_bytes(s: ModelShape, tokens: int) -> float:
    """bf16 K and V for every layer."""
    return 2 * 2 * s.layers * s.kv_heads * s.head_dim * tokens


def _stage_tokens(sft, reward, dpo, grpo) -> dict[str, int]:
    """Tokens in one micro-batch of each stage (sequences x their length)."""
    return {
        "sft": sft.sft_per_device_train_batch_size * sft.max_seq_length,
        "reward": 2 * reward.reward_per_device_train_batch_size * reward.max_seq_length,  # chosen and rejected
        "dpo": 2 * dpo.dpo_per_device_train_batch_size * dpo.max_seq_length,
        "grpo": grpo.grpo_per_device_train_batch_size * grpo.max_seq_length,  # prompt + completion, up to max_seq_length
    }


def reward_model_weight_bytes(s: ModelShape, load_in_4bit: bool) -> float:
    """A sequence classifier on the base: the decoder without lm_head, plus a 1-row score head."""
    linear, _ = param_counts(s)
    other = s.vocab * s.hidden + (2 * s.layers + 1) * s.hidden + s.hidden
    return (NF4_BYTES if load_in_4bit else 2) * linear + 2 * other


def vram_plan(preset: str | Path, gpu_gib: float, optimizer_bytes: float | None = None) -> VRAMPlan:
    """Estimate each stage's peak GPU memory for a preset on a card of ``gpu_gib``.

    Every model resident in a stage is counted (``VRAMPlan.residents_gib``): the policy, the
    reference (DPO: a frozen copy of the adapter; GRPO with ``grpo_beta`` > 0: the shared base
    with the adapter switched off, no extra weights), the reward model GRPO scores with (4-bit
    when the preset trains in 4 bits, as ``load_reward_model`` loads it), and vLLM's share
    (with Unsloth's fast_inference it holds the policy's weights; TRL's own colocated vLLM on the
    hf backend loads a second, 16-bit copy).

    Args:
        preset: A preset YAML file.
        gpu_gib: Memory of the card in GiB (24 for an RTX 3090/4090).
        optimizer_bytes: Bytes of optimizer state per trainable parameter; by default 2 for
            8-bit Adam (``optim`` containing "8bit") and 8 otherwise.

    Returns:
        The plan, with a warning for each stage that will not fit.
    """
    sft, reward, dpo, grpo = (load_stage_config(c, preset) for c in
                              (SFTStageConfig, RewardStageConfig, DPOStageConfig, GRPOStageConfig))
    s = model_shape(sft.model)
    linear, other = param_counts(s)
    w16 = 2 * (linear + other)
    w4 = NF4_BYTES * linear + 2 * other
    weights = w4 if sft.load_in_4bit else w16
    if optimizer_bytes is None:
        optimizer_bytes = 2 if "8bit" in sft.optim else 8
    n_lora = lora_params(s, sft.lora_rank, sft.lora_target_modules)
    lora_state = n_lora * (4 + 4 + optimizer_bytes)  # fp32 weight, fp32 grad, optimizer state
    tokens = _stage_tokens(sft, reward, dpo, grpo)
    unsloth = sft.backend == "unsloth"
    act_gc, act_no = {}, {}
    for stage, n in tokens.items():
        # The reward model (RewardTrainer on plain transformers) has a scalar head: no vocabulary logits.
        logits = 0.0 if stage == "reward" else logits_bytes(s, n, sft.max_seq_length, unsloth)
        # Unsloth's checkpointing offloads each layer's saved input to CPU RAM: only the recompute stays.
        offloaded = 2 * s.hidden * s.layers if unsloth and stage != "reward" else 0
        act_gc[stage] = n * (activation_bytes_per_token(s, True) - offloaded) + logits
        act_no[stage] = n * activation_bytes_per_token(s, False) + logits
    act = act_gc if sft.gradient_checkpointing else act_no
    generated = grpo.grpo_per_device_train_batch_size * grpo.grpo_gradient_accumulation_steps * grpo.max_seq_length
    generation = kv_cache_bytes(s, generated)
    vllm_reserve = grpo.grpo_vllm_gpu_memory_utilization * gpu_gib * GIB if grpo.grpo_use_vllm else 0.0
    overhead = OVERHEAD_GIB * GIB
    residents = {
        "sft": {"policy weights": weights, "LoRA + grads + optimizer": lora_state,
                "activations": act["sft"], "CUDA overhead": overhead},
        "reward": {"reward model weights": reward_model_weight_bytes(s, reward.load_in_4bit),
                   "LoRA + grads + optimizer": lora_state, "activations": act["reward"], "CUDA overhead": overhead},
        "dpo": {"policy weights": weights, "LoRA + grads + optimizer": lora_state,
                "reference (frozen adapter copy, shared base)": 4 * n_lora, "activations": act["dpo"],
                "CUDA overhead": overhead},
        "grpo": _grpo_residents(grpo, s, weights, lora_state, act["grpo"], generation, vllm_reserve, overhead),
    }
    peaks = {stage: sum(parts.values()) for stage, parts in residents.items()}
    plan = VRAMPlan(
        model=sft.model, gpu_gib=gpu_gib, params_b=round((linear + other) / 1e9, 2),
        weights_16bit_gib=_gib(w16), weights_4bit_gib=_gib(w4), weights_gib=_gib(weights),
        lora_params_m=round(n_lora / 1e6, 1), lora_state_gib=_gib(lora_state),
        activations_gib={k: _gib(v) for k, v in act_gc.items()},
        activations_no_gc_gib={k: _gib(v) for k, v in act_no.items()},
        grpo_generation_gib=_gib(generation), grpo_vllm_reserve_gib=_gib(vllm_reserve),
        stage_peak_gib={k: _gib(v) for k, v in peaks.items()},
        residents_gib={stage: {k: _gib(v) for k, v in parts.items()} for stage, parts in residents.items()},
    )
    plan.warnings = fit_warnings(plan, grpo, weights)
    return plan


def _grpo_residents(grpo, s: ModelShape, weights: float, lora_state: float, activations: float, generation: float,
                    vllm_reserve: float, overhead: float) -> dict[str, float]:
    """What GRPO holds at its peak: policy (or vLLM's share holding it), reference, reward model, generation."""
    shared = grpo.grpo_use_vllm and grpo.backend == "unsloth"  # fast_inference: vLLM serves the training weights
    parts = {}
    if shared:
        parts["vLLM share (policy weights + KV cache)"] = vllm_reserve
    else:
        parts["policy weights"] = weights
        if grpo.grpo_use_vllm:
            parts["vLLM share (its own 16-bit weights + KV cache)"] = vllm_reserve
        else:
            parts["generation KV cache"] = generation
    parts["LoRA + grads + optimizer"] = lora_state
    parts["activations"] = activations
    if grpo.grpo_beta > 0:
        parts["reference (shared base, adapter off)"] = 0.0
    if grpo.grpo_reward_weights.get("reward_model"):
        parts["reward model weights"] = reward_model_weight_bytes(s, grpo.load_in_4bit)
        # scoring is a no-grad forward of the batch: about one layer's activations at a time
        tokens = grpo.grpo_per_device_train_batch_size * grpo.max_seq_length
        parts["reward model scoring"] = tokens * activation_bytes_per_token(s, False) / s.layers
    parts["CUDA overhead"] = overhead
    return parts


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def fit_warnings(plan: VRAMPlan, grpo, weights: float) -> list[str]:
    """One warning per stage whose estimated peak exceeds the card, and for a vLLM share too small."""
    warnings = [f"{stage}: estimated peak {peak} GiB exceeds the {plan.gpu_gib} GiB card"
                for stage, peak in plan.stage_peak_gib.items() if peak > plan.gpu_gib]
    if grpo.grpo_use_vllm and grpo.backend == "unsloth" and plan.grpo_vllm_reserve_gib < _gib(weights) + plan.grpo_generation_gib:
        warnings.append(f"grpo: vLLM's share ({plan.grpo_vllm_reserve_gib} GiB) is below weights + KV cache "
                        f"({_gib(weights) + plan.grpo_generation_gib:.2f} GiB): raise grpo_vllm_gpu_memory_utilization")
    return warnings


def doctor(preset: str | Path | None = None, gpu_gb: float | None = None) -> DoctorReport:
    """The environment report and, for a preset, its VRAM plan.

    Args:
        preset: A preset YAML file; None reports the environment only.
        gpu_gb: Card memory in GiB; by default the detected GPU's, else 24.

    Returns:
        The report (``format_report`` renders it as text); ``problems`` lists what would stop the
        preset here (driver/torch CUDA mismatch, missing vLLM or llama.cpp).
    """
    env = environment()
    if gpu_gb is None:
        gpu_gb = env.gpu_total_gib or 24.0
    plan = vram_plan(preset, gpu_gb) if preset is not None else None
    return DoctorReport(env=env, plan=plan, problems=setup_problems(preset))


def setup_problems(preset: str | Path | None) -> list[str]:
    """What would stop the preset's stages on this machine, checked without loading a model.

    Always: a GPU that nvidia-smi sees but torch cannot use (driver older than torch's CUDA).
    With a preset: no CUDA for a ``require_cuda`` preset, vLLM missing or rejected when
    ``grpo_use_vllm``, no built llama.cpp when ``merge_gguf`` is set.
    """
    from brandcopy.backend import GPUSetupError, check_cuda, llama_cpp_problem, vllm_problem
    from brandcopy.config import MergeStageConfig

    problems = []
    grpo = load_stage_config(GRPOStageConfig, preset) if preset is not None else None
    try:
        check_cuda(required=grpo is not None and grpo.require_cuda)
    except GPUSetupError as error:
        problems.append(f"gpu: {error}")
    if grpo is not None and grpo.grpo_use_vllm and vllm_problem() is not None:
        problems.append(f"grpo: {vllm_problem()}")
    if preset is not None and load_stage_config(MergeStageConfig, preset).merge_gguf and llama_cpp_problem():
        problems.append(f"merge: {llama_cpp_problem()}")
    return problems


def format_report(report: DoctorReport) -> str:
    """Render a doctor report as readable text."""
    e = report.env
    lines = [f"python {e.python} on {e.platform}", f"torch {e.torch}, CUDA available: {e.cuda_available}"
             + (f" (CUDA {e.cuda_version}, {e.gpu_name}, {e.gpu_total_gib} GiB, bf16: {e.bf16_supported})"
                if e.cuda_available else "")]
    lines += [f"  {name:13s} {version or 'not installed'}" for name, version in e.packages.items()]
    lines += [f"PROBLEM: {problem}" for problem in report.problems]
    p = report.plan
    if p is None:
        return "\n".join(lines)
    lines += [
        f"VRAM plan for {p.model} ({p.params_b}B parameters) on a {p.gpu_gib} GiB card:",
        f"  weights: 16-bit {p.weights_16bit_gib} GiB, 4-bit {p.weights_4bit_gib} GiB (used: {p.weights_gib})",
        f"  LoRA: {p.lora_params_m}M parameters, weights + grads + optimizer {p.lora_state_gib} GiB",
        "  activations with / without gradient checkpointing: "
        + ", ".join(f"{k} {p.activations_gib[k]} / {p.activations_no_gc_gib[k]}" for k in p.activations_gib),
        f"  GRPO generation KV cache {p.grpo_generation_gib} GiB, vLLM share {p.grpo_vllm_reserve_gib} GiB",
        "  estimated peak: " + ", ".join(f"{k} {v} GiB" for k, v in p.stage_peak_gib.items()),
        "  resident in each stage at its peak:",
    ]
    lines += [f"    {stage}: " + ", ".join(f"{what} {gib}" for what, gib in parts.items())
              for stage, parts in p.residents_gib.items()]
    lines += [f"WARNING: {w}" for w in p.warnings] or ["fits: every stage is below the card's memory"]
    return "\n".join(lines)
