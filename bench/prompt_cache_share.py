"""Teacher cost: the share of prompt characters a prompt cache can reuse, per LLM step.

DeepSeek and OpenAI bill a prompt prefix they have seen recently at a fraction of the price, and
vLLM's prefix caching skips recomputing it. Only characters in a prefix shared with an EARLIER
request can hit such a cache. This bench builds the requests of every teacher step exactly as the
library sends them (same prompts, same order) and reports that share (``llm.shared_prefix_share``):

- generate: the 324 requests of the train split (36 products x 9 content types);
- clean: one rewrite per train golden sample, per pass (markup, persona, cta);
- negatives: one LLM negative per train golden sample (weak / exaggerated / fake);
- judge: single scores of three candidates per val golden sample, as the eval stage asks them.

Goal: >= 0.75 for generation. No network, no model: runs in seconds.

Usage: python bench/prompt_cache_share.py [--brand yuansu]
The last line printed is one JSON object.
"""

import argparse
import json

from brandcopy import datagen
from brandcopy.brand import load_brand, load_golden
from brandcopy.judge import JudgeItem, single_messages
from brandcopy.llm import Request, shared_prefix_share


def judge_requests(brand, records: list[dict]) -> list[Request]:
    """The eval stage's single-score requests: per val sample, golden and two model copies (the golden text)."""
    items = [JudgeItem(r["id"], r["product_id"], r["content_type"], r["instruction"], r["text"],
                       {"base": r["text"], "sft": r["text"]}) for r in records]
    return [Request(f"{item.key}/{name}", single_messages(brand, item, name)) for item in items for name in ("golden", "base", "sft")]


def step_requests(brand) -> dict[str, list[Request]]:
    """Requests of each teacher step, in the order the library sends them."""
    golden = load_golden(brand)
    split = brand.split()
    train = [r for r in golden if r["product_id"] in split["train"]]
    val = [r for r in golden if r["product_id"] in split["val"]]
    texts = {r["id"]: r["text"] for r in train}
    clean = [r for name in datagen.prompts.CLEAN_PASSES for r in datagen.clean_requests(brand, train, texts, name)]
    return {
        "generate": datagen.generation_requests(brand, "train"),
        "clean": clean,
        "negatives": datagen.negative_requests(brand, train),
        "judge": judge_requests(brand, val),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brand", default="yuansu")
    args = parser.parse_args()
    brand = load_brand(args.brand)
    result = {}
    for step, requests in step_requests(brand).items():
        share = shared_prefix_share(requests)
        result[step] = {"requests": len(requests), "shared_prefix_share": round(share, 3)}
        print(f"{step:10s} {len(requests):4d} requests  {share:6.1%} of prompt characters in a prefix shared with an earlier request")
    result["goal_generate"] = 0.75
    print(json.dumps(result))


if __name__ == "__main__":
    main()
