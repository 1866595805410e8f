"""Set-up for a notebook opened on its own on Colab or AutoDL, and where such a host keeps its files.

The first code cell of every notebook (``bootstrap_cell``) does nothing inside a brandcopy checkout.
Opened on its own, the cell clones the repository next to the notebook and calls ``bootstrap``,
which installs the GPU set (``requirements-gpu.txt``, the one list of GPU pins), points the Hugging
Face cache at AutoDL's data disk, and makes the notebook run from the clone.

This module uses the standard library only: it runs before anything else is installed.

Switches (environment variables):
    BRANDCOPY_REPO_URL: the repository the cell clones (a fork, a mirror, or a local path);
        default ``REPO_URL``.
    BRANDCOPY_SKIP_INSTALL: ``1`` skips every ``pip install`` (the packages are already there, as
        in the tests' simulated Colab).

``python -m brandcopy.bootstrap`` rewrites the badge and bootstrap cells of notebooks/ from this
module after ``REPO_URL`` changed (a test fails while they disagree).
"""

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

# The project's own repository: the one place to change it (then run `python -m brandcopy.bootstrap`).
REPO_URL = "https://github.com/brandcopy/brandcopy"
BRANCH = "main"
REQUIREMENTS = "requirements-gpu.txt"
COLAB_DRIVE = Path("/content/drive/MyDrive")  # where Colab mounts Google Drive
AUTODL_DISK = Path("/root/autodl-tmp")  # AutoDL's data disk; the system disk (/) is small
HF_MIRROR = "https://hf-mirror.com"  # the Hugging Face hub mirror reachable from AutoDL
MIN_DRIVER = 580  # torch 2.13.0's Linux wheel is built for CUDA 13
STAMP = ".bootstrap-installed"  # in the clone: the hash of the requirements last installed


class RestartRequired(RuntimeError):
    """The install replaced torch under a running kernel: the runtime must restart once."""


# --- where the notebook runs ------------------------------------------------------------------------


def host(environ: Mapping[str, str] = os.environ, autodl_disk: Path = AUTODL_DISK) -> str:
    """``colab`` (Colab sets ``COLAB_*`` variables, the test Unsloth's notebooks use), ``autodl``
    (its data disk exists) or ``local``."""
    if any(key.startswith("COLAB_") for key in environ):
        return "colab"
    return "autodl" if autodl_disk.is_dir() else "local"


def default_output_root(where: str | None = None, drive: Path = COLAB_DRIVE, autodl_disk: Path = AUTODL_DISK) -> str:
    """Where runs go when a notebook's ``OUTPUT_ROOT`` is empty.

    On Colab with Google Drive mounted: ``MyDrive/brandcopy/outputs``. A runtime reset loses the local
    disk, and a fresh clone on the new runtime finds the finished stages and checkpoints there. On
    AutoDL: ``autodl-tmp/outputs`` on the data disk. Elsewhere (and on Colab without Drive): ``""``,
    the preset's ``output_root``.
    """
    where = where or host(autodl_disk=autodl_disk)
    if where == "colab" and drive.is_dir():
        return str(drive / "brandcopy" / "outputs")
    if where == "autodl":
        return str(autodl_disk / "outputs")
    return ""


