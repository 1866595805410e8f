"""The data pipeline against the scripted server: generate, clean, negatives, export, CLI."""

import json
import logging
import re

import pytest
from datasets import load_dataset
from typer.testing import CliRunner

from brandcopy import datagen, prompts
from brandcopy.brand import load_brand, load_golden
from brandcopy.cli import app
from brandcopy.lint import EXAGGERATION_KINDS, FACT_KINDS, lint_text
from brandcopy.llm import LLMClient, LLMConfig, read_jsonl_records, shared_prefix_share
from brandcopy.mockserver import ScriptedServer, scripted_responder


@pytest.fixture(scope="module")
def brand():
    return load_brand("yuansu")


@pytest.fixture(scope="module")
def golden(brand):
    return load_golden(brand)


def client_for(server) -> LLMClient:
    return LLMClient(LLMConfig(model="mock", base_url=server.url, api_key_env=None, concurrency=16, max_retries=2,
                               backoff_base=0.01, backoff_cap=0.02, cache_dir=None))


def source_of(body) -> str:
    """The text a rewrite prompt quotes (in the first user message, also during repairs)."""
    first = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return re.search(r"【原文】\n(.*)\n【原文结束】", first, re.S).group(1)


def last_task(body) -> str:
    """The task of the last message: "修改" during a repair."""
    return re.search(r"任务：(\S+)", body["messages"][-1]["content"]).group(1)


def first_task(body) -> str:
    """The task of the request ("" for the weak prompt, which has no task header)."""
    first = next(m["content"] for m in body["messages"] if m["role"] == "user")
    match = re.search(r"任务：(\S+)", first)
    return match.group(1) if match else ""


def write_samples(path, samples):
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return path


def test_generation_prompt_has_guide_spec_facts_and_train_only_examples(brand, golden):
    train, val = set(brand.split()["train"]), set(brand.split()["val"])
    requests = datagen.generation_requests(brand, "val", ["paid_ad_fab"], n_examples=3)
    assert [r.meta["product_id"] for r in requests] == sorted(val)
    by_text = {g["text"]: g for g in golden}
    for request in requests:
        system, user = (m["content"] for m in request.messages)
        assert brand.persona in system and "神器" in user  # the brand guide: persona, banned words
        assert prompts.build_instruction(brand, request.meta["product_id"], "paid_ad_fab") in user  # spec + facts
        assert brand.content_type("paid_ad_fab").structure[0] in user
        shots = re.findall(r"【范例\d】\n(.*?)\n(?=【范例|任务：)", user, re.S)
        assert len(shots) == 3
        for shot in shots:
            source = by_text[shot]
            assert source["content_type"] == "paid_ad_fab" and source["product_id"] in train  # never val copy


def test_generation_requests_put_shared_content_first_and_come_grouped(brand):
    """Teacher cost: the guide and examples every product of a content type shares come before the
    product's own part, and requests of one content type follow each other, so a prompt cache can
    reuse >= 75% of the prompt characters (26% when the product block came first)."""
    requests = datagen.generation_requests(brand, "train")
    types = [r.meta["content_type"] for r in requests]
    assert types == sorted(types, key=list(brand.content_types).index)  # grouped, in content-type order
    user = requests[0].messages[1]["content"]
    assert user.index("【范例1】") < user.index("任务：") < user.index("产品信息：")
    assert shared_prefix_share(requests) >= 0.75


