"""Fresh-venv installs, as a user gets them (issue 12): real ``pip``, real
registry, no mocks.

- ``pip install .`` (no extras) gives a working ``ckptmgr`` for list, verify,
  prune and inspect without TensorFlow (nor Ray, gcsfs, s3fs) installed, on
  checkpoints this venv (TensorFlow, Keras) wrote.
- ``pip install .[tensorflow-cpu,ray]`` runs the example job end to end, and
  ``pip check`` finds nothing broken (the old ``tensorflow-cpu`` + ``tensorflow``
  clash is exactly what it reports).
- The Docker build: the files its build context holds (``Dockerfile.dockerignore``)
  are enough to build the package, and its ``pip install`` line, taken
  verbatim from the Dockerfile, resolves for the base image's Python and
  platform with the base image's Ray, bringing the GPU TensorFlow and never
  ``tensorflow-cpu``.

Each test builds from a copy of the package's files (pyproject.toml,
README.md, ckptmgr/), never from the working tree, and keeps pip's cache, so
a second run downloads nothing. They need the package registry, as ``make
test`` does. Times on the 2-core CI machine with a warm cache are in the
README ("Installing").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIP_TIMEOUT_S = 1500
ML = ("tensorflow", "keras.src.backend.tensorflow", "jax", "torch")


def package_copy(target: Path, files=("pyproject.toml", "README.md")) -> Path:
    """The files ``pip install .`` needs, copied from the repository."""
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copy2(REPO / name, target / name)
    shutil.copytree(REPO / "ckptmgr", target / "ckptmgr",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin"


def env_for(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "KERAS_BACKEND")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="3",
               COLUMNS="200", PIP_DISABLE_PIP_VERSION_CHECK="1", RAY_USAGE_STATS_ENABLED="0")
    return env


def pip(bin_dir: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(bin_dir / "python"), "-m", "pip", *args], cwd=cwd, env=env_for(bin_dir),
                          capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def run(bin_dir: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=env_for(bin_dir),
                          capture_output=True, text=True, timeout=timeout)


def installed(bin_dir: Path, cwd: Path) -> dict[str, str]:
    proc = pip(bin_dir, "list", "--format=json", cwd=cwd)
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(proc.stdout)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three checkpoints written by this (full) venv with TensorFlow and Keras."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from ckptmgr import CheckpointManager

    directory = tmp_path_factory.mktemp("install") / "ckpts"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)], name="tiny")
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
    manager = CheckpointManager(directory)
    for step in (10, 20, 30):
        manager.save(step, model, metrics={"loss": 1.0 / step})
    return directory


@pytest.mark.slow
def test_core_install_runs_list_verify_prune_without_tensorflow(tmp_path, checkpoints):
    bin_dir = fresh_venv(tmp_path / "venv")
    pip(bin_dir, "install", "--quiet", str(package_copy(tmp_path / "src")), cwd=tmp_path)
    packages = installed(bin_dir, tmp_path)
    for absent in ("tensorflow", "tensorflow-cpu", "jax", "torch", "ray", "gcsfs", "s3fs"):
        assert absent not in packages, f"pip install . (no extras) installed {absent} {packages[absent]}"
    for present in ("keras", "h5py", "fsspec", "numpy", "pydantic", "pyyaml", "typer", "rich"):
        assert present in packages, f"core dependency {present} missing: {sorted(packages)}"

    directory = tmp_path / "ckpts"
    shutil.copytree(checkpoints, directory)
    listed = run(bin_dir, "ckptmgr", "list", str(directory), "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [row["step"] for row in json.loads(listed.stdout)] == [10, 20, 30]
    table = run(bin_dir, "ckptmgr", "list", str(directory), cwd=tmp_path)
    assert table.returncode == 0 and " 30 " in table.stdout, table.stderr

    verified = run(bin_dir, "ckptmgr", "verify", str(directory), cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert all(f"ok step {s}" in verified.stdout for s in (10, 20, 30)), verified.stdout

    inspected = run(bin_dir, "ckptmgr", "inspect", str(directory), cwd=tmp_path)
    assert inspected.returncode == 0 and "Dense" in inspected.stdout, inspected.stderr

    # verify really checks bytes here: flip one byte of step 20's archive.
    (archive,) = directory.glob("ckpt-000000020*.keras")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    corrupt = run(bin_dir, "ckptmgr", "verify", str(directory), cwd=tmp_path)
    assert corrupt.returncode != 0, corrupt.stdout
    assert "Traceback" not in corrupt.stdout + corrupt.stderr
    assert re.search(r"\b20\b", corrupt.stdout + corrupt.stderr), corrupt.stdout + corrupt.stderr

    dry = run(bin_dir, "ckptmgr", "prune", str(directory), "--keep-last", "1", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "would delete step 10" in dry.stdout, dry.stdout + dry.stderr
    pruned = run(bin_dir, "ckptmgr", "prune", str(directory), "--keep-last", "1", cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    after = run(bin_dir, "ckptmgr", "list", str(directory), "--json", cwd=tmp_path)
    assert [row["step"] for row in json.loads(after.stdout)] == [30]

    # A gs:// or s3:// URL without its extra: one error line naming the extra, no traceback.
    for url, extra in (("gs://bucket/run", "ckptmgr[gcs]"), ("s3://bucket/run", "ckptmgr[s3]")):
        remote = run(bin_dir, "ckptmgr", "list", url, cwd=tmp_path)
        assert remote.returncode != 0 and "Traceback" not in remote.stderr, remote.stderr
        assert len(remote.stderr.strip().splitlines()) == 1 and extra in remote.stderr, remote.stderr

    # Commands that need an extra say which, in one line.
    shutil.copy2(REPO / "configs" / "local.yaml", tmp_path / "local.yaml")
    for command, extra in ((["run", "local.yaml"], "ckptmgr[ray]"),
                           (["export", str(directory), "--format", "savedmodel", "-o", "sm"], "ckptmgr[tensorflow")):
        needs = run(bin_dir, "ckptmgr", *command, cwd=tmp_path)
        errors = [line for line in needs.stderr.splitlines() if line.startswith("error:")]
        assert needs.returncode == 1 and "Traceback" not in needs.stderr, needs.stderr[-2000:]
        assert len(errors) == 1 and extra in errors[0], needs.stderr[-2000:]

    # None of those commands imported an ML framework (none is installed to import).
    probe = subprocess.run(
        [str(bin_dir / "python"), "-c",
         "import importlib.util as u, sys; sys.exit(int(any(u.find_spec(m) for m in ('tensorflow', 'jax', 'torch'))))"],
        env=env_for(bin_dir), cwd=tmp_path,
    )
    assert probe.returncode == 0, "an ML framework is importable in the core install"


@pytest.mark.slow
def test_tensorflow_cpu_and_ray_install_runs_the_example(tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv")
    pip(bin_dir, "install", "--quiet", str(package_copy(tmp_path / "src")) + "[tensorflow-cpu,ray]", cwd=tmp_path)
    pip(bin_dir, "check", cwd=tmp_path)  # no clashing or missing requirement
    packages = installed(bin_dir, tmp_path)
    assert "tensorflow-cpu" in packages and "tensorflow" not in packages, sorted(packages)
    assert "ray" in packages and "pytest" not in packages, sorted(packages)
    print(f"installed keras {packages['keras']}, tensorflow-cpu {packages['tensorflow-cpu']}, ray {packages['ray']}")

    shutil.copy2(REPO / "configs" / "local.yaml", tmp_path / "local.yaml")
    job = run(bin_dir, "ckptmgr", "run", "local.yaml", cwd=tmp_path, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    listed = run(bin_dir, "ckptmgr", "list", "checkpoints", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    steps = [row["step"] for row in json.loads(listed.stdout)]
    assert steps and steps[-1] == 96, steps  # 3 epochs of 32 batches
    verified = run(bin_dir, "ckptmgr", "verify", "checkpoints", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


# -- the Docker image -------------------------------------------------------------------


def _docker_context(target: Path) -> Path:
    """The files BuildKit sends for deploy/Dockerfile: the allowlist in
    deploy/Dockerfile.dockerignore ('*', then '!path' lines), minus the
    '**/...' exclusions."""
    lines = [line.strip() for line in (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    assert lines[0] == "*", "the build context is an allowlist"
    target.mkdir(parents=True)
    for line in lines[1:]:
        if not line.startswith("!"):
            continue
        source = REPO / line[1:]
        if source.is_dir():
            shutil.copytree(source, target / line[1:], ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (target / line[1:]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / line[1:])
    return target


def _manylinux_tags(glibc_minor: int) -> list[str]:
    """Every x86_64 manylinux tag a glibc 2.<glibc_minor> system runs."""
    tags = [f"manylinux_2_{m}_x86_64" for m in range(glibc_minor, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


@pytest.mark.slow
def test_dockerfile_requirements_resolve_for_the_image_without_rewriting(tmp_path):
    from test_deploy import _base_image, dockerfile_requirements

    context = _docker_context(tmp_path / "context")
    image = _base_image()  # rayproject/ray:2.60.0-py311-gpu
    tag = image.rpartition(":")[2]
    ray_version = re.match(r"\d+\.\d+\.\d+", tag).group(0)
    python = re.search(r"py(\d)(\d+)", tag)
    assert python, f"{image}: no pyXY in the tag"
    bin_dir = Path(sys.executable).parent

    # The package builds from the build context alone.
    wheels = tmp_path / "wheels"
    pip(bin_dir, "wheel", "--quiet", "--no-deps", "-w", str(wheels), ".", cwd=context)
    (wheel,) = wheels.glob("ckptmgr-*.whl")

    # The Dockerfile's requirement, verbatim, for the image's Python and
    # platform (Ubuntu 22.04: glibc 2.35), with the image's Ray.
    (requirement,) = dockerfile_requirements()  # '.[tensorflow,ray,gcs]'
    extras = requirement[requirement.index("["):]
    report = tmp_path / "report.json"
    pip(bin_dir, "install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report),
        "--only-binary=:all:", "--target", str(tmp_path / "target"),
        "--python-version", f"{python.group(1)}.{python.group(2)}",
        *[arg for tag in _manylinux_tags(35) for arg in ("--platform", tag)],
        f"ckptmgr{extras} @ {wheel.as_uri()}", f"ray=={ray_version}", cwd=context)
    resolved = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert "tensorflow-cpu" not in resolved, "the image would get the CPU-only TensorFlow"
    assert "tensorflow" in resolved and "nvidia-cudnn-cu12" in resolved, sorted(resolved)
    assert resolved.get("ray") == ray_version and "gcsfs" in resolved, sorted(resolved)
    print(f"image resolves: tensorflow {resolved['tensorflow']}, keras {resolved['keras']}, ray {resolved['ray']}")
