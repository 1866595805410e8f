"""Every bad input to the CLI: one line on stderr naming file, line and field, exit code 2, nothing on disk changed.

Each row of the table builds its bad input in a fresh folder, runs the command in-process and
checks the exit code, the words the message must contain, that the message is one line (no
traceback) and that no file under the folder was created, changed or removed.
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from train_data import write_jsonl, write_tiny_data
from typer.testing import CliRunner

from brandcopy.cli import app

PRESET = str(REPO / "configs" / "tiny-cpu.yaml")
RECORD = {"id": "a", "text": "氨基酸温和洁面，泡沫细密，洗后不紧绷。点击下单，试试温和的清洁。", "content_type": "paid_ad_cta"}


def write_text(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def bad_catalog(root: Path) -> Path:
    """A copy of the shipped brand whose products.jsonl line 3 lacks its price."""
    brand = root / "badbrand"
    shutil.copytree(REPO / "data" / "brands" / "yuansu", brand)
    lines = (brand / "products.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[2])
    del row["price"]
    lines[2] = json.dumps(row, ensure_ascii=False)
    (brand / "products.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return brand


def lint_file(root: Path, data: str | bytes) -> list[str]:
    return ["lint", str(write_text(root / "copy.jsonl", data))]


def data_command(root: Path, *args: str) -> list[str]:
    return ["data", *args, "--run", "t", "--output-root", str(root / "outputs")]


def train(root: Path, stage: str, *overrides: str) -> list[str]:
    return ["train", stage, "--config", PRESET, f"output_root={root}", "run=t", *overrides]


def training_data(root: Path, name: str, edit) -> Path:
    """The tiny training data with one file rewritten by ``edit(path)``."""
    data = write_tiny_data(root / "t" / "data")
    edit(data / name)
    return data


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.rfind(b'"role"')])  # a copy cut off mid-line


def truncate_mid_character(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.rfind("。".encode()) + 1])  # cut inside a 3-byte UTF-8 character


def rows_with(path: Path, **fields) -> None:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    write_jsonl(path, [row | fields for row in rows])


CASES = {  # id: (build the input in root -> argv, words the one-line message must contain)
    "lint: GBK file": (lambda r: lint_file(r, json.dumps(RECORD, ensure_ascii=False).encode("gbk")),
                       ["copy.jsonl:1", "not UTF-8", "GBK"]),
    "lint: binary file": (lambda r: lint_file(r, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"), ["copy.jsonl:1", "not UTF-8"]),
    "lint: empty file": (lambda r: lint_file(r, ""), ["copy.jsonl", "no records"]),
    "lint: bad catalog": (lambda r: lint_file(r, json.dumps(RECORD)) + ["--brand", str(bad_catalog(r))],
                          ["products.jsonl:3", "price"]),
    "data generate: bad catalog": (lambda r: data_command(r, "generate", "--mock", "--brand", str(bad_catalog(r))),
                                   ["products.jsonl:3", "price"]),
    "data clean: bad catalog": (lambda r: data_command(r, "clean", "--mock", "--brand", str(bad_catalog(r))), ["products.jsonl:3"]),
    "data negatives: bad catalog": (lambda r: data_command(r, "negatives", "--offline", "--brand", str(bad_catalog(r))),
                                    ["products.jsonl:3"]),
    "data export: bad catalog": (lambda r: data_command(r, "export", "--brand", str(bad_catalog(r))), ["products.jsonl:3"]),
    "data serve-mock: bad catalog": (lambda r: ["data", "serve-mock", "--port", "0", "--brand", str(bad_catalog(r))],
                                     ["products.jsonl:3"]),
    "data generate: --split trian": (lambda r: data_command(r, "generate", "--mock", "--split", "trian"), ["--split", "trian"]),
    "data generate: unknown content type": (lambda r: data_command(r, "generate", "--mock", "--content-types", "paid_ad_cta,paid_ad_xyz"),
                                            ["--content-types", "paid_ad_xyz", "paid_ad_pas"]),
    "data generate: --concurrency 0": (lambda r: data_command(r, "generate", "--mock", "--concurrency", "0"), ["concurrency", "0"]),
    "data clean: missing input": (lambda r: data_command(r, "clean", "--mock", "--input", str(r / "nothing.jsonl")), ["nothing.jsonl"]),
    "data export: GBK samples": (lambda r: data_command(r, "export", "--input", str(write_text(r / "s.jsonl", "文案".encode("gbk")))),
                                 ["s.jsonl:1", "not UTF-8"]),
    "train sft: truncated data file": (lambda r: training_data(r, "sft_train.jsonl", truncate) and train(r, "sft"),
                                       ["sft_train.jsonl:12", "not valid JSON", "truncated"]),
    "train sft: file cut mid-character": (lambda r: training_data(r, "sft_train.jsonl", truncate_mid_character) and train(r, "sft"),
                                          ["sft_train.jsonl:12", "truncated"]),
    "train sft: wrong schema": (lambda r: training_data(r, "sft_val.jsonl", lambda p: write_jsonl(p, [{"text": "一段文案"}])) and train(r, "sft"),
                                ["sft_val.jsonl:1", "missing field 'messages'"]),
    "train sft: messages as a string": (lambda r: training_data(r, "sft_train.jsonl", lambda p: rows_with(p, messages="你好")) and train(r, "sft"),
                                        ["sft_train.jsonl:1", "field 'messages'", "str"]),
    "train sft: GBK data file": (lambda r: training_data(r, "sft_train.jsonl", lambda p: p.write_bytes(p.read_text("utf-8").encode("gbk")))
                                 and train(r, "sft"), ["sft_train.jsonl:1", "not UTF-8"]),
    "train sft: missing model folder": (lambda r: write_tiny_data(r / "t" / "data") and train(r, "sft", f"model={r / 'no-such-model'}"),
                                        ["no-such-model", "does not exist"]),
    "train dpo: chosen as a string": (lambda r: training_data(r, "preference_train.jsonl", lambda p: rows_with(p, chosen="好"))
                                      and train(r, "dpo"), ["preference_train.jsonl:1", "field 'chosen'"]),
    "train grpo: empty product_id": (lambda r: training_data(r, "grpo_train.jsonl", lambda p: rows_with(p, product_id=""))
                                     and train(r, "grpo"), ["grpo_train.jsonl:1", "field 'product_id'"]),
    "train sft: unknown key": (lambda r: train(r, "sft", "sft_learnig_rate=1e-4"), ["sft_learnig_rate", "sft_learning_rate"]),
    "train sft: renamed key": (lambda r: train(r, "sft", "sft_lr=1e-4"), ["override 'sft_lr=1e-4'", "renamed to 'sft_learning_rate'"]),
    "train sft: renamed key without prefix": (lambda r: train(r, "sft", "lr=1e-4"), ["override 'lr=1e-4'", "renamed to 'learning_rate'"]),
    "train dpo: renamed key in a preset": (lambda r: ["train", "dpo", "--config", str(write_text(r / "old.yaml", "run: t\ndpo_batch_size: 2\n")),
                                                      f"output_root={r}"], ["old.yaml:2", "'dpo_batch_size'", "renamed to 'dpo_per_device_train_batch_size'"]),
    "eval: wrong type": (lambda r: ["eval", "--config", PRESET, f"output_root={r}", "eval_max_samples=many"], ["eval_max_samples", "int"]),
    "eval: removed key": (lambda r: ["eval", "--config", PRESET, f"output_root={r}", "eval_judge_mock=true"],
                          ["eval_judge_mock", "was removed", "eval_judge_base_url: scripted"]),
    "train grpo: removed key": (lambda r: train(r, "grpo", "grpo_judge_mock=true"),
                                ["grpo_judge_mock", "was removed", "grpo_judge_base_url: scripted"]),
    "train grpo: no such TRL argument": (lambda r: train(r, "grpo", "grpo_los_type=dr_grpo"),
                                         ["override 'grpo_los_type=dr_grpo'", "trl.GRPOConfig", "did you mean 'grpo_loss_type'"]),
}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    build, words = CASES[case]
    argv = build(tmp_path)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert result.stdout == ""
    assert snapshot(tmp_path) == before


def test_a_utf8_bom_is_read_not_rejected(tmp_path):
    path = write_text(tmp_path / "copy.jsonl", "\ufeff" + json.dumps(RECORD, ensure_ascii=False) + "\n")
    result = CliRunner().invoke(app, ["lint", str(path), "--json"])
    assert result.exit_code in (0, 1), result.output
    assert json.loads(result.stdout)["id"] == "a"


def test_an_endpoint_nothing_listens_on_is_one_line_within_seconds(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # closed again: nothing listens there
    import brandcopy.datagen  # noqa: F401 - imported first, so that only the command is timed

    start = time.perf_counter()
    result = CliRunner().invoke(app, data_command(tmp_path, "generate", "--base-url", url, "--api-key-env", "", "--model", "m"))
    assert result.exit_code == 2 and time.perf_counter() - start < 10
    assert result.stderr.strip().splitlines() == [f"error: cannot reach {url}: connection refused: nothing listens there (is the server running?)"]
    assert not (tmp_path / "outputs" / "t" / "data" / "generated.jsonl").exists()


def test_a_config_error_exits_before_trl_is_imported():
    code = ("import sys; from typer.testing import CliRunner; from brandcopy.cli import app; "
            f"result = CliRunner().invoke(app, ['train', 'sft', '--config', {PRESET!r}, 'sft_lrr=1']); "
            "print(result.exit_code, 'trl' in sys.modules, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    assert result.stdout.split() == ["2", "False", "False"], result.stderr[-2000:]


def test_the_optional_cpu_kernel_warning_is_dropped_at_its_source(caplog):
    import brandcopy  # noqa: F401 - installs the filter

    source = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        source.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "offline")
        source.warning("some other bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["some other bitsandbytes warning"]