def test_generate_repairs_bad_answers_and_records_failures(tmp_path, brand, golden):
    have = {(g["product_id"], g["content_type"]): g["text"] for g in golden}

    def responder(body):  # pairs with golden copy: a bad first draft, then the golden copy; others: always bad
        first = next(m["content"] for m in body["messages"] if m["role"] == "user")
        pair = re.search(r"产品编号：(\S+)\n文案类型：(\S+)", first).groups()
        if pair in have and last_task(body) == prompts.REPAIR:
            return have[pair]
        return "神器！" + have.get(pair, "这款产品很好用。")

    types = ["paid_ad_fab", "social_media_review"]
    with ScriptedServer(responder=responder) as server:
        summary = datagen.generate(client_for(server), brand, tmp_path, "train", types)
    samples = read_jsonl_records_by_id(tmp_path / "generated.jsonl")
    failures = {r["key"]: r for r in read_jsonl_records(tmp_path / "generate" / "failures.jsonl")}
    expected = {f"{p}/{t}/0" for p in brand.split()["train"] for t in types}
    assert set(samples) | set(failures) == expected and not set(samples) & set(failures)
    assert samples and {k for k in expected if tuple(k.split("/")[:2]) in have} == set(samples)  # golden pairs succeed
    for sample in samples.values():
        assert sample["text"] == have[(sample["product_id"], sample["content_type"])]  # repaired, never a placeholder
        assert not lint_text(brand, sample["text"], sample["content_type"], sample["product_id"]).violations
    assert all(r["reason"].startswith("rejected after 2 repairs") and r["text"] for r in failures.values())
    results = read_jsonl_records(tmp_path / "generate" / "results.jsonl")
    assert all(r["repairs"] == 1 for r in results) and summary.produced == len(samples)


def read_jsonl_records_by_id(path):
    return {r["id"]: r for r in (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())}


def test_clean_passes_fix_their_target_without_new_violations(tmp_path, brand, golden):
    ad = next(g for g in golden if g["content_type"] == "paid_ad_cta")
    note = next(g for g in golden if g["content_type"] == "social_media_educational")
    no_cta = datagen.drop_cta(brand, ad, None)
    flat = note["text"].replace("我们", "研究者").replace("我", "笔者")
    samples = [
        ad | {"id": "ad-no-cta", "text": no_cta},
        note | {"id": "markup", "text": "【标题】" + note["text"]},
        note | {"id": "flat", "text": flat},
        ad | {"id": "bad-rewrite", "text": no_cta},
    ]

    def responder(body):
        source, task = source_of(body), first_task(body)
        if responder.bad and task == "清洗-补充行动号召":
            return source + "这款神器" + brand.cta_phrases[0] + "。"  # fixes the CTA but adds a banned word
        return {"清洗-去标记": source.replace("【标题】", ""), "清洗-补充行动号召": source + brand.cta_phrases[0] + "。",
                "清洗-人设故事": "我常被读者问到这个问题。" + source}[task]

    responder.bad = False
    with ScriptedServer(responder=responder) as server:
        report = datagen.clean(client_for(server), brand, write_samples(tmp_path / "in.jsonl", samples[:3]), tmp_path)
    assert [report[p].produced for p in ("markup", "persona", "cta")] == [1, 2, 1]  # markup note is flat too
    kept = read_jsonl_records_by_id(tmp_path / "cleaned.jsonl")
    assert set(kept) == {"ad-no-cta", "markup", "flat"}
    assert kept["markup"]["audit"][0] == {"pass": "markup", "before": "【标题】" + note["text"], "after": note["text"]}
    assert kept["ad-no-cta"]["audit"][0]["before"] == no_cta and kept["ad-no-cta"]["text"].endswith(brand.cta_phrases[0] + "。")
    assert kept["flat"]["text"].startswith("我")
    for sample in kept.values():
        assert not lint_text(brand, sample["text"], sample["content_type"], sample["product_id"]).violations

    responder.bad = True  # every CTA rewrite now introduces a banned word: rejected, original kept
    with ScriptedServer(responder=responder) as server:
        report = datagen.clean(client_for(server), brand, write_samples(tmp_path / "in2.jsonl", samples[3:]), tmp_path / "2")
    [failure] = read_jsonl_records(tmp_path / "2" / "clean" / "cta.failures.jsonl")
    assert "改写引入了新问题" in failure["reason"] and "forbidden_word" in failure["reason"]
    [rejected] = [json.loads(line) for line in (tmp_path / "2" / "clean" / "rejected.jsonl").read_text().splitlines()]
    assert rejected["text"] == no_cta and rejected["audit"] == [] and "missing_cta" in rejected["problems"][0]
    assert (tmp_path / "2" / "cleaned.jsonl").read_text() == ""


