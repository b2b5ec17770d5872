"""The deployment files in deploy/ and configs/gcs.yaml agree with each other and the code.

Fast and offline: no Docker, no Kubernetes, no cloud. Checks that

- every YAML parses, and every ``configs/*.yaml`` validates with ``load_config``;
- the KubeRay RayJob runs ``ckptmgr resume CONFIG || ckptmgr run CONFIG`` on the
  Ray cluster (simulated end to end through KubeRay's submitter shell and
  ``ray job submit`` with fake ``ray``/``ckptmgr`` executables), on Spot GPU
  workers with a preemption hook, and retries;
- the Ray cluster-launcher YAML is a GCP config with Spot GPU workers that Ray's
  own schema accepts, and its commands and mounts point at files that exist;
- the Dockerfile's base image is pinned, its COPY sources exist and are in the
  build context, it installs the package with its GPU extras from pyproject.toml
  as it is (no rewriting), and its WORKDIR is the directory the YAMLs use;
- one image tag (the package version) is used everywhere and documented;
- the ``ckptmgr`` subcommands the deploy files run exist in the CLI;
- deploy/forward-sigterm.sh signals exactly the training processes and waits.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RAYJOB = DEPLOY / "kuberay-rayjob.yaml"
CLUSTER = DEPLOY / "cluster-gcp.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
HOOK = DEPLOY / "forward-sigterm.sh"
README = DEPLOY / "README.md"
GCS_CONFIG = ROOT / "configs" / "gcs.yaml"

DEPLOY_YAMLS = sorted(DEPLOY.glob("*.yaml")) + sorted(DEPLOY.glob("*.yml"))
CONFIG_YAMLS = sorted((ROOT / "configs").glob("*.yaml"))
GKE_SPOT = "cloud.google.com/gke-spot"

# `ckptmgr SUBCOMMAND`, where ckptmgr starts a command word (not a path or a name).
_CKPTMGR_CMD = re.compile(r"(?:^|[\s;&|{(])ckptmgr\s+([a-z][a-z-]*)\b")
_CONFIG_REF = re.compile(r"\bconfigs/[\w.-]+\.ya?ml\b")


# -- helpers -------------------------------------------------------------------------


def _yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # Docker drops comment lines inside a continuation too
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return instructions


def _instr(name: str) -> list[str]:
    return [args for keyword, args in _dockerfile() if keyword == name]


def _workdir() -> str:
    workdirs = _instr("WORKDIR")
    assert workdirs, "deploy/Dockerfile sets no WORKDIR"
    return workdirs[-1].rstrip("/")


def _repo_path(image_path: str) -> Path:
    """The repository file an absolute path inside the image comes from.

    The Dockerfile copies repository paths to the same relative paths under
    its WORKDIR, so WORKDIR/x in the image is x in the repository.
    """
    workdir = _workdir()
    assert image_path.startswith(workdir + "/"), f"{image_path} is not under the image's WORKDIR {workdir}"
    return ROOT / image_path[len(workdir) + 1:]


def _copy_sources() -> list[str]:
    sources = []
    for args in _instr("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert len(words) >= 2, f"COPY {args}: expected sources and a destination"
        sources.extend(words[:-1])
    return sources


def _base_image() -> str:
    froms = _instr("FROM")
    assert len(froms) == 1, f"expected one FROM (single stage), got {froms}"
    words = [w for w in froms[0].split() if not w.startswith("--")]
    return words[0]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _rayjob_pod_templates() -> dict[str, dict]:
    spec = _yaml(RAYJOB)["spec"]
    cluster = spec["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[f"worker:{group['groupName']}"] = group["template"]
    if spec.get("submitterPodTemplate"):
        templates["submitter"] = spec["submitterPodTemplate"]
    return templates


def _gpu_worker_group() -> dict:
    groups = [
        g for g in _yaml(RAYJOB)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0
               for c in _containers(g["template"]))
    ]
    assert len(groups) == 1, "expected exactly one worker group with nvidia.com/gpu limits"
    return groups[0]


def _images() -> set[str]:
    images = {c["image"] for t in _rayjob_pod_templates().values() for c in _containers(t)}
    docker = _yaml(CLUSTER)["docker"]
    images |= {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    return images


def _image() -> str:
    images = _images()
    assert len(images) == 1, f"the RayJob and cluster YAML name different images: {sorted(images)}"
    return images.pop()


def _project_version() -> str:
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert match, "pyproject.toml has no version"
    return match.group(1)


def _gcs_config():
    from ckptmgr.config import load_config

    return load_config(GCS_CONFIG)


def _is_spot(scheduling) -> bool:
    """GCE scheduling, as the API object or the list form in Ray's examples."""
    items = scheduling if isinstance(scheduling, list) else [scheduling or {}]
    return any(
        item.get("preemptible") is True or str(item.get("provisioningModel", "")).upper() == "SPOT"
        for item in items
    )


