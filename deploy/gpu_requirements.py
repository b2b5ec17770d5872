"""Print the package's runtime requirements for the GPU image, one per line.

pyproject.toml pins ``tensorflow-cpu`` on x86_64 (the small wheel CI and
laptops want). The GPU image needs the CUDA build instead, and the two wheels
install the same ``tensorflow`` module, so installing both would let whichever
comes last win. This script swaps the requirement for
``tensorflow[and-cuda]`` with the *same* version range and marker, so
pyproject.toml stays the single source of truth for versions::

    python deploy/gpu_requirements.py pyproject.toml > /tmp/requirements-gpu.txt
    pip install -r /tmp/requirements-gpu.txt && pip install --no-deps .

Standard library only (tomllib, Python >= 3.11; tomli on 3.10).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

CPU_ONLY = "tensorflow-cpu"
GPU = "tensorflow[and-cuda]"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def gpu_requirements(pyproject: str | Path) -> list[str]:
    """``[project].dependencies`` with tensorflow-cpu replaced by tensorflow[and-cuda]."""
    data = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))
    out = []
    for requirement in data["project"]["dependencies"]:
        match = _NAME.match(requirement)
        name = match.group(1).lower().replace("_", "-") if match else ""
        if name == CPU_ONLY:
            requirement = GPU + requirement[match.end():]
        out.append(requirement)
    if not any(r.startswith(GPU) for r in out):
        raise SystemExit(f"{pyproject}: no {CPU_ONLY} requirement to replace; update deploy/gpu_requirements.py")
    return out


if __name__ == "__main__":
    print("\n".join(gpu_requirements(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")))
