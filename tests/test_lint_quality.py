"""The labelled lint test set (tests/lint_cases.jsonl): every case gets exactly its labelled kinds.

The cases are hand-written copy from both brands, clean and violating for every kind, including the
false alarms copywriters reported (an imperative CTA, a quoted myth the text refutes, BAB/FAB
structure labels, blend shares, names that contain a material). ``bench/lint_quality.py`` reports
precision and recall per kind on the same file.
"""

import json
import sys
from pathlib import Path

import pytest

from brandcopy.brand import load_brand
from brandcopy.lint import FACT_KINDS, RULE_KINDS, lint_text

CASES_PATH = Path(__file__).with_name("lint_cases.jsonl")
CASES = [json.loads(line) for line in CASES_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
BRANDS = {name: load_brand(name) for name in ("yuansu", "guanshan")}


def test_the_set_covers_both_brands_and_every_kind_clean_and_violating():
    assert len(CASES) >= 60
    for name in BRANDS:
        mine = [c for c in CASES if c["brand"] == name]
        assert sum(not c["kinds"] for c in mine) >= 10
        labelled = {kind for c in mine for kind in c["kinds"]}
        assert labelled == (set(RULE_KINDS) - {"length"}) | FACT_KINDS, name


@pytest.mark.parametrize("case", CASES, ids=[f"{c['product_id']}:{c['note']}" for c in CASES])
def test_case_gets_exactly_its_labelled_kinds(case):
    brand = BRANDS[case["brand"]]
    found = lint_text(brand, case["text"], case["content_type"], case["product_id"]).kinds() - {"length"}
    assert found == set(case["kinds"]), case["text"]


def test_bench_reports_precision_and_recall_per_kind(capsys, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import lint_quality

    monkeypatch.setattr(sys, "argv", ["lint_quality.py"])
    lint_quality.main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["cases"] == len(CASES) and report["wrong"] == 0
    assert all(v["precision"] == 1.0 and v["recall"] == 1.0 for v in report["per_kind"].values())
