"""What a learner sees: expected warnings filtered, readable renderings of results and samples."""

import logging

from conftest import REPO

from brandcopy.brand import load_brand
from brandcopy.display import (
    BNB_CPU_LOGGER,
    LOAD_REPORT_LOGGER,
    NO_STOP,
    changes_text,
    lint_result_text,
    pair_diff_text,
    quiet,
    run_summary_text,
    sample_text,
    shorten,
    stage_results_text,
)
from brandcopy.lint import lint_text
from brandcopy.llm import RunSummary

HEAD_REPORT = ("\x1b[1mQwen2ForSequenceClassification LOAD REPORT\x1b[0m from: tiny\n"
               "Key          | Status  | \n-------------+---------+-\nscore.weight | MISSING | \n\nNotes:\n"
               "- MISSING: those params were newly initialized. Consider training on your downstream task.")


def _emit(logger_name, message, caplog):
    caplog.clear()
    logging.getLogger(logger_name).warning(message)
    return [record.getMessage() for record in caplog.records]


def test_quiet_drops_the_kernels_warning_and_explains_the_head_report_once(caplog):
    for name in (BNB_CPU_LOGGER, LOAD_REPORT_LOGGER):  # an earlier test in this process may have explained it already
        logging.getLogger(name).filters.clear()
    quiet()
    quiet()  # idempotent: one filter per logger
    assert len(logging.getLogger(BNB_CPU_LOGGER).filters) == 1
    assert _emit(BNB_CPU_LOGGER, "Failed to load CPU gemm_4bit_forward from kernels-community: No module", caplog) == []
    assert _emit(BNB_CPU_LOGGER, "some other bitsandbytes warning", caplog) == ["some other bitsandbytes warning"]
    other = HEAD_REPORT.replace("score.weight", "model.layers.0.mlp.up_proj.weight")
    assert _emit(LOAD_REPORT_LOGGER, other, caplog) == [other]  # a real problem is never hidden
    explained = _emit(LOAD_REPORT_LOGGER, HEAD_REPORT, caplog)
    assert len(explained) == 1 and "Qwen2ForSequenceClassification" in explained[0] and "expected" in explained[0]
    assert "\x1b" not in explained[0] and "MISSING" not in explained[0]
    assert _emit(LOAD_REPORT_LOGGER, HEAD_REPORT, caplog) == []  # explained once


def test_shorten_cuts_at_a_boundary_never_mid_word():
    text = "lint rejected: forbidden_word 最强 at 12-14; missing_cta required for paid ads"
    short = shorten(text, 40)
    assert short.endswith("…") and len(short) <= 41
    assert text.startswith(short[:-1]) and text[len(short) - 1] in " ;:"
    assert shorten("短文案", 10) == "短文案"


def test_sample_text_collapses_blank_runs_marks_no_stop_and_control_characters():
    raw = "第一行\n\n\n\n\n\n第二行\x07\ufffd" + "\n" * 40
    shown = sample_text(raw, stopped=False)
    assert shown.count("\n") == 3 and "⏎×" in shown and "\x07" not in shown and "\ufffd" not in shown
    assert shown.endswith(NO_STOP)
    assert sample_text("完整文案", stopped=True) == "完整文案"
    assert sample_text("\n\n\n", stopped=False).startswith("(empty)")


def test_sample_text_caps_lines_whatever_the_model_emits():
    runaway = "\n".join(f"{i}" for i in range(150))  # a model that never learnt to stop: 150 lines in 300 chars
    shown = sample_text(runaway, stopped=False, max_lines=8)
    assert len(shown.splitlines()) == 9 and "more lines)" in shown.splitlines()[7] and shown.endswith(NO_STOP)
    flat = sample_text("标题\n正文第一段\n\n\n\n正文第二段", stopped=False, max_lines=1)
    assert "\n" not in flat and flat.startswith("标题 ⏎ 正文第一段") and flat.endswith(NO_STOP)
    assert sample_text("一行\n两行", stopped=True) == "一行\n两行"