def _scheduling_value(scheduling, key):
    items = scheduling if isinstance(scheduling, list) else [scheduling or {}]
    for item in items:
        if key in item:
            return item[key]
    return None


def _metadata(node_config: dict) -> dict[str, str]:
    return {i["key"]: i["value"] for i in node_config.get("metadata", {}).get("items", [])}


def _commented_commands(path: Path, needle: str) -> list[str]:
    """Shell commands shown in a file's comments: '#   <command containing needle>'."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("#"):
            text = text.lstrip("#").strip()
            if needle in text and not text.startswith("("):
                out.append(text)
    return out


def _readme_shell_lines() -> list[str]:
    lines, inside = [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside and line.strip() in ("```sh", "```bash", "```shell")
            continue
        if inside:
            lines.append(line.lstrip("# ").strip())
    return lines


def _deploy_commands() -> list[str]:
    """Every command line in deploy/ that may start ckptmgr."""
    commands = [_yaml(RAYJOB)["spec"]["entrypoint"]]
    commands += [c for c in _commented_commands(CLUSTER, "ckptmgr") if re.search(r"\bray (exec|job submit)\b", c)]
    commands += _readme_shell_lines()
    commands += [args for keyword, args in _dockerfile() if keyword in ("RUN", "CMD")]
    return commands


# -- every YAML parses; every config validates ------------------------------------------


@pytest.mark.parametrize("path", DEPLOY_YAMLS + [GCS_CONFIG], ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses_to_a_mapping(path):
    assert isinstance(_yaml(path), dict)


def test_the_expected_deploy_files_exist():
    for path in (RAYJOB, CLUSTER, DOCKERFILE, DOCKERIGNORE, HOOK, README, GCS_CONFIG):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


@pytest.mark.parametrize("path", CONFIG_YAMLS, ids=lambda p: p.name)
def test_every_config_validates(path):
    from ckptmgr.config import load_config

    cfg = load_config(path)
    assert cfg.checkpoint.directory


def test_gcs_config_is_the_gpu_spot_job():
    cfg = _gcs_config()
    ckpt, ray = cfg.checkpoint, cfg.ray
    assert ckpt.directory.startswith("gs://")
    assert ckpt.storage_options == {}, "credentials come from the environment (Workload Identity / ADC)"
    assert ray.use_gpu is True
    assert ray.num_workers >= 2, "the example is multi-worker"
    assert isinstance(ckpt.save_freq, int), "save every N batches: an epoch is too long to lose on preemption"
    assert ckpt.keep_last and ckpt.keep_every_n_steps
    # keep_every_n_steps only keeps steps that were saved.
    assert ckpt.keep_every_n_steps % ckpt.save_freq == 0
    # GCP gives Spot VMs ~30 s notice.
    assert 0 < ray.grace_period_s < 30
    # A Spot cluster must never fall back to starting a local Ray instance.
    assert ray.address == "auto"


# -- the RayJob ----------------------------------------------------------------------------


def test_rayjob_kind_and_retries():
    job = _yaml(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1, "a failed attempt must be retried (and resume)"
    assert spec["shutdownAfterJobFinishes"] is True
    # Reserving entrypoint resources would let Ray place the driver on a Spot worker.
    for key in ("entrypointNumCpus", "entrypointNumGpus", "entrypointResources"):
        assert key not in spec, f"{key}: the entrypoint must stay on the (on-demand) head"


def test_rayjob_entrypoint_resumes_an_existing_config():
    entrypoint = _yaml(RAYJOB)["spec"]["entrypoint"]
    resume = re.search(r"ckptmgr\s+resume\s+(\S+\.ya?ml)", entrypoint)
    run = re.search(r"ckptmgr\s+run\s+(\S+\.ya?ml)", entrypoint)
    assert resume, f"the entrypoint does not run `ckptmgr resume CONFIG`: {entrypoint}"
    assert run and run.group(1) == resume.group(1), "the `run` fallback must use the same config"
    config = resume.group(1)
    assert (ROOT / config).is_file(), f"{config} (in the RayJob entrypoint) is not in the repository"
    assert f"cd {_workdir()}" in entrypoint, "the entrypoint must cd to the image's WORKDIR so the relative path resolves"


def _fake_tools(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Fake `ray` and `ckptmgr` executables; the log records each ckptmgr call.

    `ray job submit ... -- ARGS` does what the real one and the job supervisor do
    with the entrypoint: list2cmdline(ARGS), then run it with a shell, marked as
    running on the Ray cluster. `ray exec CLUSTER CMD` runs CMD in a shell there.
    `ray job status` says the job does not exist yet.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    (bin_dir / "ray").write_text(
        f"#!{sys.executable}\n"
        "import os, subprocess, sys\n"
        "args = sys.argv[1:]\n"
        "env = dict(os.environ, FAKE_WHERE='cluster')\n"
        "if args[:2] == ['job', 'status']:\n"
        "    sys.exit(1)\n"
        "if args[:2] == ['job', 'submit']:\n"
        "    cmd = subprocess.list2cmdline(args[args.index('--') + 1:])\n"
        "elif args[0] == 'exec':\n"
        "    cmd = args[-1]\n"
        "else:\n"
        "    sys.exit('fake ray: unexpected ' + ' '.join(args))\n"
        "sys.exit(subprocess.call(cmd, shell=True, env=env))\n",
        encoding="utf-8",
    )
    (bin_dir / "ckptmgr").write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(' '.join([os.environ.get('FAKE_WHERE', 'submitter'), os.getcwd()] + sys.argv[1:]) + '\\n')\n"
        "if len(sys.argv) < 3 or not os.path.isfile(sys.argv[2]):\n"
        "    sys.exit('fake ckptmgr: no such config')\n"
        "sys.exit(int(os.environ.get('FAKE_RESUME_RC', '1')) if sys.argv[1] == 'resume' else 0)\n",
        encoding="utf-8",
    )
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return env, log


def _run_shell(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # The image's WORKDIR is the repository root, for this simulation.
    command = command.replace(_workdir(), shlex.quote(str(ROOT)))
    return subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=60)


def _kuberay_submitter_command(entrypoint: str) -> str:
    # What KubeRay's K8sJobMode submitter runs (ray-operator common/job.go):
    # the entrypoint pasted unquoted after `--`, in a shell.
    address = "http://ckptmgr-example-head-svc:8265"
    return (
        f"if ! ray job status --address {address} ckptmgr-example-1 >/dev/null 2>&1 ; then "
        f"ray job submit --address {address} --no-wait --submission-id ckptmgr-example-1 -- "
        f"{entrypoint.strip()} ; fi ; echo submitted"
    )


@pytest.mark.parametrize(
    "resume_rc, expected",
    [
        (1, ["resume", "run"]),  # no checkpoint yet (or the run failed): fall back to run
        (0, ["resume"]),  # resumed and finished: nothing else
    ],
    ids=["resume-fails", "resume-succeeds"],
)
def test_rayjob_entrypoint_runs_on_the_cluster_through_kuberay_quoting(tmp_path, resume_rc, expected):
    entrypoint = _yaml(RAYJOB)["spec"]["entrypoint"]
    env, log = _fake_tools(tmp_path)
    env["FAKE_RESUME_RC"] = str(resume_rc)
    proc = _run_shell(_kuberay_submitter_command(entrypoint), env)
    assert proc.returncode == 0, proc.stderr
    calls = [line.split() for line in log.read_text(encoding="utf-8").splitlines()]
    config = re.search(r"ckptmgr\s+resume\s+(\S+)", entrypoint).group(1)
    # Every ckptmgr call ran on the Ray cluster (not in the submitter pod), in
    # the image's WORKDIR, with the same config.
    assert calls == [["cluster", str(ROOT), sub, config] for sub in expected]


def test_rayjob_gpu_workers_target_spot():
    cfg = _gcs_config()
    group = _gpu_worker_group()
    pod = group["template"]["spec"]
    assert group["replicas"] == cfg.ray.num_workers, "one training worker per GPU pod"
    assert group.get("minReplicas", group["replicas"]) <= group["replicas"] <= group.get("maxReplicas", group["replicas"])
    assert pod["nodeSelector"][GKE_SPOT] == "true", "nodeSelector values must be the string \"true\""
    assert any(t.get("key") == GKE_SPOT and t.get("effect") == "NoSchedule" for t in pod.get("tolerations", []))
    assert pod.get("nodeSelector", {}).get("cloud.google.com/gke-accelerator"), "pick the GPU node pool"
    (container,) = _containers(group["template"])
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1 and cfg.ray.use_gpu
    cpus = float(str(limits["cpu"]).removesuffix("m")) / (1000 if str(limits["cpu"]).endswith("m") else 1)
    assert cpus >= cfg.ray.cpus_per_worker, "a GPU pod must fit one training worker's CPUs"
    # Spot notice is ~30 s: the pod's grace covers ckptmgr's, and no more.
    assert cfg.ray.grace_period_s <= pod["terminationGracePeriodSeconds"] <= 30


def test_rayjob_worker_prestop_hook_forwards_sigterm():
    cfg = _gcs_config()
    (container,) = _containers(_gpu_worker_group()["template"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    scripts = [word for word in command if word.endswith(".sh")]
    assert len(scripts) == 1, f"preStop should run the hook script: {command}"
    assert _repo_path(scripts[0]) == HOOK
    assert command[-1] == str(int(cfg.ray.grace_period_s)), "the hook waits ray.grace_period_s"


def test_rayjob_head_and_submitter_stay_off_spot_and_gpus():
    for name, template in _rayjob_pod_templates().items():
        if not name.startswith("worker:"):
            spec = template["spec"]
            assert spec.get("nodeSelector", {}).get(GKE_SPOT) != "true", f"{name} must not run on Spot"
            terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            assert any(
                e["key"] == GKE_SPOT and e["operator"] == "DoesNotExist"
                for term in terms for e in term.get("matchExpressions", [])
            ), f"{name}: require nodes without {GKE_SPOT}"
            for c in _containers(template):
                assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})


def test_rayjob_ray_version_matches_the_image():
    tag = _base_image().rpartition(":")[2]
    ray_version = _yaml(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"]
    assert isinstance(ray_version, str) and tag.startswith(ray_version + "-")


# -- the Ray cluster launcher YAML ------------------------------------------------------------


def _cluster_types() -> tuple[str, dict, dict[str, dict]]:
    cluster = _yaml(CLUSTER)
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    return head, types[head], workers


def _gpu_spot_types() -> dict[str, dict]:
    _, _, workers = _cluster_types()
    return {
        name: t for name, t in workers.items()
        if t["node_config"].get("guestAccelerators") and _is_spot(t["node_config"].get("scheduling"))
    }


def test_cluster_is_gcp_with_spot_gpu_workers():
    cfg = _gcs_config()
    cluster = _yaml(CLUSTER)
    assert cluster["provider"]["type"] == "gcp"
    for key in ("region", "availability_zone", "project_id"):
        assert cluster["provider"].get(key), f"provider.{key} (placeholder) is missing"
    gpu_types = _gpu_spot_types()
    assert gpu_types, "no worker type with guestAccelerators and Spot/preemptible scheduling"
    for name, node_type in gpu_types.items():
        config = node_type["node_config"]
        accelerators = sum(a["acceleratorCount"] for a in config["guestAccelerators"])
        assert node_type["resources"].get("GPU") == accelerators == 1, f"{name}: one GPU per training worker"
        assert node_type["resources"].get("CPU", 0) >= cfg.ray.cpus_per_worker
        assert node_type.get("min_workers", 0) == cfg.ray.num_workers <= node_type.get("max_workers", 0)
        # GPUs cannot live-migrate: GCE requires TERMINATE on host maintenance.
        assert _scheduling_value(config["scheduling"], "onHostMaintenance") == "TERMINATE"
        assert _metadata(config).get("install-nvidia-driver") in ("True", "true")
        # GCS writes need a scope beyond the default read-only storage scope.
        scopes = {s for sa in config.get("serviceAccounts", []) for s in sa.get("scopes", [])}
        assert scopes & {
            "https://www.googleapis.com/auth/cloud-platform",
            "https://www.googleapis.com/auth/devstorage.read_write",
            "https://www.googleapis.com/auth/devstorage.full_control",
        }, f"{name}: workers cannot write gs:// with the default scopes"
    assert cluster["max_workers"] >= cfg.ray.num_workers


def test_cluster_head_is_on_demand_without_gpus():
    _, head, _ = _cluster_types()
    config = head["node_config"]
    assert not config.get("guestAccelerators")
    assert not _is_spot(config.get("scheduling")), "the head runs the driver and the coordinator"
    assert not head["resources"].get("GPU")


def test_cluster_shutdown_script_forwards_sigterm_into_the_container():
    cfg = _gcs_config()
    container = _yaml(CLUSTER)["docker"]["container_name"]
    for name, node_type in _gpu_spot_types().items():
        script = _metadata(node_type["node_config"]).get("shutdown-script", "")
        match = re.search(rf"docker exec {re.escape(container)} (?:sh )?(\S+\.sh) (\d+)", script)
        assert match, f"{name}: the shutdown-script must run the hook in container {container!r}"
        assert _repo_path(match.group(1)) == HOOK
        assert int(match.group(2)) == int(cfg.ray.grace_period_s)


def test_cluster_file_mounts_and_config_references_exist():
    cluster = _yaml(CLUSTER)
    for remote, local in cluster.get("file_mounts", {}).items():
        assert (ROOT / local).exists(), f"file_mounts source {local} does not exist (relative to the repo root)"
        assert _repo_path(remote) == (ROOT / local).resolve(), f"{remote} should mirror {local}"
    for path in DEPLOY_YAMLS + [README, DOCKERFILE]:
        for ref in _CONFIG_REF.findall(path.read_text(encoding="utf-8")):
            assert (ROOT / ref).is_file(), f"{path.name} refers to {ref}, which does not exist"


def test_cluster_commands_start_ckptmgr_on_the_cluster(tmp_path):
    """The `ray exec` / `ray job submit` lines in the comments work as shown."""
    commands = [c for c in _commented_commands(CLUSTER, "ckptmgr resume") if re.search(r"\bray (exec|job submit)\b", c)]
    assert len(commands) >= 2, "show both `ray exec` and `ray job submit`"
    for command in commands:
        assert re.search(r"ckptmgr\s+resume\s+configs/gcs\.yaml", command)
        env, log = _fake_tools(tmp_path / str(commands.index(command)))
        proc = _run_shell(command, env)
        assert proc.returncode == 0, f"{command}\n{proc.stderr}"
        calls = [line.split() for line in log.read_text(encoding="utf-8").splitlines()]
        assert calls == [["cluster", str(ROOT), "resume", "configs/gcs.yaml"],
                         ["cluster", str(ROOT), "run", "configs/gcs.yaml"]], command


def test_cluster_yaml_passes_rays_schema():
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(_yaml(CLUSTER))  # fills defaults, as `ray up` does
    util.validate_config(config)


# -- the Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_base_image_is_pinned():
    image = _base_image()
    tag = image.split("@")[0].rpartition(":")[2]
    assert ":" in image.split("@")[0] and "/" not in tag, f"base image {image} has no tag"
    assert tag != "latest" and not tag.startswith("latest-"), f"base image {image} is not pinned"
    assert re.match(r"\d+\.\d+\.\d+", tag), f"base image {image}: pin a version, e.g. 2.60.0-py311-gpu"
    assert "gpu" in tag or "cu" in tag, "the workers train on GPUs: use a CUDA base image"


def test_dockerfile_base_ray_version_is_allowed_by_pyproject():
    specifiers = pytest.importorskip("packaging.specifiers")
    version = re.match(r"\d+\.\d+\.\d+", _base_image().rpartition(":")[2]).group(0)
    deps = [d for d in _pyproject_extras()["ray"] if re.match(r"ray[\[\s<>=!~;]", d)]
    assert len(deps) == 1
    spec = re.sub(r"^ray(\[[^\]]*\])?", "", deps[0]).split(";")[0].strip()
    assert version in specifiers.SpecifierSet(spec), f"image Ray {version} is outside pyproject's {deps[0]}"


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context():
    sources = _copy_sources()
    assert sources
    ignore = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.strip().startswith("#")]
    allowlist = ignore[0] == "*"
    for source in sources:
        path = source.rstrip("/")
        assert not os.path.isabs(path) and ".." not in Path(path).parts, f"COPY {source}: outside the context"
        assert (ROOT / path).exists(), f"COPY {source}: not in the repository"
        if allowlist:
            assert f"!{path}" in ignore, f"COPY {source}: excluded by {DOCKERIGNORE.name}; add !{path}"
        else:
            assert path not in ignore and f"{path}/" not in ignore


def _pip_installs() -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN lines."""
    installs = []
    for run in _instr("RUN"):
        lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word not in ("&&", "||", ";", "|"):
                command.append(word)
                continue
            if command[:2] == ["pip", "install"] or command[1:4] == ["-m", "pip", "install"]:
                installs.append(command[command.index("install") + 1:])
            command = []
    return installs


