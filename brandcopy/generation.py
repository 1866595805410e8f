"""Batched, left-padded generation with fixed parameters.

Every evaluated model (base / sft / dpo / grpo / merged) goes through ``generate_batch`` with the
same ``GenerationParams``, so differences between models come from the weights, not from decoding.
Batched greedy output equals one-by-one greedy output token for token: prompts are left-padded,
the attention mask hides the padding and ``generate`` derives position ids from that mask.
"""

import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class GenerationParams:
    """Fixed decoding parameters of one setting.

    Attributes:
        name: Label of the setting in reports (``greedy``, ``sampled``).
        max_new_tokens: Generation budget; a completion that reaches it did not stop.
        do_sample: False for greedy decoding.
        temperature: Sampling temperature (ignored when greedy).
        top_p: Nucleus sampling threshold (ignored when greedy).
        seed: Seed for ``torch.manual_seed`` before each call, so sampled runs repeat.
    """

    name: str = "greedy"
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def describe(self) -> str:
        """One line for report headers, e.g. ``greedy: max_new_tokens=256, do_sample=False``."""
        fields = asdict(self)
        name = fields.pop("name")
        if not self.do_sample:
            for key in ("temperature", "top_p", "seed"):
                fields.pop(key)
        return f"{name}: " + ", ".join(f"{key}={value}" for key, value in fields.items())


@dataclass
class Generation:
    """One completion.

    Attributes:
        text: Decoded completion without special tokens.
        token_ids: Generated ids up to and including the end-of-turn token when it was emitted.
        prompt_tokens: Length of the rendered prompt in tokens.
        new_tokens: Number of generated tokens (``len(token_ids)``).
        stopped: True when the end-of-turn token came before ``max_new_tokens`` ran out.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    stopped: bool


def render_prompts(tokenizer, messages_list: list[list[dict]]) -> list[str]:
    """Render chat messages through the tokenizer's template with the assistant turn opened."""
    return [
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for messages in messages_list
    ]


def _trim_at_eos(ids: list[int], eos_id: int) -> tuple[list[int], bool]:
    """Cut a generated id list after the first end-of-turn token; padding after it is dropped."""
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1], True
    return ids, False


def _generate_chunk(model, tokenizer, prompts: list[str], params: GenerationParams) -> list[Generation]:
    """Generate for one batch of rendered prompts (left-padded)."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    inputs = inputs.to(model.device)
    sampling = {"temperature": params.temperature, "top_p": params.top_p} if params.do_sample else {}
    output = model.generate(
        **inputs,
        max_new_tokens=params.max_new_tokens,
        do_sample=params.do_sample,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
    new_ids = output[:, inputs["input_ids"].shape[1] :].tolist()
    results = []
    for ids, prompt_length in zip(new_ids, prompt_lengths):
        ids, stopped = _trim_at_eos(ids, tokenizer.eos_token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append(Generation(text, ids, int(prompt_length), len(ids), stopped))
    return results


@torch.inference_mode()
def generate_batch(
    model, tokenizer, messages_list: list[list[dict]], params: GenerationParams, batch_size: int = 8
) -> list[Generation]:
    """Generate one completion per conversation, in batches, in the input order.

    Prompts are sorted by length before batching so that a batch holds prompts of similar length
    (less padding); results come back in the original order.

    Args:
        model: A causal LM (plain, peft or merged), already on its device.
        tokenizer: Its tokenizer, with ``eos_token`` set to the end-of-turn token and a pad token.
        messages_list: Conversations ending with the user turn.
        params: Decoding parameters.
        batch_size: Prompts per ``generate`` call.

    Returns:
        One ``Generation`` per conversation, in input order.

    Raises:
        ValueError: If the tokenizer has no pad token or ``batch_size`` is not positive.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; run modeling.fix_special_tokens first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    prompts = render_prompts(tokenizer, messages_list)
    lengths = [len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    torch.manual_seed(params.seed)
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for index, generation in zip(chunk, _generate_chunk(model, tokenizer, [prompts[i] for i in chunk], params)):
            results[index] = generation
    return results


def timed_generate(model, tokenizer, messages_list, params, batch_size=8) -> tuple[list[Generation], float]:
    """``generate_batch`` plus its wall time in seconds (for reports and benchmarks)."""
    start = time.perf_counter()
    generations = generate_batch(model, tokenizer, messages_list, params, batch_size)
    return generations, time.perf_counter() - start