def test_eval_samples_text_is_one_line_per_model(tmp_path):
    import json

    from brandcopy.brand import load_golden
    from brandcopy.display import eval_samples_text

    brand = load_brand(REPO / "data" / "brands" / "yuansu")
    golden = load_golden(brand)[:2]
    (tmp_path / "config.yaml").write_text(f"brand: {REPO / 'data' / 'brands' / 'yuansu'}\n", encoding="utf-8")
    rows = [{"id": g["id"], "content_type": g["content_type"], "product_id": g["product_id"], "setting": "greedy",
             "model": model, "text": "\n".join(["满屏短行"] * 120), "stopped": False}
            for g in golden for model in ("base", "sft", "dpo", "grpo", "merged", "merged_4bit")]
    (tmp_path / "generations.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                encoding="utf-8")
    text = eval_samples_text(tmp_path, 2)
    assert len(text.splitlines()) == 2 * (1 + 1 + 6)  # header, golden, six models
    assert text.count(NO_STOP) == 12


def test_run_summary_and_stage_results_read_as_labelled_lines():
    summary = RunSummary(produced=126, failed=198, seconds=3.0819653529997595,
                         usage={"calls": 720, "cached": 0, "prompt_tokens": 1662880, "completion_tokens": 49124},
                         cost=0.48623848000000003)
    line = run_summary_text(summary, "train")
    assert line.startswith("train: 126 produced, 198 failed") and "3.1 s" in line and "$0.49" in line
    assert "1,662,880 prompt" in line and "\n" not in line
    text = stage_results_text({"train_loss": 3.21449, "eval_loss": 6.2, "changed_tensors": 30})
    assert "3.214" in text and "changed during training" in text and "+2.99" in text and "memorising" in text


def test_lint_result_and_changes_show_the_offending_span():
    brand = load_brand("yuansu")
    text = "这瓶精华是最强的修护神器！！"
    result = lint_text(brand, text, "social_media_review")
    shown = lint_result_text(result, text)
    assert f"{len(result.violations)} violation(s)" in shown and "⟦神器⟧" in shown
    assert "Violation(" not in shown
    changes = {"chat_template": ("{{ x }}", "{% generation %}"), "config.bos_token_id": (0, None)}
    rendered = changes_text(changes)
    assert "config.bos_token_id: 0 -> None" in rendered and "{{ x }}" not in rendered
    assert changes_text({}).startswith("nothing")


def test_pair_diff_shows_only_what_differs():
    chosen = "烟酰胺浓度 5%，搭配 1.5% 的传明酸，温和提亮。" * 3
    rejected = chosen.replace("1.5%", "0.5%", 1)
    diff = pair_diff_text(chosen, rejected)
    assert diff.startswith("1 change(s)") and "[-1-][+0+]" in diff
    assert len(diff) < len(chosen)
    assert pair_diff_text(chosen, chosen) == "identical texts"


def test_eval_overview_is_one_table_with_stop_rate_bias_and_a_link(tmp_path):
    import json

    from brandcopy.display import eval_overview_markdown

    bias = {"first_won_original": 0.9, "first_won_swapped": 0.1, "agreement": 0.2, "ties": 8, "failed": 0, "n": 10}
    metrics = {"overall": {"stop_rate": 0.25, "distinct_2": 0.009, "lint_score": 0.5, "fact_pass_rate": 1.0}}
    results = {"models": ["base", "dpo"], "n_prompts": 10, "judge": "scripted", "partial": [],
               "judge_means": {"overall": {"base": 1.75, "dpo": 1.3, "golden": 4.2}, "paid_ad_cta": {"base": 2.0}},
               "losses": {"base": {"eval_loss": 6.2}, "dpo": {"eval_loss": 5.1}},
               "metrics": {"greedy": {"base": metrics, "dpo": metrics}}, "position_bias": {"dpo": bias}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results), encoding="utf-8")
    text = eval_overview_markdown(tmp_path / "eval", link_from=tmp_path / "notebooks")
    assert "| dpo | 1.30 | 5.10 | 0.25 | 0.01 | 0.50 | 1.00 |" in text and "| golden | 4.20 |" in text
    assert "90% of best-of-3 rounds" in text and "10% after swapping" in text
    assert "[report.md](../eval/report.md)" in text and "paid_ad_cta" not in text


def test_a_curve_with_many_series_wraps_into_rows_of_three(tmp_path):
    import json

    from PIL import Image

    from brandcopy.run import plot_metrics

    keys = tuple(f"rewards/r{k}" for k in range(7))  # GRPO logs the total and six rewards
    rows = [{"step": step, **{key: step * k for k, key in enumerate(keys)}} for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    width, height = Image.open(plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "curve.png", keys)).size
    assert width <= 3 * 450 + 10 and height >= 3 * 350 - 10  # 3 panels wide, 3 rows (at 100 dpi)


def test_the_progress_bar_is_plain_tqdm_outside_a_notebook():
    from tqdm import tqdm

    from brandcopy.display import NotebookBar, progress_bar

    bar = progress_bar(3, "generate", initial=1, unit="req")
    bar.update(2)
    assert type(bar) is tqdm and bar.n == 3 and not isinstance(bar, NotebookBar)
    bar.close()


def test_training_table_shows_few_columns_at_evenly_spaced_steps(tmp_path):
    import json

    from brandcopy.display import DPO_COLUMNS, training_table_text

    records = [{"step": s, "loss": 0.7 - s / 100, "rewards/margins": s / 10, "rewards/accuracies": 0.5,
                "logps/chosen": -80.0, "logits/rejected": 1.0} for s in range(1, 21)]
    records.insert(10, {"step": 10, "eval_loss": 0.6, "eval_rewards/accuracies": 0.75})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    lines = training_table_text(tmp_path, DPO_COLUMNS, rows=5).splitlines()
    assert lines[0].split() == ["step", "loss", "margin", "accuracy", "held-out", "accuracy"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "6", "11", "15", "20"]
    assert lines[1].split()[-1] == "–" and lines[-1].split() == ["20", "0.500", "2.000", "0.500", "0.750"]
    assert "logps" not in "\n".join(lines)
    assert len(training_table_text(tmp_path, DPO_COLUMNS, rows=30).splitlines()) == 1 + 20  # step 10 once, with its evaluation
    assert training_table_text(tmp_path, DPO_COLUMNS, rows=30).splitlines()[10].split()[-1] == "0.750"