def dockerfile_requirements() -> list[str]:
    """What the Dockerfile asks pip for: the same requirement in every install."""
    installs = _pip_installs()
    assert installs, "the Dockerfile pip-installs nothing"
    requirements = {tuple(w for w in args if not w.startswith("-")) for args in installs}
    assert len(requirements) == 1, f"the installs ask for different things: {sorted(requirements)}"
    return list(requirements.pop())


def test_dockerfile_installs_the_package_with_its_extras_and_no_rewriting():
    """`pip install ".[tensorflow,ray,gcs]"` from pyproject.toml as it is: no
    generated requirements file, no --no-deps, no script between pyproject
    and pip, and TensorFlow from the GPU-capable `tensorflow` extra."""
    for args in _pip_installs():
        assert not {"-r", "--requirement", "-c", "--constraint", "--no-deps"} & set(args), args
    assert dockerfile_requirements() == [".[tensorflow,ray,gcs]"]
    extras = _pyproject_extras()
    for name in ("tensorflow", "ray", "gcs"):
        assert name in extras, f"pyproject.toml has no [{name}] extra"
    runs = " && ".join(_instr("RUN"))
    assert not re.search(r"\bpython3? (?!-c)\S+\.py\b", runs), "a script runs during the build"
    assert not [s for s in _copy_sources() if s.endswith(".py")], "a script is copied into the build"
    assert "ckptmgr --help" in runs, "smoke-test the console script in the image"
    assert "import ckptmgr.cli, tensorflow" in runs, "check TensorFlow imports in the image"


