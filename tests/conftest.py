"""Shared test fixtures. Each fixture names its owner's area; add yours with small edits."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# --- modeling (tiny model) -------------------------------------------------------------------


def tiny_corpus() -> list[str]:
    """The committed Chinese/English corpus plus ChatML text, for the tiny model's tokenizer."""
    lines = (REPO / "data" / "tiny_corpus.txt").read_text(encoding="utf-8").splitlines()
    texts = [line for line in lines if line and not line.startswith("#")]
    chat = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    return texts + [chat + f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n{t}<|im_end|>\n" for t in texts]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 model + tokenizer saved once per session (about a second). Do not modify it:
    copy it (shutil.copytree) first if a test must change files in it."""
    from brandcopy.modeling import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_corpus())
