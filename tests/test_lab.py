"""`make lab`: the JupyterLab it starts serves the notebooks (through the server's HTTP API, on 127.0.0.1)."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKEN = "brandcopy-test"


def lab_arguments() -> list[str]:
    """The arguments `make lab` passes to ``python -m jupyterlab`` (read from the Makefile)."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    return shlex.split(re.search(r"^\t\$\(PY\) -m jupyterlab (.*) \$\(LAB_ARGS\)$", makefile, re.M)[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, deadline: float, log: Path) -> dict:
    """GET ``url`` with the token, retrying until the server answers or ``deadline`` passes (then the
    failure carries the server's ``log``)."""
    request = urllib.request.Request(url, headers={"Authorization": f"token {TOKEN}"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except (ConnectionError, urllib.error.URLError) as err:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url}: {err}\nserver log:\n{log.read_text()}") from err
            time.sleep(0.5)


@pytest.fixture()
def lab_server(tmp_path):
    """JupyterLab started as `make lab` starts it, from the repository root, on a free local port."""
    port = free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    command = [sys.executable, "-m", "jupyterlab", *lab_arguments(), "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}"]
    command += ["--allow-root"] * (os.geteuid() == 0)  # CI containers run as root
    log = tmp_path / "lab.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_make_lab_serves_the_notebooks(lab_server):
    url, log = lab_server
    deadline = time.monotonic() + 120
    listing = get_json(f"{url}/api/contents", deadline, log)
    names = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
    assert names == sorted(p.name for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")) and len(names) == 9
    notebook = get_json(f"{url}/api/contents/04_sft.ipynb?content=1", deadline, log)
    assert notebook["type"] == "notebook"
    sources = ["".join(cell["source"]) for cell in notebook["content"]["cells"]]
    assert any("run_sft(cfg)" in source for source in sources)
    kernels = get_json(f"{url}/api/kernelspecs", deadline, log)
    assert "python3" in kernels["kernelspecs"]