def test_tensorflow_extra_is_the_gpu_capable_wheel():
    """The [tensorflow] extra names the standard `tensorflow` distribution
    (with TensorFlow's CUDA libraries on Linux x86_64), never tensorflow-cpu;
    the core dependencies name no backend at all."""
    requirements = pytest.importorskip("packaging.requirements")
    extras = _pyproject_extras()
    core = [requirements.Requirement(d).name for d in _pyproject_deps()]
    assert not {"tensorflow", "tensorflow-cpu", "ray", "gcsfs", "s3fs", "jax", "torch"} & set(core), core
    tf = [requirements.Requirement(d) for d in extras["tensorflow"]]
    assert {r.name for r in tf} == {"tensorflow"}
    for env, cuda in (({"sys_platform": "linux", "platform_machine": "x86_64"}, True),
                      ({"sys_platform": "linux", "platform_machine": "aarch64"}, False),
                      ({"sys_platform": "darwin", "platform_machine": "arm64"}, False)):
        chosen = [r for r in tf if r.marker is None or r.marker.evaluate(env)]
        assert len(chosen) == 1, (env, [str(r) for r in tf])
        assert ("and-cuda" in chosen[0].extras) is cuda, (env, str(chosen[0]))
    assert {requirements.Requirement(d).name for d in extras["tensorflow-cpu"]} == {"tensorflow-cpu"}


