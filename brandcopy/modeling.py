"""Models and tokenizers: loading (policy and reward model), and the EOS/pad/chat-template fix and check.

Everything that trains or evaluates a model gets it from here (the tiny local model is built by
``brandcopy.tiny``):

- ``load_model`` / ``load_adapter_model`` return ``(model, tokenizer)`` through Unsloth or plain
  transformers + bitsandbytes + PEFT.
- ``load_reward_model`` / ``score_conversations`` load the reward stage's classifier and score
  conversations with it (GRPO's ``reward_model`` reward, the reward stage's accuracy).
- ``fix_special_tokens`` makes the end-of-turn token the EOS, gives pad its own token and swaps in a
  chat template with TRL's ``{% generation %}`` markers, so the model learns to stop.
- ``check_training_example`` shows which tokens carry loss and fails loudly when the end-of-turn
  token does not.

On a GPU, ``import unsloth`` before anything that imports transformers or trl (first notebook
cell), so that its patches apply.
"""

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from brandcopy.backend import import_unsloth, resolve_backend
from brandcopy.config import LORA_TARGET_MODULES

logger = logging.getLogger(__name__)

END_OF_TURN = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
ADDED_PAD = "<|pad|>"  # only added when the vocabulary has no spare special token to pad with

# Qwen2.5's branch for user/system turns and plain (tool-free) assistant turns, and its training
# variant: the assistant content, <|im_end|> and newline inside {% generation %} markers, so that
# `return_assistant_tokens_mask=True` (TRL's assistant_only_loss) trains the end-of-turn token.
# The Qwen2.5 family (Instruct, base, 4-bit uploads) shares this branch while default system
# prompts differ, so fix_special_tokens patches the branch rather than matching whole templates.
_PLAIN_TURN = """    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
"""
_PLAIN_TURN_TRAINING = """    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
        {{- message.content + '<|im_end|>' + '\\n' }}
        {%- endgeneration %}
"""


def training_chat_template(template: str) -> str:
    """The training variant of a Qwen2.5-family chat template (renders identically, has markers).

    Raises:
        ValueError: The template lacks Qwen2.5's plain-turn branch.
    """
    if _PLAIN_TURN not in template:
        raise ValueError(
            "The chat template has no {% generation %} markers and is not a Qwen2.5-family template "
            "fix_special_tokens can patch. Wrap the assistant content and its <|im_end|> in "
            "{% generation %}...{% endgeneration %} and set tokenizer.chat_template to it."
        )
    return template.replace(_PLAIN_TURN, _PLAIN_TURN_TRAINING)


_GENERATION_TAG_LINE = re.compile(r"^[ \t]*\{%-?\s*(?:end)?generation\s*-?%\}[ \t]*\n?", re.MULTILINE)


