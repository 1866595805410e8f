"""Small exported-data files for the training tests, in the formats datagen exports.

Rows are built from the shipped catalog (data/brands/yuansu/products.jsonl) with fixed Chinese
templates, so the tests need no API and no datagen run.
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCTS = ROOT / "data" / "brands" / "yuansu" / "products.jsonl"
SYSTEM = "你是元素护肤的品牌文案助手，语气专业、克制、真诚。"
TYPES = ["paid_ad_cta", "paid_ad_fab", "social_media_review"]


def products(n: int) -> list[dict]:
    rows = [json.loads(line) for line in PRODUCTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n]


def instruction(product: dict, content_type: str) -> str:
    return f"请为「{product['name']}」写一篇{content_type}文案。"


def good_copy(product: dict) -> str:
    ingredient = product["composition"][0]["materials"][0]["name"]
    facts = product["facts"]
    return f"{product['name']}，核心成分{ingredient}，{facts['texture']}。{facts['usage'][:20]}。立即下单，体验温和护肤。"


def bad_copy(product: dict) -> str:
    return f"{product['name']}是全网最好的产品！！！100%有效，永不过敏！！！"


def prompt_messages(product: dict, content_type: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": instruction(product, content_type)}]


def sft_row(product: dict, content_type: str) -> dict:
    return {"messages": prompt_messages(product, content_type) + [{"role": "assistant", "content": good_copy(product)}]}


def preference_row(product: dict, content_type: str) -> dict:
    return {
        "prompt": prompt_messages(product, content_type),
        "chosen": [{"role": "assistant", "content": good_copy(product)}],
        "rejected": [{"role": "assistant", "content": bad_copy(product)}],
    }


def grpo_row(product: dict, content_type: str) -> dict:
    return {"prompt": prompt_messages(product, content_type), "product_id": product["id"], "content_type": content_type}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tiny_data(data_dir: Path, n_train: int = 12, n_val: int = 4) -> Path:
    """Write sft/preference/grpo train and val files (``<kind>_<split>.jsonl``) into ``data_dir``."""
    items = [(p, TYPES[i % len(TYPES)]) for i, p in enumerate(products(n_train + n_val))]
    splits = {"train": items[:n_train], "val": items[n_train:]}
    for split, pairs in splits.items():
        write_jsonl(data_dir / f"sft_{split}.jsonl", [sft_row(p, t) for p, t in pairs])
        write_jsonl(data_dir / f"preference_{split}.jsonl", [preference_row(p, t) for p, t in pairs])
        write_jsonl(data_dir / f"grpo_{split}.jsonl", [grpo_row(p, t) for p, t in pairs])
    return data_dir