def test_dockerfile_workdir_is_where_the_yamls_look():
    workdir = _workdir()
    assert "/ckptmgr" in workdir
    for path in (RAYJOB, CLUSTER):
        assert workdir in path.read_text(encoding="utf-8"), f"{path.name} does not use the image's WORKDIR {workdir}"
    for source in ("configs/", "ckptmgr/", "pyproject.toml"):
        assert any(s.rstrip("/") == source.rstrip("/") for s in _copy_sources()), f"the image lacks {source}"


def test_dockerfile_leaves_the_entrypoint_to_ray():
    # KubeRay sets the container command; the cluster launcher runs `docker run IMAGE bash`.
    assert not _instr("ENTRYPOINT"), "an ENTRYPOINT would be prepended to `bash` by the Ray cluster launcher"
    (cmd,) = _instr("CMD")
    assert "ckptmgr" in cmd


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _pyproject_deps() -> list[str]:
    return _pyproject()["dependencies"]


def _pyproject_extras() -> dict[str, list[str]]:
    return _pyproject()["optional-dependencies"]


# -- one image, one tag, documented ----------------------------------------------------------------


def test_one_image_everywhere_tagged_with_the_package_version():
    image = _image()
    name, _, tag = image.rpartition(":")
    assert name and "/" in name, f"{image}: use a registry path"
    assert tag == _project_version(), f"{image}: tag it with the package version {_project_version()}"
    assert tag != "latest"