def test_scripted_server_rewrites_part_of_the_flat_notes(tmp_path, brand, golden):
    """The CPU pipeline exercises the persona pass both ways: accepted first-person rewrites and refusals."""
    flat = [g | {"text": g["text"].replace("我们", "研究者").replace("我", "笔者")}
            for g in golden if brand.content_type(g["content_type"]).family == "social"][:24]
    with ScriptedServer(responder=scripted_responder(brand)) as server:
        report = datagen.clean(client_for(server), brand, write_samples(tmp_path / "in.jsonl", flat), tmp_path)
    rewritten = [s for s in read_jsonl_records_by_id(tmp_path / "cleaned.jsonl").values()
                 if any(entry["pass"] == "persona" for entry in s["audit"])]
    refused = read_jsonl_records(tmp_path / "clean" / "persona.failures.jsonl")
    assert report["persona"].produced == len(rewritten) > 0 and refused
    assert len(rewritten) + len(refused) == len(flat)
    for sample in rewritten:
        [entry] = [e for e in sample["audit"] if e["pass"] == "persona"]
        assert entry["after"].endswith(entry["before"]) and "我" in entry["after"].removesuffix(entry["before"])
    assert all("仍然没有第一人称" in r["reason"] for r in refused)


def test_negatives_mix_kinds_and_lint_failures(tmp_path, brand, golden):
    base = scripted_responder(brand)

    def responder(body):  # the "fake" rewrites come back unchanged: they must be dropped, not kept
        return source_of(body) if first_task(body) == prompts.FAKE else base(body)

    with ScriptedServer(responder=responder) as server:
        report = datagen.make_negatives(client_for(server), brand, brand.path / "golden.jsonl", tmp_path)
    negatives = [json.loads(line) for line in (tmp_path / "negatives.jsonl").read_text().splitlines()]
    families = [datagen._llm_family(g["id"], 0) for g in golden]
    share = {f: families.count(f) / len(golden) for f in ("weak", "exaggerated", "fake")}
    assert abs(share["weak"] - 0.5) < 0.1 and abs(share["exaggerated"] - 0.3) < 0.1 and abs(share["fake"] - 0.2) < 0.1
    failed = read_jsonl_records(tmp_path / "negatives" / "llm.failures.jsonl")
    assert len(failed) == families.count("fake") and all("改写后与原文相同" in f["reason"] for f in failed)
    kinds = {n["kind"] for n in negatives}
    assert kinds == {"llm_weak", "llm_exaggerated", "swap_material", "alter_fact", "insert_banned", "drop_cta", "truncate"}
    assert report["llm_exaggerated"] == families.count("exaggerated") and report["llm_weak"] == families.count("weak")
    by_id = {g["id"]: g for g in golden}
    for n in negatives:
        assert n["text"] != by_id[n["chosen_id"]]["text"] and n["source"] in ("llm", "offline")
        found = {v.kind for v in lint_text(brand, n["text"], n["content_type"], n["product_id"]).violations}
        assert found == set(n["violations"])
        if n["family"] == "fake":
            assert found & FACT_KINDS
        if n["family"] == "exaggerated":
            assert found & EXAGGERATION_KINDS
    assert report["swap_material"] > len(golden) / 2 and report["drop_cta"] > 0