def inference_chat_template(template: str) -> str:
    """The plain variant of a chat template: no ``{% generation %}`` markers, same rendering.

    Everything saved for inference (adapter, merged model, GGUF) carries this one: Jinja engines
    outside transformers (llama.cpp, Ollama, vLLM's) do not know the ``generation`` tag. For
    Qwen2.5-family templates this gives back the base model's template exactly.
    """
    plain = template.replace(_PLAIN_TURN_TRAINING, _PLAIN_TURN)
    return _GENERATION_TAG_LINE.sub("", plain)


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Save a tokenizer for inference (plain chat template); the object keeps its training template.

    Raises:
        ValueError: Removing the markers would change how the template renders.
    """
    training = tokenizer.chat_template
    plain = inference_chat_template(training)
    if plain != training:
        _assert_same_rendering(tokenizer, training, plain)
    tokenizer.chat_template = plain
    try:
        tokenizer.save_pretrained(str(out_dir))
    finally:
        tokenizer.chat_template = training

# Conversations on which a training template must render exactly like the inference template.
_PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好！"}],
    [
        {"role": "system", "content": "你是品牌文案助手。"},
        {"role": "user", "content": "写一句话"},
        {"role": "assistant", "content": "好的。"},
        {"role": "user", "content": "再写一句"},
        {"role": "assistant", "content": "没问题。"},
    ],
]


@dataclass
class LoraSettings:
    """LoRA adapter settings shared by both backends.

    Attributes:
        r: Rank of the update matrices; higher learns more and costs more memory.
        alpha: Scaling numerator; the update is scaled by alpha / r.
        dropout: Dropout on the adapter input (Unsloth's fast path wants 0).
        target_modules: Linear layers that get an adapter (all attention and MLP projections).
        seed: Seed for the adapter's initial weights.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. ``lm_head``,
            ``embed_tokens``): needed when the base's own output layer must change, as for the
            random tiny model; empty for a real instruct model.
    """

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    seed: int = 3407
    modules_to_save: list[str] = field(default_factory=list)


# --- loading -------------------------------------------------------------------------------------


def load_model(
    name_or_path: str | Path,
    *,
    backend: str = "auto",
    load_in_4bit: bool = False,
    max_seq_length: int = 2048,
    lora: LoraSettings | None = None,
    dtype: torch.dtype | None = None,
    gradient_checkpointing: bool | None = None,
):
    """Load a causal LM and its tokenizer, optionally 4-bit and with a fresh LoRA adapter.

    Args:
        name_or_path: Local model folder or hub id (hub ids must be cached when HF_HUB_OFFLINE=1).
            For a saved adapter folder use `load_adapter_model`.
        backend: "unsloth" (FastLanguageModel), "hf" (transformers + bitsandbytes + PEFT), or
            "auto": unsloth where CUDA is present and unsloth imports, else hf.
        load_in_4bit: Quantize the base weights to NF4 with double quantization (QLoRA).
        max_seq_length: Longest sequence the model will be trained on.
        lora: LoRA settings to attach a new trainable adapter;
            None returns the bare model (all parameters trainable unless 4-bit).
        dtype: Compute dtype; default bfloat16 (float16 on GPUs without bf16) on CUDA, float32 on CPU.
        gradient_checkpointing: Recompute activations to save memory; default on where CUDA is present.

    Returns:
        (model, tokenizer). With `lora`, the model is a PeftModel with only the adapter trainable.

    Raises:
        FileNotFoundError: The model folder (or cached hub model) is missing.
        ValueError: Bad backend, an adapter folder given, or a tokenizer without a chat template.
        ImportError: unsloth or bitsandbytes asked for but not installed.
    """
    name_or_path = str(name_or_path)
    if (Path(name_or_path) / "adapter_config.json").is_file():
        raise ValueError(
            f"{name_or_path} is a LoRA adapter folder, not a model: load it with "
            f"brandcopy.modeling.load_adapter_model({name_or_path!r})."
        )
    backend = _preflight(name_or_path, backend, load_in_4bit)
    tokenizer = _load_tokenizer(name_or_path)
    options = _LoadOptions(load_in_4bit, max_seq_length, default_dtype(dtype), _default_gc(gradient_checkpointing))
    if backend == "unsloth":
        return _load_unsloth(name_or_path, options, lora)
    return _load_hf(name_or_path, tokenizer, options, lora)


def load_adapter_model(
    adapter_dir: str | Path,
    *,
    trainable: bool = False,
    backend: str = "auto",
    load_in_4bit: bool = False,
    max_seq_length: int = 2048,
    dtype: torch.dtype | None = None,
    gradient_checkpointing: bool | None = None,
    vllm_gpu_memory_utilization: float | None = None,
):
    """Load a saved LoRA adapter on top of its base model (DPO/GRPO start from the SFT adapter).

    Args:
        adapter_dir: Folder written by `model.save_pretrained` of a PeftModel (has adapter_config.json).
            Its tokenizer is used when saved there (it carries fix_special_tokens' changes), else the base's.
        trainable: Keep training the adapter (True) or freeze it for evaluation/generation (False).
        backend: As in `load_model`.
        load_in_4bit: As in `load_model`.
        max_seq_length: As in `load_model`.
        dtype: As in `load_model`.
        gradient_checkpointing: As in `load_model`.
        vllm_gpu_memory_utilization: backend "unsloth" only: load with Unsloth's fast_inference (a
            vLLM engine sharing the weights, for GRPO generation) taking this share of GPU memory.

    Returns:
        (PeftModel, tokenizer).

    Raises:
        FileNotFoundError: No adapter_config.json in `adapter_dir`, or the base model is missing.
        ValueError: Bad input as in `load_model`.
        ImportError: As in `load_model`.
    """
    adapter_dir = Path(adapter_dir)
    base = adapter_base_model(adapter_dir)
    backend = _preflight(base, backend, load_in_4bit)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = _load_tokenizer(str(adapter_dir) if has_tokenizer else base)
    options = _LoadOptions(load_in_4bit, max_seq_length, default_dtype(dtype), _default_gc(gradient_checkpointing),
                           vllm_gpu_memory_utilization, adapter_rank(adapter_dir))
    if backend == "unsloth":
        model, tokenizer = _load_unsloth(str(adapter_dir), options, None)  # unsloth flips this tokenizer's padding side
        _set_trainable(model, trainable)
        return model, tokenizer
    return _load_hf(base, tokenizer, options, None, adapter=(adapter_dir, trainable))


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on (adapter_config.json's `base_model_name_or_path`).

    Raises:
        FileNotFoundError: `adapter_dir` has no adapter_config.json.
        ValueError: The config names no base model.
    """
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} does not exist: {adapter_dir} is not a LoRA adapter folder "
            "(train one with `brandcopy train sft`, or pass a model folder to load_model)."
        )
    base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path}: field base_model_name_or_path is empty; set it to the base model's folder or hub id.")
    return base