def test_image_build_and_use_are_documented():
    image = _image()
    build = f"docker build -f deploy/Dockerfile -t {image} ."
    readme = README.read_text(encoding="utf-8")
    assert build in readme, f"deploy/README.md should show: {build}"
    assert build in DOCKERFILE.read_text(encoding="utf-8")
    assert f"docker push {image}" in readme
    assert "kubectl apply -f deploy/kuberay-rayjob.yaml" in readme
    assert "ray up deploy/cluster-gcp.yaml" in readme
    assert "configs/gcs.yaml" in readme and "YOUR_BUCKET" in readme, "say where to put the bucket"


# -- the CLI has the subcommands the deploy files run -----------------------------------------------


def _ckptmgr_cmd() -> list[str]:
    script = Path(sys.executable).with_name("ckptmgr")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ckptmgr.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return subprocess.run(_ckptmgr_cmd() + list(args), env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_deploy_subcommands_exist_in_the_cli():
    used = {m for command in _deploy_commands() for m in _CKPTMGR_CMD.findall(command)}
    assert {"resume", "run"} <= used
    top = _cli("--help")
    assert top.returncode == 0, top.stderr
    listed = set(re.findall(r"^\W*([a-z][a-z-]*)\s{2,}", top.stdout, flags=re.M))
    for sub in sorted(used):
        assert sub in listed, f"`ckptmgr {sub}` is used in deploy/ but not listed by `ckptmgr --help`"
        result = _cli(sub, "--help")
        assert result.returncode == 0, f"`ckptmgr {sub} --help` failed: {result.stderr}"
        assert "CONFIG" in result.stdout or sub not in ("run", "resume")


# -- the preemption hook ---------------------------------------------------------------------------------


def test_hook_pattern_names_the_training_actor():
    """The hook's default pattern, ray::NAME, is the Ray actor class that trains."""
    match = re.search(r"CKPTMGR_WORKER_PATTERN:-ray::([A-Za-z_]\w*)\}", HOOK.read_text(encoding="utf-8"))
    assert match, "forward-sigterm.sh: default pattern ray::ClassName not found"
    name = match.group(1)
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "ckptmgr").rglob("*.py"))
    assert re.search(rf"^class {name}\b", sources, flags=re.M), f"no class {name} in ckptmgr/"
    assert re.search(rf"ray\.remote\([^)]*\)\(\s*{name}\s*\)|@ray\.remote[^\n]*\n(?:@[^\n]*\n)*class {name}\b", sources), (
        f"{name} is not made a Ray actor in ckptmgr/; update the hook's pattern"
    )