def nvidia_driver() -> int | None:
    """The NVIDIA driver's major version from ``nvidia-smi``, or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.match(r"\s*(\d+)\.", out)
    return int(match[1]) if match else None


def driver_advice(driver: int | None, where: str) -> str:
    """A note when the driver is older than the pinned torch build needs; ``""`` when it is fine."""
    if driver is None or driver >= MIN_DRIVER:
        return ""
    note = (f"NVIDIA driver {driver} is older than {MIN_DRIVER}, which torch 2.13.0's CUDA 13 build needs: "
            "torch will not see the GPU.")
    if where == "autodl":
        return note + (" On AutoDL the driver belongs to the host: create the instance on a host whose driver "
                       f"column shows >= {MIN_DRIVER} (CUDA 13), or see the README's GPU route section.")
    return note + " See the README's GPU route section."


# --- the install -------------------------------------------------------------------------------------


def pinned(requirements: Path, name: str) -> str:
    """The version ``requirements`` pins for ``name``.

    Raises:
        KeyError: ``name`` is not pinned there.
    """
    for line in requirements.read_text(encoding="utf-8").splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+)==([^\s#;]+)", line)
        if match and _canonical(match[1]) == _canonical(name):
            return match[2]
    raise KeyError(f"{requirements}: no pin for {name}")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    """The installed version without its local build tag (``2.13.0`` for ``2.13.0+cu130``), or None."""
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def install_plan(clone: Path, torch_installed: str | None) -> tuple[list[list[str]], bool]:
    """The pip commands that install the GPU set, and whether the runtime must restart afterwards.

    As Unsloth's notebooks do on Colab, a preinstalled torch is kept when the pins allow it: pip leaves
    a torch of the pinned version in place. A torch of another version is replaced (vLLM pins torch
    exactly); the kernel cannot swap torch under itself, so the runtime restarts once.
    """
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    commands = [pip + ["-r", str(clone / REQUIREMENTS)], pip + ["--no-deps", "-e", str(clone)]]
    restart = torch_installed is not None and torch_installed != pinned(clone / REQUIREMENTS, "torch")
    return commands, restart


def requirements_hash(clone: Path) -> str:
    return hashlib.sha256((clone / REQUIREMENTS).read_bytes()).hexdigest()[:16]


def install(clone: Path) -> None:
    """Install the GPU set once per version of ``requirements-gpu.txt`` (a stamp in the clone).

    Raises:
        RestartRequired: torch was replaced; restart the runtime and run the notebook again from the top.
    """
    stamp = clone / STAMP
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == requirements_hash(clone):
        print(f"bootstrap: the GPU set from {REQUIREMENTS} is installed")
        return
    commands, restart = install_plan(clone, installed_version("torch"))
    for command in commands:
        print("bootstrap: " + " ".join(command[2:]))
        subprocess.run(command, check=True)
    stamp.write_text(requirements_hash(clone), encoding="utf-8")
    if restart:
        raise RestartRequired("torch was replaced by the pinned build. Restart the runtime once (Colab: Runtime > "
                              "Restart session), then run this notebook again from the top; it will not install again.")


# --- the notebook's bootstrap ------------------------------------------------------------------------


def set_hub_cache(where: str, environ: dict = os.environ) -> list[str]:
    """On AutoDL, the Hugging Face cache on the data disk and the hub mirror, unless already set.

    Returns:
        The variables set, as ``NAME=value``.
    """
    if where != "autodl":
        return []
    wanted = {"HF_HOME": str(AUTODL_DISK / "hf-cache"), "HF_ENDPOINT": HF_MIRROR}
    for name, value in wanted.items():
        environ.setdefault(name, value)
    return [f"{name}={environ[name]}" for name in wanted]


def bootstrap(clone: str | Path) -> Path:
    """Make a notebook opened on its own run from ``clone``: install, host settings, working folder.

    Args:
        clone: The repository the notebook's first cell cloned.

    Returns:
        The clone's absolute path, now the working folder and first on ``sys.path``.

    Raises:
        RestartRequired: The install replaced torch (see ``install``).
    """
    clone = Path(clone).resolve()
    where = host()
    print(f"bootstrap: running on {where}, from the clone {clone}")
    for setting in set_hub_cache(where):
        print(f"bootstrap: {setting}")
    if advice := driver_advice(nvidia_driver(), where):
        print("bootstrap: WARNING: " + advice)
    if os.environ.get("BRANDCOPY_SKIP_INSTALL") == "1":
        print("bootstrap: BRANDCOPY_SKIP_INSTALL=1, no install")
    else:
        install(clone)
    if where == "colab" and not COLAB_DRIVE.is_dir():
        print("bootstrap: Google Drive is not mounted, so a runtime reset loses the runs. To keep them: "
              "from google.colab import drive; drive.mount('/content/drive'), then run this cell again.")
    if str(clone) not in sys.path:
        sys.path.insert(0, str(clone))
    os.chdir(clone)
    return clone


# --- the cells, rendered from this module --------------------------------------------------------------

BOOTSTRAP_CELL = '''\
# Bootstrap (Colab, AutoDL): opened on its own, this notebook clones the repository next to itself, installs the
# GPU set (requirements-gpu.txt) and runs from the clone. Inside a brandcopy checkout it does nothing.
# The steps are in brandcopy/bootstrap.py. A fork or a mirror: set BRANDCOPY_REPO_URL.
import os
import subprocess
import sys
from pathlib import Path

REPO_URL = os.environ.get("BRANDCOPY_REPO_URL", "{repo_url}")
if not any((folder / "brandcopy" / "bootstrap.py").is_file() for folder in [Path.cwd(), *Path.cwd().parents]):
    if not Path("brandcopy").is_dir():
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "brandcopy"], check=True)
    sys.path.insert(0, str(Path("brandcopy").resolve()))
    from brandcopy.bootstrap import bootstrap

    bootstrap("brandcopy")'''


def github_path(repo_url: str = REPO_URL) -> str:
    """``owner/name`` of a GitHub URL."""
    return repo_url.removeprefix("https://github.com/").removesuffix(".git")


def colab_url(notebook: str, repo_url: str = REPO_URL) -> str:
    """The address that opens ``notebooks/<notebook>.ipynb`` of the repository in Colab."""
    return f"https://colab.research.google.com/github/{github_path(repo_url)}/blob/{BRANCH}/notebooks/{notebook}.ipynb"


def badge(notebook: str, repo_url: str = REPO_URL) -> str:
    """The "Open in Colab" badge for one notebook, as Markdown."""
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook, repo_url)})"


def badge_cell(notebook: str, repo_url: str = REPO_URL) -> str:
    """The first (Markdown) cell of a notebook: the badge and what the next cell does."""
    return (f"{badge(notebook, repo_url)}\n\nOn Colab or AutoDL, run the next cell first: it clones the repository and "
            "installs the GPU set (on Colab, pick a GPU runtime first: Runtime > Change runtime type). In a checkout "
            "it does nothing.")


def bootstrap_cell(repo_url: str = REPO_URL) -> str:
    """The first code cell of every notebook."""
    return BOOTSTRAP_CELL.replace("{repo_url}", repo_url)


def write_notebook_cells(folder: Path, repo_url: str = REPO_URL) -> list[Path]:
    """Put the badge and bootstrap cells (ids ``colab-badge``, ``bootstrap``) at the top of every
    numbered notebook in ``folder``, replacing earlier ones. Returns the notebooks changed."""
    import nbformat  # not needed by the bootstrap itself, which runs before anything is installed

    changed = []
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        book = nbformat.read(path, as_version=4)
        cells = [c for c in book.cells if c.get("id") not in ("colab-badge", "bootstrap")]
        top = [nbformat.v4.new_markdown_cell(badge_cell(path.stem, repo_url), id="colab-badge"),
               nbformat.v4.new_code_cell(bootstrap_cell(repo_url), id="bootstrap")]
        text = nbformat.writes(nbformat.from_dict({**book, "cells": top + cells})) + "\n"
        if text != path.read_text(encoding="utf-8"):
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":
    for changed_path in write_notebook_cells(Path(__file__).resolve().parents[1] / "notebooks"):
        print(f"updated {changed_path}")
