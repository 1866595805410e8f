"""Which training backend a stage runs on, and getting the GPU set in place before it loads.

This module imports neither transformers, trl nor peft: every entry point that may train or
generate calls ``prepare_backend`` before importing them. Unsloth patches by rebinding
``trl.SFTTrainer``, ``trl.GRPOTrainer`` ... and transformers internals when ``unsloth`` is
imported; a module that imported trl first keeps the stock classes (for GRPO that means TRL
building a second vLLM engine beside Unsloth's, and out of memory on a 24 GB card).

It also owns the GPU checks that need no model: whether torch can use the GPU that
``nvidia-smi`` sees (a CUDA 13 torch on an older driver cannot), and whether the vLLM needed
by GRPO's ``fast_inference`` is installed in a version Unsloth accepts.
"""

import importlib.util
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "unsloth", "hf")
UNSLOTH_INSTALL = "pip install --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9 (see requirements-unsloth.txt)"
VLLM_PIN = "vllm==0.32.0"
VLLM_INSTALL = f"pip install {VLLM_PIN} vllm-bnb-plugin==0.0.3 (see requirements-gpu.txt)"
# The oldest NVIDIA driver branch that runs each CUDA major version torch wheels are built for.
MIN_DRIVER = {"13": 580, "12": 525}


class GPUSetupError(RuntimeError):
    """The machine's GPU cannot be used as the preset needs (driver/torch mismatch, no CUDA, no vLLM)."""


@dataclass
class NvidiaSmi:
    """What ``nvidia-smi`` reports, independently of torch."""

    gpus: list[str]
    driver: str | None
    cuda: str | None  # the highest CUDA version the driver supports


def nvidia_smi() -> NvidiaSmi | None:
    """Query ``nvidia-smi``; None when it is not installed or fails (no NVIDIA driver)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30, check=True).stdout
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(header, names)


def parse_nvidia_smi(header: str, names: str) -> NvidiaSmi:
    """Parse ``nvidia-smi``'s banner (driver and CUDA version) and its list of GPU names."""
    driver = re.search(r"Driver Version:\s*([\d.]+)", header)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return NvidiaSmi(gpus=[line.strip() for line in names.splitlines() if line.strip()],
                     driver=driver.group(1) if driver else None, cuda=cuda.group(1) if cuda else None)


def cuda_problem(smi: NvidiaSmi | None = None) -> str | None:
    """Why torch cannot use a GPU that is there, in one paragraph; None when there is nothing to say.

    Args:
        smi: nvidia-smi's report; queried when None.

    Returns:
        None when torch sees CUDA, or when no NVIDIA GPU is visible at all (a CPU machine).
        Otherwise the driver's and torch's CUDA versions and what to install.
    """
    import torch

    if torch.cuda.is_available():
        return None
    smi = smi if smi is not None else nvidia_smi()
    if smi is None or not smi.gpus:
        return None
    built = torch.version.cuda
    if built is None:
        return (f"nvidia-smi sees {', '.join(smi.gpus)} (driver {smi.driver}, CUDA {smi.cuda}) but torch "
                f"{torch.__version__} is a CPU-only build: install the CUDA build, "
                "pip install torch==2.13.0 (the Linux wheel is CUDA 13 and needs driver >= 580).")
    need = MIN_DRIVER.get(built.split(".")[0])
    return (f"nvidia-smi sees {', '.join(smi.gpus)} but torch {torch.__version__} cannot use it: the driver "
            f"{smi.driver} supports CUDA up to {smi.cuda}, torch was built for CUDA {built}"
            + (f" (needs driver >= {need})" if need else "")
            + ". Update the NVIDIA driver (AutoDL: pick an image with driver >= 580), or install a torch "
            "build for the driver's CUDA (README: 'Older drivers').")


def check_cuda(required: bool) -> None:
    """Fail before anything loads when the GPU is unusable.

    Args:
        required: The preset is for a GPU (``require_cuda: true``): no CUDA at all is an error too.

    Raises:
        GPUSetupError: nvidia-smi sees a GPU that torch cannot use, or ``required`` and no CUDA.
    """
    import torch

    problem = cuda_problem()
    if problem is not None:
        raise GPUSetupError(problem)
    if required and not torch.cuda.is_available():
        raise GPUSetupError(
            f"this preset is for a GPU (require_cuda: true) but torch {torch.__version__} sees no CUDA device; "
            "use configs/tiny-cpu.yaml on a CPU, or pass require_cuda=false to try anyway")