_CHILD = """
import signal, sys, time
marker, ready, got, exit_on_term = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
def on_term(signum, frame):
    open(got, "w").write("SIGTERM")
    if exit_on_term:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(ready, "w").write("ready")
deadline = time.time() + 60
while time.time() < deadline:
    time.sleep(0.05)
"""


def _spawn(tmp_path: Path, tag: str, marker: str, exit_on_term: bool = True) -> tuple[subprocess.Popen, Path]:
    ready, got = tmp_path / f"{tag}.ready", tmp_path / f"{tag}.got"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, marker, str(ready), str(got), "1" if exit_on_term else "0"])
    deadline = time.time() + 30
    while not ready.exists():
        assert child.poll() is None and time.time() < deadline, "helper process did not start"
        time.sleep(0.02)
    return child, got


def _hook(grace: int, pattern: str) -> tuple[subprocess.CompletedProcess, float]:
    # The drain step is tested against a real Ray cluster (tests/test_memory_tier.py).
    env = dict(os.environ, CKPTMGR_WORKER_PATTERN=pattern, CKPTMGR_DRAIN="0")
    start = time.monotonic()
    proc = subprocess.run(["sh", str(HOOK), str(grace)], env=env, capture_output=True, text=True, timeout=grace + 30)
    return proc, time.monotonic() - start


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc (Linux)")
def test_hook_signals_matching_processes_and_returns_when_they_exit(tmp_path):
    marker = f"ray::CkptmgrHookTest{os.getpid()}x{time.time_ns()}"
    worker, worker_got = _spawn(tmp_path, "worker", marker)
    bystander, bystander_got = _spawn(tmp_path, "bystander", "ray::SomethingElse")
    try:
        proc, elapsed = _hook(20, marker)
        assert proc.returncode == 0, proc.stderr
        assert worker_got.read_text() == "SIGTERM"
        assert worker.wait(timeout=10) == 0
        assert elapsed < 15, "the hook should return once the workers have exited"
        assert bystander.poll() is None and not bystander_got.exists(), "only matching processes are signalled"
    finally:
        for p in (worker, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc (Linux)")
def test_hook_waits_out_the_grace_period_while_a_worker_is_saving(tmp_path):
    marker = f"ray::CkptmgrHookTest{os.getpid()}y{time.time_ns()}"
    worker, got = _spawn(tmp_path, "saving", marker, exit_on_term=False)
    try:
        proc, elapsed = _hook(2, marker)
        assert proc.returncode == 0, proc.stderr
        assert got.read_text() == "SIGTERM"
        assert 1.5 <= elapsed < 10
        assert worker.poll() is None, "the hook never kills: Kubernetes/GCE do that after the grace period"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()


def test_hook_without_matching_processes_returns_at_once():
    proc, elapsed = _hook(30, f"ray::NoSuchActor{time.time_ns()}")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
    assert elapsed < 10
