"""Print pip constraints pinning every lower bound in pyproject.toml.

``make test-lowest`` installs the package with these constraints into a
throwaway venv and runs the tests that exercise Keras, TensorFlow and Ray, so
each ``>=`` in pyproject.toml is a version that was tested, not a guess::

    python tests/lowest_bounds.py [EXTRA ...] > constraints.txt

The core dependencies are always included; name the extras to include too
(default: tensorflow-cpu ray).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_LOWER = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)(;.*)?$")


def lowest_pins(extras: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = _LOWER.match(requirement)
        if not match or requirement.lstrip().lower().startswith("ckptmgr"):
            continue
        name, specifiers, marker = match.groups()
        lower = re.search(r">=\s*([0-9][^,\s]*)", specifiers)
        if lower:
            pins[name.lower() + (marker or "")] = f"{name}=={lower.group(1)}" + (marker or "")
    return list(pins.values())


if __name__ == "__main__":
    print("\n".join(lowest_pins(sys.argv[1:] or ["tensorflow-cpu", "ray"])))
