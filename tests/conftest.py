"""Shared test fixtures. Each fixture names its owner's area; add yours with small edits."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# --- markers: gpu and cpu_only (pyproject.toml) -------------------------------------------------


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip without CUDA; ``cpu_only`` tests (they assert what a machine without CUDA does) skip with it."""
    import torch

    cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs CUDA" if not cuda else "asserts CPU-only behaviour; CUDA is present")
    for item in items:
        if ("gpu" in item.keywords and not cuda) or ("cpu_only" in item.keywords and cuda):
            item.add_marker(skip)


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
    from brandcopy.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_corpus())


@pytest.fixture(scope="session")
def pretrained_tiny_model_dir(tmp_path_factory) -> Path:
    """The demo's tiny model (``demo.ensure_tiny_model``): the 2-layer Qwen2 model pre-trained on the brand
    corpus, built once per session. Copy it into a run's ``tiny-model`` folder to reuse it there."""
    from brandcopy.demo import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("pretrained") / "tiny-model")


# --- training (train/*, run.py) --------------------------------------------------------------


def tiny_overrides(output_root: Path, model_dir: Path, run: str = "t") -> list[str]:
    """Overrides of configs/tiny-cpu.yaml that keep a training test to seconds."""
    return [f"output_root={output_root}", f"run={run}", f"model={model_dir}", "max_seq_length=256",
            "lr_scheduler_type=constant", "warmup_steps=0", "save_steps=100", "lora_rank=16", "lora_alpha=32"]


@pytest.fixture(scope="session")
def sft_run(tiny_model_dir, tmp_path_factory):
    """A finished SFT stage on the tiny data (30 steps): DPO, GRPO and merge tests start from it.

    Returns:
        (overrides for the run, the sft folder).
    """
    from train_data import write_tiny_data

    from brandcopy.config import SFTStageConfig, load_stage_config
    from brandcopy.train.sft import run_sft

    root = tmp_path_factory.mktemp("runs")
    overrides = tiny_overrides(root, tiny_model_dir)
    write_tiny_data(root / "t" / "data")
    cfg = load_stage_config(SFTStageConfig, REPO / "configs" / "tiny-cpu.yaml",
                            overrides + ["sft_max_steps=30", "sft_learning_rate=5e-3"])
    return overrides, run_sft(cfg)


# --- local servers (transformers serve) ------------------------------------------------------


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server, seconds: float = 240) -> None:
    """Wait until ``transformers serve`` at ``url`` (``http://127.0.0.1:PORT``) answers ``/health``.

    The client fails fast on a refused connection, so a test must not send requests while the
    server is still loading its model.
    """
    import time

    import httpx2

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "transformers serve exited"
        try:
            if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"transformers serve not ready after {seconds}s")
