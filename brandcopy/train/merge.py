"""Merge stage: fold an adapter into the 16-bit base and save a standalone model.

The adapter of ``<run>/<merge_from>`` is merged onto the base loaded in 16 bits (never into
4-bit weights: merging into NF4 re-quantizes the sum and degrades output) and saved to
``<run>/merged`` as safetensors + tokenizer + generation_config. With ``backend: unsloth``
Unsloth's ``save_pretrained_merged`` does the same (it merges onto the original 16-bit shards)
and ``merge_gguf`` adds a GGUF export for llama.cpp / Ollama.

The model is written to a hidden sibling folder first and renamed into place, so an interrupted
merge never leaves a half-written ``merged`` folder.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from brandcopy.backend import llama_cpp_problem, prepare_backend
from brandcopy.config import ConfigError, MergeStageConfig, save_config
from brandcopy.files import atomic_dir
from brandcopy.modeling import (
    adapter_base_model,
    fix_special_tokens,
    generation_eos_ids,
    inference_chat_template,
    load_adapter_model,
    save_tokenizer,
)
from brandcopy.run import require_stage, sha256_file, write_manifest

__all__ = ["MergeStageConfig", "run_merge", "merge_hf", "merge_unsloth", "MergeCheck", "check_merged_output"]


def merge_hf(adapter_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Merge with PEFT onto the base loaded unquantized in ``dtype``; save safetensors."""
    model, tokenizer = load_adapter_model(adapter_dir, trainable=False, backend="hf", load_in_4bit=False, dtype=dtype,
                                          gradient_checkpointing=False)
    merged = model.merge_and_unload()
    fix_special_tokens(merged, tokenizer)  # generation_config of the base gets the fixed eos/pad too
    merged.save_pretrained(str(out_dir))
    save_tokenizer(tokenizer, out_dir)


def merge_unsloth(adapter_dir: Path, out_dir: Path, cfg: MergeStageConfig) -> None:
    """Unsloth's 16-bit merge (onto the original 16-bit weights), plus GGUF when ``merge_gguf`` is set."""
    model, tokenizer = load_adapter_model(adapter_dir, trainable=False, backend="unsloth",
                                          load_in_4bit=cfg.load_in_4bit, max_seq_length=cfg.max_seq_length)
    # Unsloth saves the tokenizer it is given: give it the plain template (GGUF embeds it too) and
    # the model's own stop-id list.
    tokenizer.chat_template = inference_chat_template(tokenizer.chat_template)
    model.generation_config.eos_token_id = generation_eos_ids(model.generation_config.eos_token_id,
                                                              tokenizer.eos_token_id)
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    if cfg.merge_gguf:
        model.save_pretrained_gguf(str(out_dir / "gguf"), tokenizer, quantization_method=cfg.merge_gguf)


def run_merge(cfg: MergeStageConfig) -> Path:
    """Merge ``<run>/<merge_from>`` into a standalone 16-bit model at ``<run>/merged``.

    Returns:
        The stage folder.

    Raises:
        StageInputError: The adapter stage is missing or unfinished.
        ConfigError: ``merge_gguf`` without ``backend: unsloth``, or without a built llama.cpp.
    """
    if cfg.merge_gguf and cfg.backend != "unsloth":
        raise ConfigError(f"merge_gguf={cfg.merge_gguf!r} needs backend: unsloth (GGUF export is Unsloth's)")
    if cfg.merge_gguf and llama_cpp_problem() is not None:
        raise ConfigError(llama_cpp_problem())
    prepare_backend(cfg.backend, require_cuda=cfg.require_cuda)  # GPU checks; unsloth before trl
    source = require_stage(cfg.run_dir, cfg.merge_from, "merge")
    with atomic_dir(cfg.out_dir) as partial:  # a failed merge leaves the last finished one in place
        if cfg.backend == "unsloth":
            merge_unsloth(source, partial, cfg)
        else:
            merge_hf(source, partial, getattr(torch, cfg.merge_dtype))
    save_config(cfg, cfg.out_dir / "config.yaml")
    adapter_files = sorted(source.glob("adapter_model*.safetensors"))
    write_manifest(cfg, [], {"merged_from": str(source), "base_model": adapter_base_model(source),
                             "dtype": cfg.merge_dtype, "adapter_sha256": {p.name: sha256_file(p) for p in adapter_files}})
    return cfg.out_dir


@dataclass
class MergeCheck:
    """The merged model's greedy output against the adapter's on the same val prompts.

    Attributes:
        adapter: The adapter stage the merge folded in (``merge_from``).
        identical: Prompts whose generated token ids are the same for both models.
        adapter_outputs: The adapter model's generations, in prompt order.
        merged_outputs: The merged model's generations, in prompt order.
    """

    adapter: str
    identical: int
    adapter_outputs: list
    merged_outputs: list

    def __str__(self) -> str:
        return f"identical greedy output on {self.identical} of {len(self.merged_outputs)} prompts"


def check_merged_output(cfg, adapter: str, n: int = 3) -> MergeCheck:
    """Generate greedily from ``<run>/<adapter>`` and ``<run>/merged`` on the first ``n`` val prompts and count the
    prompts where both produce the same token ids. With a float32 merge on CPU all ``n`` must match; on a GPU the
    adapter ran over 4-bit weights, so expect close but not always identical output.

    Args:
        cfg: The run's ``EvalStageConfig`` (model loading options, ``eval_max_new_tokens``).
        adapter: The merged adapter stage (the merge stage's ``merge_from``).
        n: Number of val prompts.
    """
    from brandcopy.brand import load_brand
    from brandcopy.evaluate import load_eval_model, val_records
    from brandcopy.generation import GenerationParams, generate_batch
    from brandcopy.prompts import chat_messages

    brand = load_brand(cfg.brand)
    prompts = [chat_messages(brand, r["product_id"], r["content_type"]) for r in val_records(brand, n)]
    params = GenerationParams(max_new_tokens=cfg.eval_max_new_tokens)
    outputs = {}
    for name in (adapter, "merged"):
        model, tokenizer = load_eval_model(cfg, name)
        outputs[name] = generate_batch(model, tokenizer, prompts, params)
    identical = sum(a.token_ids == b.token_ids for a, b in zip(outputs[adapter], outputs["merged"]))
    return MergeCheck(adapter, identical, outputs[adapter], outputs["merged"])