def adapter_rank(adapter_dir: str | Path) -> int:
    """The LoRA rank ``r`` of a saved adapter (adapter_config.json)."""
    return int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))["r"])


@dataclass
class _LoadOptions:
    load_in_4bit: bool
    max_seq_length: int
    dtype: torch.dtype
    gradient_checkpointing: bool
    vllm_gpu_memory_utilization: float | None = None  # Unsloth fast_inference (vLLM) when set
    max_lora_rank: int = 64  # largest adapter rank vLLM must serve (fast_inference only)


def _preflight(name_or_path: str, backend: str, load_in_4bit: bool) -> str:
    """Check every input that can fail before loading anything; return the concrete backend."""
    resolved = resolve_backend(backend)
    _check_model_source(name_or_path)
    if load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "load_in_4bit=True needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes==0.50.2, or pass load_in_4bit=False."
        )
    if resolved == "unsloth":
        import_unsloth()
    return resolved


def _check_model_source(name_or_path: str) -> None:
    """A local folder must hold config.json; a hub id must be cached when offline."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: it is not a model folder saved by save_pretrained.")
        return
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) is not None
    if not looks_like_hub_id:
        raise FileNotFoundError(
            f"Model folder {name_or_path} does not exist. Build the tiny model with "
            "brandcopy.tiny.build_tiny_model, or pass a hub id such as Qwen/Qwen2.5-7B-Instruct."
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _is_cached(name_or_path):
        raise FileNotFoundError(
            f"{name_or_path} is neither a local folder nor a model in the Hugging Face cache, and "
            "HF_HUB_OFFLINE=1 forbids downloading it. Fix the path, or download it first with "
            f"`HF_HUB_OFFLINE=0 huggingface-cli download {name_or_path}`."
        )


def _is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def default_dtype(dtype: torch.dtype | None = None) -> torch.dtype:
    """``dtype``, or the compute dtype of this machine: bf16 (fp16 without bf16) on CUDA, fp32 on CPU."""
    if dtype is not None:
        return dtype
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _default_gc(gradient_checkpointing: bool | None) -> bool:
    return torch.cuda.is_available() if gradient_checkpointing is None else gradient_checkpointing


def _load_tokenizer(name_or_path: str):
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"The tokenizer of {name_or_path} has no chat template. Use an -Instruct model, or set "
            "tokenizer.chat_template = brandcopy.tiny.QWEN25_CHAT_TEMPLATE and save the tokenizer."
        )
    return tokenizer


def _load_hf(name_or_path: str, tokenizer, options: _LoadOptions, lora: LoraSettings | None, adapter=None):
    """transformers + bitsandbytes + PEFT; `adapter` is (folder, trainable) or None."""
    trains = lora is not None or (adapter is not None and adapter[1])
    quantization = bnb_4bit_config(options.dtype) if options.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=options.dtype, quantization_config=quantization, device_map=process_device()
    )
    if options.load_in_4bit and trains:
        model = prepare_model_for_kbit_training(
            model, options.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif options.gradient_checkpointing and trains:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if options.load_in_4bit and not torch.cuda.is_available():
        _keep_cpu_4bit_trainable(model)
    _resize_embeddings(model, tokenizer)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter[0]), is_trainable=adapter[1])
    elif lora is not None:
        model = get_peft_model(model, _lora_config(lora))
    logger.info("Loaded %s with transformers (4-bit=%s, dtype=%s).", name_or_path, options.load_in_4bit, options.dtype)
    return model, tokenizer


def bnb_4bit_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's quantization: NF4 with double quantization, computing in ``compute_dtype``."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def process_device() -> str:
    """Where this process puts its weights: its own GPU under ``accelerate launch`` (``LOCAL_RANK``;
    every process on cuda:0 would stack all replicas on one card), cuda:0 alone, else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def _keep_cpu_4bit_trainable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50 repacks a Linear4bit weight in place on the first no-grad forward on CPUs
    with AVX512-BF16 and never unpacks it, so training after any evaluation or generate() breaks.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _resize_embeddings(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer has more tokens (a pad token added by fix_special_tokens)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def _lora_config(lora: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _fast_inference_kwargs(options: _LoadOptions) -> dict:
    """Unsloth's vLLM engine for GRPO generation: shares the weights, takes a share of GPU memory.

    vLLM serves LoRA adapters up to ``max_lora_rank`` (Unsloth's default 64): pass the adapter's rank.
    """
    if options.vllm_gpu_memory_utilization is None:
        return {}
    return {"fast_inference": True, "gpu_memory_utilization": options.vllm_gpu_memory_utilization,
            "max_lora_rank": options.max_lora_rank}


def _load_unsloth(name_or_path: str, options: _LoadOptions, lora: LoraSettings | None):
    """FastLanguageModel.from_pretrained (+ get_peft_model); reads adapter folders itself."""
    from unsloth import FastLanguageModel

    # "unsloth" offloads activations to CPU RAM on GPU, Unsloth's recommended setting for 24 GB.
    checkpointing = "unsloth" if options.gradient_checkpointing and torch.cuda.is_available() else options.gradient_checkpointing
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=name_or_path,
        max_seq_length=options.max_seq_length,
        dtype=options.dtype,
        load_in_4bit=options.load_in_4bit,
        use_gradient_checkpointing=checkpointing,
        **_fast_inference_kwargs(options),
    )
    if lora is not None:
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            target_modules=lora.target_modules,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias="none",
            modules_to_save=lora.modules_to_save or None,
            use_gradient_checkpointing=checkpointing,
            random_state=lora.seed,
        )
    logger.info("Loaded %s with unsloth (4-bit=%s).", name_or_path, options.load_in_4bit)
    return model, tokenizer


