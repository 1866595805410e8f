"""Reading and writing files: UTF-8 and JSONL errors naming file, line and field; atomic writes."""

import os
import stat

import pytest
from train_data import write_jsonl

from brandcopy.brand import BrandDataError
from brandcopy.compare import CompareInputError, file_prompts
from brandcopy.files import (
    DataFileError,
    atomic_dir,
    atomic_path,
    atomic_write_jsonl,
    atomic_write_text,
    cut_torn_line,
    read_jsonl,
    read_jsonl_log,
)


def test_data_files_check_each_field_and_read_a_bom(tmp_path):
    path = write_jsonl(tmp_path / "sft_train.jsonl", [{"messages": [{"role": "user", "content": "你好"}]}])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_jsonl(path, {"messages": "messages"}) == [{"messages": [{"role": "user", "content": "你好"}]}]
    write_jsonl(path, [{"messages": [{"role": "user", "content": "你好"}]}, {"messages": [{"role": "user", "content": None}]}])
    with pytest.raises(DataFileError, match=r"sft_train.jsonl:2: field 'messages': message 0 is not"):
        read_jsonl(path, {"messages": "messages"})


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "dataset_info.json", "{}")
        plain = tmp_path / "plain.txt"
        plain.write_text("x", encoding="utf-8")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_jsonl_errors_name_file_line_and_what_is_wrong(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"rows.jsonl:3: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"rows.jsonl:2: not valid JSON \(.*column 7\): a truncated"):
        read_jsonl(path)
    path.write_bytes('{"a": "你好"}\n'.encode("gbk"))
    with pytest.raises(DataFileError, match=r"rows.jsonl:1: not UTF-8 text .*GBK"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"b": 2}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"rows.jsonl:2: missing field 'a'"):
        read_jsonl(path, ("a",))


def test_callers_keep_their_own_error_types(tmp_path):
    from brandcopy.brand import load_brand

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(CompareInputError, match=r"p.jsonl:2: not valid JSON"):
        file_prompts(bad, load_brand("yuansu"))
    assert issubclass(BrandDataError, DataFileError)


def test_logs_leave_out_a_torn_last_line_and_cut_it_on_request(tmp_path):
    path = tmp_path / "log.jsonl"
    assert read_jsonl_log(path) == [] and cut_torn_line(path) == 0
    path.write_bytes('{"k": 1}\n{"k": 2}\n{"k": "半'.encode("utf-8")[:-1])  # torn mid-character
    assert read_jsonl_log(path) == [{"k": 1}, {"k": 2}]
    torn = len(path.read_bytes()) - len('{"k": 1}\n{"k": 2}\n')
    assert cut_torn_line(path) == torn and path.read_text(encoding="utf-8") == '{"k": 1}\n{"k": 2}\n'
    path.write_text('{"k": 1}\n{"k": \n{"k": 3}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match="log.jsonl:2: not valid JSON"):
        read_jsonl_log(path)


def test_atomic_writes_replace_whole_files_and_leave_nothing_on_failure(tmp_path):
    path = atomic_write_jsonl(tmp_path / "sub" / "rows.jsonl", [{"text": "你好"}, {"text": "再见"}])
    assert path.read_text(encoding="utf-8") == '{"text": "你好"}\n{"text": "再见"}\n'
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("killed mid-write")
    assert read_jsonl(path) == [{"text": "你好"}, {"text": "再见"}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]
    with atomic_path(tmp_path / "curve.png") as tmp:
        assert tmp.suffix == ".png"  # matplotlib's savefig picks the format from it
        tmp.write_bytes(b"png")
    assert (tmp_path / "curve.png").read_bytes() == b"png"


def test_atomic_dir_publishes_a_folder_only_when_it_is_complete(tmp_path):
    model = tmp_path / "models" / "tiny-model"
    with atomic_dir(model) as tmp:
        (tmp / "config.json").write_text("{}", encoding="utf-8")
        assert not model.exists()  # nobody sees the folder before the block ends
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    with pytest.raises(RuntimeError), atomic_dir(model) as tmp:
        (tmp / "config.json").write_text('{"new": 1}', encoding="utf-8")
        raise RuntimeError("killed before the weights were written")
    assert (model / "config.json").read_text(encoding="utf-8") == "{}"  # the finished folder is untouched
    assert sorted(p.name for p in model.parent.iterdir()) == ["tiny-model"]  # no partial folder left
    (model.parent / ".tiny-model.partial").mkdir()  # what a killed process leaves
    (model.parent / ".tiny-model.partial" / "stale.bin").write_bytes(b"x")
    with atomic_dir(model) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "model.safetensors").write_bytes(b"w")
    assert sorted(p.name for p in model.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in model.parent.iterdir()) == ["tiny-model"]
