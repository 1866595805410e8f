"""Batched vs one-by-one greedy generation on the tiny model on CPU, outputs compared token for token.

Builds the 2-layer tiny model in a temporary folder (tokenizer trained on the repository's text,
as the demo builds it), renders real eval prompts (val products x content types, system prompt +
instruction with the product facts) and generates greedily with
``generation.generate_batch``: once with ``--batch-size`` prompts per call (left-padded), once
one prompt per call. Goal: batched at least 5x the one-by-one throughput, identical tokens.

What batching saves here is per-step overhead (Python, kernel launches, thread synchronisation):
the tiny model's per-token compute is mostly attention over the ~500-token prompt, which grows
with the batch, so the gain depends on the thread count and on the machine's load
(``--threads``); on a GPU with a 7B model, where every step streams all weights, batching is
where throughput comes from.

Usage: python bench/generation_batching.py [--prompts 32] [--batch-size 32] [--max-new-tokens 192] [--threads N]
The last line printed is one JSON object: batched_tok_per_s, single_tok_per_s, speedup, identical, ...
"""

import argparse
import itertools
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from brandcopy.brand import load_brand  # noqa: E402
from brandcopy.demo import repo_texts  # noqa: E402
from brandcopy.generation import GenerationParams, render_prompts, timed_generate  # noqa: E402
from brandcopy.modeling import load_model  # noqa: E402
from brandcopy.tiny import build_tiny_model  # noqa: E402
from brandcopy.prompts import chat_messages  # noqa: E402


@torch.inference_mode()
def top2_margin(model, tokenizer, messages: list[dict], prefix: list[int]) -> float:
    """Gap between the two best next-token logits after ``prompt + prefix`` (unbatched).

    Where batched and one-by-one greedy part ways, a gap near float32 rounding (~1e-5) shows a
    near-tie decided differently by differently shaped kernels, not a padding or position bug.
    """
    prompt = render_prompts(tokenizer, [messages])[0]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + prefix
    logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return (top[0] - top[1]).item()


def first_divergence(a: list[int], b: list[int]) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def eval_prompts(count: int) -> list[list[dict]]:
    """``count`` eval prompts: val products x content types, cycled."""
    brand = load_brand("yuansu")
    pairs = itertools.cycle(itertools.product(brand.split()["val"], brand.content_types))
    return [chat_messages(brand, pid, ct) for pid, ct in itertools.islice(pairs, count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=192)  # a paid ad is 50-220 characters
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load_model(build_tiny_model(tmp, repo_texts()), backend="hf")
    prompts = eval_prompts(args.prompts)
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    timed_generate(model, tokenizer, prompts[:2], params, 2)  # warm-up
    batched, batched_s = timed_generate(model, tokenizer, prompts, params, args.batch_size)
    single, single_s = timed_generate(model, tokenizer, prompts, params, 1)
    tokens = sum(g.new_tokens for g in batched)
    mismatched = [i for i, (a, b) in enumerate(zip(batched, single)) if a.token_ids != b.token_ids]
    identical = not mismatched
    margins = []
    for i in mismatched:
        at = first_divergence(batched[i].token_ids, single[i].token_ids)
        margins.append(top2_margin(model, tokenizer, prompts[i], single[i].token_ids[:at]))
    prompt_tokens = [g.prompt_tokens for g in batched]
    result = {
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_min_max": [min(prompt_tokens), max(prompt_tokens)],
        "new_tokens": tokens,
        "batched_s": round(batched_s, 3),
        "single_s": round(single_s, 3),
        "batched_tok_per_s": round(tokens / batched_s, 1),
        "single_tok_per_s": round(sum(g.new_tokens for g in single) / single_s, 1),
        "speedup": round(single_s / batched_s, 2),
        "identical": identical,
        "mismatched_sequences": len(mismatched),
        "top2_logit_gap_at_divergence": margins,
        "goal_met": identical and single_s / batched_s >= 5,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(model.dtype),
    }
    print(f"batched: {batched_s:.2f}s, one by one: {single_s:.2f}s, speedup {single_s / batched_s:.1f}x, identical={identical}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