def _set_trainable(model, trainable: bool) -> None:
    """Unsloth loads adapters trainable; freeze them for evaluation."""
    if trainable:
        return
    from unsloth import FastLanguageModel

    for param in model.parameters():
        param.requires_grad_(False)
    FastLanguageModel.for_inference(model)


# --- the reward model ----------------------------------------------------------------------------


def reward_model_in_4bit(reward_dir: str | Path) -> bool:
    """Whether the reward model was trained on a 4-bit base (its stage's ``config.yaml``): it is loaded so again."""
    config = yaml.safe_load((Path(reward_dir) / "config.yaml").read_text(encoding="utf-8"))
    return bool(config["load_in_4bit"])


@lru_cache(maxsize=2)
def load_reward_model(reward_dir: str):
    """Load a trained reward model (base + LoRA + score head) for scoring, frozen.

    The base is quantized to 4 bits when the reward stage trained on a 4-bit base: beside GRPO's
    policy and vLLM share on a 24 GB card a 7B classifier in bf16 (~14 GiB) does not fit; in NF4
    it takes ~5 GiB. Cached: GRPO's reward function calls this on every step.

    Returns:
        (model, tokenizer).
    """
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    quantization = bnb_4bit_config(default_dtype()) if reward_model_in_4bit(reward_dir) else None
    model = AutoModelForSequenceClassification.from_pretrained(adapter_base_model(reward_dir), num_labels=1,
                                                               dtype=default_dtype(), quantization_config=quantization,
                                                               device_map=process_device())
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, reward_dir).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The reward model's scalar score of each full conversation (prompt + assistant answer).

    Conversations are rendered with the chat template, as RewardTrainer renders them.
    """
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(conversations), batch_size):
        ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
               for c in conversations[start:start + batch_size]]
        batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(model.device)
        scores += model(**batch).logits[:, 0].float().tolist()
    model.train(was_training)
    return scores


# --- EOS / pad / chat template -------------------------------------------------------------------


def fix_special_tokens(model, tokenizer) -> dict[str, tuple]:
    """Make the model trainable to stop: eos = end-of-turn, pad != eos, template with generation markers.

    The seed bug this prevents: with pad == eos, collators that mask pad ids in the labels
    (transformers' DataCollatorForLanguageModeling) also mask every ``<|im_end|>``, so the model
    never learns to end its turn. Tokenizer, ``model.config`` and ``model.generation_config`` are
    updated together. Idempotent: a second call changes nothing and returns {}.

    Args:
        model: The model (or PeftModel) the tokenizer belongs to; its embeddings grow only when a
            pad token had to be added.
        tokenizer: A ChatML tokenizer (its chat template must use ``<|im_end|>``).

    Returns:
        What changed: {name: (old, new)} for "eos_token", "pad_token", "chat_template",
        "config.eos_token_id", "config.pad_token_id", "config.bos_token_id" and the same three of
        "generation_config.", and "embeddings".

    Raises:
        ValueError: No chat template, a template that does not use ``<|im_end|>``, or one this
            function cannot make training-compatible (see `training_chat_template`).
    """
    changes = {}
    _set_eos(tokenizer, changes)
    _set_pad(model, tokenizer, changes)
    _set_training_template(tokenizer, changes)
    _sync_model_ids(model, tokenizer, changes)
    return changes


def _set_eos(tokenizer, changes: dict) -> None:
    if tokenizer.chat_template is None or END_OF_TURN not in tokenizer.chat_template:
        raise ValueError(
            f"fix_special_tokens supports ChatML chat templates ending turns with {END_OF_TURN}; this tokenizer's "
            "template is missing or does not use it. Set tokenizer.chat_template = brandcopy.tiny.QWEN25_CHAT_TEMPLATE."
        )
    if tokenizer.eos_token != END_OF_TURN:
        changes["eos_token"] = (tokenizer.eos_token, END_OF_TURN)
        tokenizer.eos_token = END_OF_TURN


def _set_pad(model, tokenizer, changes: dict) -> None:
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    spare = ENDOFTEXT if ENDOFTEXT in tokenizer.get_vocab() else ADDED_PAD
    changes["pad_token"] = (tokenizer.pad_token, spare)
    if spare in tokenizer.get_vocab():
        tokenizer.pad_token = spare
        return
    tokenizer.add_special_tokens({"pad_token": spare})
    rows = model.get_input_embeddings().num_embeddings
    _resize_embeddings(model, tokenizer)
    changes["embeddings"] = (rows, model.get_input_embeddings().num_embeddings)


def _set_training_template(tokenizer, changes: dict) -> None:
    template = tokenizer.chat_template
    if has_generation_markers(template):
        return
    training = training_chat_template(template)
    _assert_same_rendering(tokenizer, template, training)
    tokenizer.chat_template = training
    changes["chat_template"] = ("inference template", "training template with {% generation %} markers")


def has_generation_markers(template: str) -> bool:
    """Whether a chat template marks assistant output with ``{% generation %}`` (as TRL checks it)."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def _assert_same_rendering(tokenizer, template: str, training: str) -> None:
    for messages in _PROBE_CONVERSATIONS:
        for prompt_only in (False, True):
            conversation = messages[:-1] if prompt_only else messages
            expected, got = (
                tokenizer.apply_chat_template(conversation, chat_template=t, tokenize=False, add_generation_prompt=prompt_only)
                for t in (template, training)
            )
            if expected != got:
                raise ValueError(f"Training template renders differently from the original:\n{expected!r}\n!=\n{got!r}")


def _sync_model_ids(model, tokenizer, changes: dict) -> None:
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    for name, config in (("config", model.config), ("generation_config", model.generation_config)):
        for key, value in ids.items():
            if name == "generation_config" and key == "eos_token_id":
                value = generation_eos_ids(config.eos_token_id, value)
            if getattr(config, key) != value:
                changes[f"{name}.{key}"] = (getattr(config, key), value)
                setattr(config, key, value)


def generation_eos_ids(current: int | list[int] | None, end_of_turn: int) -> int | list[int]:
    """The model's own stop ids with the end-of-turn id among them.

    Qwen2.5-Instruct's generation_config stops on ``[<|im_end|>, <|endoftext|>]``: keep that list,
    so a merged model stops exactly as the original does; add ``<|im_end|>`` when it is missing.
    """
    if current is None or current == end_of_turn:
        return end_of_turn
    ids = list(current) if isinstance(current, list) else [current]
    return ids if end_of_turn in ids else [end_of_turn, *ids]


# --- checking a training example -----------------------------------------------------------------


class TrainingExampleError(ValueError):
    """A training example would not teach the model to end its turn."""


@dataclass
class TrainingExampleReport:
    """Which parts of one rendered example carry loss.

    Attributes:
        spans: The rendered example cut into (text, carries_loss) runs of consecutive tokens.
        num_tokens: Tokens in the example.
        num_trained: Tokens that carry loss.
    """

    spans: list[tuple[str, bool]]
    num_tokens: int
    num_trained: int

    @property
    def trained_text(self) -> str:
        """The text of the tokens that carry loss."""
        return "".join(text for text, trained in self.spans if trained)

    def __str__(self) -> str:
        """The rendered example with the spans that carry loss wrapped in [[ ]]."""
        return "".join(f"[[{text}]]" if trained else text for text, trained in self.spans)


def _report(tokenizer, ids: list[int], mask: list[int]) -> TrainingExampleReport:
    """Decode runs of equally masked tokens together (one Chinese character may span tokens)."""
    spans, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            spans.append((tokenizer.decode(ids[start:end]), bool(mask[start])))
            start = end
    return TrainingExampleReport(spans, len(ids), sum(mask))


def check_training_example(tokenizer, example: dict) -> TrainingExampleReport:
    """Render one conversational example as SFT with assistant-only loss would, and check it.

    Call it after fix_special_tokens and before training; print the report to see which tokens
    the model learns from (``[[...]]``).

    Args:
        tokenizer: The tokenizer training will use.
        example: {"messages": [...]} ending with an assistant message (TRL's conversational format).

    Returns:
        The report (str() shows the trained spans).

    Raises:
        TrainingExampleError: pad == eos (collators that mask pad ids would drop the end-of-turn
            token), the final end-of-turn token carries no loss, or the inference prompt is not
            an exact prefix of the training rendering.
    """
    messages = example["messages"]
    if messages[-1]["role"] != "assistant":
        raise TrainingExampleError(f"The example must end with an assistant message, not {messages[-1]['role']!r}.")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise TrainingExampleError(
            f"pad_token == eos_token ({tokenizer.eos_token!r}): collators that mask pad ids in the labels also "
            "mask every end-of-turn token, so the model never learns to stop. Run fix_special_tokens first."
        )
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    report = _report(tokenizer, ids, list(mask))
    _check_end_of_turn_trained(tokenizer, ids, mask, report)
    _check_prompt_prefix(tokenizer, messages, ids, mask, report)
    return report


def _check_end_of_turn_trained(tokenizer, ids: list[int], mask: list[int], report: TrainingExampleReport) -> None:
    eos_positions = [i for i, token_id in enumerate(ids) if token_id == tokenizer.eos_token_id]
    if not eos_positions or not mask[eos_positions[-1]]:
        raise TrainingExampleError(
            f"The final end-of-turn token {tokenizer.eos_token!r} carries no loss, so the model will not learn to stop "
            f"(trained spans in [[ ]]):\n{report}\nRun fix_special_tokens so the template has {{% generation %}} "
            "markers around the assistant content and its end-of-turn token."
        )


def _check_prompt_prefix(tokenizer, messages: list[dict], ids: list[int], mask: list[int], report) -> None:
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)
    prompt_ids = prompt["input_ids"]
    first_trained = max(i for i, trained in enumerate(mask) if trained and (i == 0 or not mask[i - 1]))
    if ids[: len(prompt_ids)] != prompt_ids or first_trained != len(prompt_ids):
        raise TrainingExampleError(
            "Training and inference render this conversation differently: the generation prompt\n"
            f"{tokenizer.decode(prompt_ids)!r}\nis not the exact untrained prefix of the training text\n{report}"
        )