def resolve_backend(backend: str) -> str:
    """The concrete backend: ``auto`` is unsloth where CUDA is present and unsloth is installed, else hf.

    Raises:
        ValueError: Not one of ``BACKENDS``.
    """
    import torch

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")
    if backend != "auto":
        return backend
    if not torch.cuda.is_available():
        logger.info("backend=auto -> hf: no CUDA device (unsloth's GPU kernels need one).")
        return "hf"
    if importlib.util.find_spec("unsloth") is None:
        logger.warning("backend=auto -> hf: CUDA is present but unsloth is not installed (%s).", UNSLOTH_INSTALL)
        return "hf"
    logger.info("backend=auto -> unsloth: CUDA is present and unsloth is installed.")
    return "unsloth"


def import_unsloth():
    """Import unsloth (before transformers and trl, when they are not loaded yet) or explain how to get it.

    Raises:
        ImportError: unsloth is not installed or does not import.
    """
    if importlib.util.find_spec("unsloth") is None:
        raise ImportError(f"backend='unsloth' but unsloth is not installed: {UNSLOTH_INSTALL}, or use backend='hf'.")
    late = [name for name in ("trl", "transformers", "peft") if name in sys.modules and "unsloth" not in sys.modules]
    if late:
        logger.warning("unsloth is imported after %s: some of its patches may not apply. Call "
                       "brandcopy.backend.prepare_backend() before importing them (restart the kernel).", ", ".join(late))
    try:
        import unsloth
    except ImportError as error:
        raise ImportError(
            f"unsloth is installed but does not import ({error}); install the missing package, or use backend='hf'."
        ) from error
    return unsloth


def prepare_backend(backend: str, *, require_cuda: bool = False) -> str:
    """Check the GPU, resolve the backend and, for unsloth, import it first. Call before trl/transformers.

    Args:
        backend: "auto", "unsloth" or "hf" (a preset's ``backend``).
        require_cuda: The preset's ``require_cuda``: no usable GPU is an error.

    Returns:
        The concrete backend.

    Raises:
        GPUSetupError: See ``check_cuda``.
        ImportError: backend "unsloth" without a working unsloth.
        ValueError: Unknown backend.
    """
    check_cuda(require_cuda)
    resolved = resolve_backend(backend)
    if resolved == "unsloth":
        import_unsloth()
    return resolved


def vllm_problem() -> str | None:
    """Why GRPO's vLLM generation cannot start here; None when vLLM is installed in a usable version."""
    if importlib.util.find_spec("vllm") is None:
        return f"grpo_use_vllm is true but vLLM is not installed: {VLLM_INSTALL}, or pass grpo_use_vllm=false"
    version = metadata.version("vllm")
    major_minor_patch = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    if major_minor_patch < (0, 11, 2) or major_minor_patch[:2] == (0, 14):
        return f"vLLM {version} is rejected by unsloth_zoo (needs >= 0.11.2, not 0.14.x): pip install {VLLM_PIN}"
    return None


def llama_cpp_problem() -> str | None:
    """Why a GGUF export cannot run here; None when a built llama.cpp (converter and quantizer) is found.

    Unsloth looks in ``$UNSLOTH_LLAMA_CPP_PATH`` (default ``~/.unsloth/llama.cpp``) and ``./llama.cpp``,
    and otherwise downloads a prebuilt or clones and compiles llama.cpp at run time (network, git,
    cmake and a C++ compiler).
    """
    import os
    from pathlib import Path

    default = Path(os.environ.get("UNSLOTH_LLAMA_CPP_PATH", Path.home() / ".unsloth" / "llama.cpp"))
    for root in (default, Path("llama.cpp")):
        converter = any((root / name).is_file() for name in ("convert_hf_to_gguf.py", "convert-hf-to-gguf.py"))
        quantizer = any((root / name).is_file() for name in ("llama-quantize", "quantize"))
        if converter and quantizer:
            return None
    missing = [tool for tool in ("git", "cmake", "c++") if shutil.which(tool) is None]
    return (f"merge_gguf is set but no built llama.cpp was found in {default} or ./llama.cpp; Unsloth would "
            "download or compile it during the merge (needs network"
            + (f"; missing here: {', '.join(missing)}" if missing else "")
            + "). Build it first (README: 'GGUF export'), or leave merge_gguf empty.")
