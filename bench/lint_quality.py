"""Lint quality: precision and recall per violation kind on the labelled lint test set.

Lint is the data gate and the GRPO reward, so a false alarm throws good copy away and teaches the
model one phrasing, and a miss lets a violation through. ``tests/lint_cases.jsonl`` holds
hand-written copy from both shipped brands (原素方程, 观山茶事), clean and violating, each labelled
with the kinds a copywriter would flag (``length`` is left out: it is a character count). Every
case is linted against its brand, content type and product; per kind, a labelled kind that lint
reports is a true positive, a reported kind that is not labelled a false positive, a labelled kind
that lint misses a false negative. Goal: precision and recall 1.0 for every kind.

Usage: python bench/lint_quality.py [--cases tests/lint_cases.jsonl]
The last line printed is one JSON object.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

from brandcopy.brand import load_brand
from brandcopy.lint import FACT_KINDS, RULE_KINDS, lint_text

REPO = Path(__file__).resolve().parents[1]
KINDS = tuple(k for k in RULE_KINDS if k != "length") + tuple(sorted(FACT_KINDS))


def score_cases(cases: list[dict]) -> tuple[dict, list[dict]]:
    """Per-kind counts (tp, fp, fn) over the cases, and the cases lint got wrong."""
    brands, counts, wrong = {}, {kind: Counter() for kind in KINDS}, []
    for case in cases:
        brand = brands.setdefault(case["brand"], load_brand(case["brand"]))
        found = lint_text(brand, case["text"], case["content_type"], case["product_id"]).kinds() - {"length"}
        expected = set(case["kinds"])
        for kind in KINDS:
            counts[kind]["tp"] += kind in found and kind in expected
            counts[kind]["fp"] += kind in found and kind not in expected
            counts[kind]["fn"] += kind not in found and kind in expected
        if found != expected:
            wrong.append(case | {"found": sorted(found)})
    return counts, wrong


def rate(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=str(REPO / "tests" / "lint_cases.jsonl"))
    args = parser.parse_args()
    cases = [json.loads(line) for line in Path(args.cases).read_text(encoding="utf-8").splitlines() if line.strip()]
    counts, wrong = score_cases(cases)
    per_kind = {}
    print(f"{'kind':<20}{'labelled':>9}{'precision':>11}{'recall':>8}")
    for kind, c in counts.items():
        per_kind[kind] = {"labelled": c["tp"] + c["fn"], "precision": rate(c["tp"], c["tp"] + c["fp"]),
                          "recall": rate(c["tp"], c["tp"] + c["fn"])}
        print(f"{kind:<20}{per_kind[kind]['labelled']:>9}{str(per_kind[kind]['precision']):>11}{str(per_kind[kind]['recall']):>8}")
    for case in wrong:
        print(f"WRONG {case['brand']} {case['product_id']} {case['note']}: labelled {case['kinds']}, found {case['found']}")
    clean = [c for c in cases if not c["kinds"]]
    print(json.dumps({"cases": len(cases), "clean_cases": len(clean), "brands": sorted({c["brand"] for c in cases}),
                      "wrong": len(wrong), "per_kind": per_kind}, ensure_ascii=False))


if __name__ == "__main__":
    main()