def test_notebook_setup_builds_the_config_and_keeps_what_transformers_draws_short(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub.utils
    import transformers.trainer
    import transformers.utils.logging

    from brandcopy.config import SFTStageConfig
    from brandcopy.display import notebook_setup

    monkeypatch.setattr(transformers.trainer, "DEFAULT_PROGRESS_CALLBACK", transformers.trainer.DEFAULT_PROGRESS_CALLBACK)
    monkeypatch.setattr(transformers.utils.logging, "_tqdm_active", True)  # restored after the test
    monkeypatch.chdir(REPO / "notebooks")  # where a notebook starts; notebook_setup moves to the repository root
    cfg, overrides = notebook_setup(SFTStageConfig, "tiny-cpu", "nb", str(tmp_path), ["sft_max_steps=3", "grpo_max_steps=2"])
    assert isinstance(cfg, SFTStageConfig) and cfg.sft_max_steps == 3 and cfg.run_dir == tmp_path / "nb"
    assert overrides == ["run=nb", f"output_root={tmp_path}", "sft_max_steps=3", "grpo_max_steps=2"]
    printed = capsys.readouterr().out
    assert "tiny-cpu.yaml" in printed and f"run directory: {tmp_path / 'nb'}" in printed and "backend:       hf" in printed
    bar = transformers.trainer.DEFAULT_PROGRESS_CALLBACK()
    state = SimpleNamespace(max_steps=4, global_step=0)
    bar.on_train_begin(None, state, None)
    for state.global_step in (1, 2, 3, 4):
        bar.on_step_end(None, state, None)
        bar.on_log(None, state, None, logs={"loss": 1.0 / state.global_step, "grad_norm": 1.0})
    bar.on_train_end(None, state, None)
    assert bar.bar.n == 4 and bar.bar.postfix == "loss 0.250"
    assert not transformers.utils.logging.is_progress_bar_enabled()  # no "Loading weights" bar per model
    assert not huggingface_hub.utils.are_progress_bars_disabled()  # the hub's download bars stay


def test_notebook_setup_of_a_data_notebook_imports_no_model_library(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from brandcopy.config import SFTStageConfig; from brandcopy.display import notebook_setup; "
            f"notebook_setup(SFTStageConfig, 'tiny-cpu', 'nb', {str(tmp_path)!r}, [], loads_models=False); "
            "print(sorted(m for m in ('transformers', 'trl', 'peft', 'unsloth') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "notebooks", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[]" and "backend:" not in result.stdout


def test_a_notebook_bar_that_never_shows_leaves_no_output(monkeypatch):
    import IPython.display

    from brandcopy.display import NotebookBar

    shown = []

    class Handle:
        def update(self, data, raw):
            shown.append(data["text/plain"])

    def display(data, raw, display_id):
        shown.append(data["text/plain"])
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    with NotebookBar(total=3, desc="fast", delay=60) as bar:  # done before its delay: never drawn
        bar.update(3)
    assert shown == []
    with NotebookBar(total=2, desc="slow", mininterval=0) as bar:
        bar.update(1)
        bar.update(1)
    assert shown[0].startswith("slow:   0%") and shown[-1].startswith("slow: 100%")


def test_write_results_text_bounds_the_copy_and_the_reasons():
    from brandcopy.display import write_results_text
    from brandcopy.write import Candidate, WriteRequest, WriteResult

    brand = load_brand(REPO / "data" / "brands" / "yuansu")
    product, kind = next(iter(brand.products)), next(iter(brand.content_types))
    long_copy = "\n".join(f"第{i}段" for i in range(40))
    passed = WriteResult(WriteRequest("r1", product, kind), "passed", long_copy, "lint_score",
                         candidates=[Candidate(long_copy, [], 1.0), Candidate("x", [{"kind": "banned"}], 0.5)])
    failed = WriteResult(WriteRequest("r2", product, kind), "failed", None, "lint_score",
                         reasons=[f"原因{i}（1/4 篇）" for i in range(9)], candidates=[Candidate("x", [{"kind": "banned"}], 0.5)] * 4)
    text = write_results_text(brand, [passed, failed])
    assert "passed (1/2 candidates clean" in text and "第0段" in text and "第39段" not in text
    assert "原因4" in text and "原因5" not in text and "4 more in results.md" in text
    assert len(text.splitlines()) == (1 + 1 + 8) + (1 + 1 + 5 + 1)