def test_export_files_load_with_datasets(tmp_path, brand, golden):
    negatives = [n for g in golden[:40] for n in datagen.offline_negatives(brand, g)]
    write_samples(tmp_path / "neg.jsonl", negatives)
    written = datagen.export(brand, brand.path / "golden.jsonl", tmp_path, tmp_path / "neg.jsonl")
    val = set(brand.split()["val"])
    for name, path in written.items():
        if name == "dataset_info":
            continue
        rows = load_dataset("json", data_files=str(path), split="train")
        assert len(rows) > 0, name
    sft = load_dataset("json", data_files=str(written["sft_train"]), split="train")
    first = golden_by_pair(golden, brand.split()["train"])[0]
    expected = prompts.chat_messages(brand, first["product_id"], first["content_type"], first["text"])
    assert expected in [row["messages"] for row in sft]
    assert all(m["role"] for m in sft[0]["messages"]) and [m["role"] for m in sft[0]["messages"]] == ["system", "user", "assistant"]
    preference = load_dataset("json", data_files=str(written["preference_train"]), split="train")
    assert preference.column_names == ["prompt", "chosen", "rejected"]
    assert [m["role"] for m in preference[0]["prompt"]] == ["system", "user"] and preference[0]["chosen"][0]["role"] == "assistant"
    grpo = load_dataset("json", data_files=str(written["grpo_val"]), split="train")
    assert set(grpo.column_names) == {"prompt", "product_id", "content_type"} and set(grpo["product_id"]) <= val
    assert len(grpo) == len({(g["product_id"], g["content_type"]) for g in golden if g["product_id"] in val})
    assert not {g["product_id"] for g in golden if g["text"] in {r["messages"][2]["content"] for r in sft}} & val
    info = json.loads(written["dataset_info"].read_text())
    assert set(info) == {f"brandcopy_{n.split('/')[1]}" for n in written if n.startswith("llamafactory/")}
    for entry in info.values():
        assert (tmp_path / "llamafactory" / entry["file_name"]).is_file()
    sharegpt = load_dataset("json", data_files=str(written["llamafactory/sharegpt_train"]), split="train")
    assert [t["from"] for t in sharegpt[0]["conversations"]] == ["human", "gpt"] and sharegpt[0]["system"] == prompts.system_prompt(brand)


def golden_by_pair(golden, products):
    return [g for g in golden if g["product_id"] in products]


def test_cli_pipeline_with_a_key_that_never_reaches_files_or_logs(tmp_path, brand, monkeypatch, caplog):
    secret = "sk-brandcopy-cli-secret-42"
    monkeypatch.setenv("BRANDCOPY_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    with ScriptedServer(responder=scripted_responder(brand), api_key=secret) as server:
        llm = ["--model", "mock", "--base-url", server.url, "--api-key-env", "BRANDCOPY_TEST_KEY"]
        common = ["--run", "t", "--output-root", str(tmp_path / "outputs")]
        outputs = [runner.invoke(app, ["data", "generate", *common, *llm, "--content-types", "paid_ad_cta,social_media_review"])]
        outputs.append(runner.invoke(app, ["data", "clean", *common, *llm]))
        outputs.append(runner.invoke(app, ["data", "negatives", *common, *llm]))
        outputs.append(runner.invoke(app, ["data", "export", *common]))
    assert [o.exit_code for o in outputs] == [0, 0, 0, 0], [o.output for o in outputs]
    data = tmp_path / "outputs" / "t" / "data"
    assert (data / "sft_train.jsonl").is_file() and (data / "preference_train.jsonl").is_file()
    files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert len(files) > 10
    assert not any(secret in p.read_text(encoding="utf-8") for p in files)
    assert not any(secret in o.output for o in outputs) and secret not in caplog.text

    monkeypatch.delenv("BRANDCOPY_TEST_KEY")
    missing = runner.invoke(app, ["data", "generate", *common, *llm])
    assert missing.exit_code == 2 and "BRANDCOPY_TEST_KEY is not set" in missing.output


def test_a_re_export_keeps_the_on_policy_pairs_entry(tmp_path, brand, golden):
    from brandcopy.improve import _add_dataset_info

    datagen.export(brand, brand.path / "golden.jsonl", tmp_path)
    onpolicy = tmp_path / "llamafactory" / "dpo_onpolicy_train.jsonl"
    onpolicy.write_text('{"instruction": "写", "input": "", "system": "s", "chosen": "好", "rejected": "差"}\n', encoding="utf-8")
    _add_dataset_info(tmp_path / "llamafactory" / "dataset_info.json", "dpo_onpolicy_train")
    written = datagen.export(brand, brand.path / "golden.jsonl", tmp_path)  # new golden copy: export again
    info = json.loads(written["dataset_info"].read_text(encoding="utf-8"))
    assert info["brandcopy_dpo_onpolicy_train"] == {
        "file_name": "dpo_onpolicy_train.jsonl", "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected", "system": "system"}}
    assert "brandcopy_sft_train" not in info and "brandcopy_alpaca_train" in info
