"""Job configuration: a YAML file validated by pydantic, plus ``--set`` overrides.

Runs on the coordinator (the CLI); the validated :class:`JobConfig` is plain
data, so it can be shipped to Ray workers as is.

Every problem is reported as one :class:`~ckptmgr.errors.ConfigError` line that
names the file (or the ``--set`` override) and the field, says what was
received and what to do, e.g.::

    configs/x.yaml: unknown field 'checkpoint.keep_lst'. Did you mean 'keep_last'?

Paths: a ``checkpoint.directory`` without a URL scheme (``gs://``, ``s3://``,
``memory://``, ``file://``...) is a local path; when relative, it is resolved
against the *current working directory* of the process that loads the config
(not the directory of the YAML file), and ``~`` is expanded. The stored value
is then absolute, so workers started elsewhere write to the same place.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ckptmgr.cadence import parse_mtbf
from ckptmgr.errors import ConfigError
from ckptmgr.retention import RetentionPolicy, parse_duration
from ckptmgr.user_code import UserCode, check_module_name, parse_custom_object

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading ``1e-3`` as a float.

    PyYAML follows YAML 1.1, whose floats need a dot (``1.0e-3``), so
    ``learning_rate: 1e-3`` would be the string ``"1e-3"``; YAML 1.2 and JSON
    read it as a number, and so does this loader.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader


class _Section(BaseModel):
    # strict: YAML already gives typed scalars; "5" for an int is a mistake.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class MemoryTierConfig(_Section):
    """The memory tier (Ray runs): snapshots in host RAM on other nodes,
    restored first when newer than storage (see ckptmgr.ray.keepers)."""

    every_steps: int | None = Field(None, ge=1)  # None: off
    replicas: int = Field(2, ge=1)  # nodes holding each snapshot


class CheckpointConfig(_Section):
    """Where and how often to checkpoint, and what to keep."""

    directory: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    save_freq: Literal["epoch", "auto"] | int = "epoch"
    mtbf: str | int | float | None = None  # save_freq: auto only; one node's, e.g. "24h"
    keep_last: int | None = Field(None, ge=1)
    keep_every_n_steps: int | None = Field(None, ge=1)
    keep_best: str | None = None
    keep_best_mode: Literal["min", "max", "auto"] = "min"  # auto: from the name, as Keras
    keep_within: str | None = None
    on_busy: Literal["newest", "wait", "skip"] = "newest"  # see ckptmgr.pipeline
    prune_interval_s: float = Field(60.0, gt=0)
    checksum: Literal["crc32c", "sha256"] = "crc32c"  # see ckptmgr.io.checksums
    memory_tier: MemoryTierConfig = Field(default_factory=MemoryTierConfig)

    @field_validator("directory")
    @classmethod
    def _resolve_directory(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("use a local path or a URL such as gs://bucket/run")
        if _SCHEME_RE.match(value):
            return value
        return os.path.abspath(os.path.expanduser(value))

    @field_validator("save_freq", mode="before")
    @classmethod
    def _check_save_freq(cls, value: Any) -> Any:
        if value in ("epoch", "auto") or (type(value) is int and value >= 1):
            return value
        raise ValueError("use 'epoch', 'auto' or a number of batches >= 1, e.g. save_freq: 100")

    @field_validator("mtbf", mode="before")
    @classmethod
    def _check_mtbf(cls, value: Any) -> Any:
        if value is not None:
            parse_mtbf(value)  # ConfigError is a ValueError: pydantic reports it
        return value

    @field_validator("keep_within")
    @classmethod
    def _check_duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)  # ConfigError is a ValueError: pydantic reports it
        return value

    @model_validator(mode="after")
    def _check_retention(self) -> CheckpointConfig:
        self.retention_policy()  # e.g. keep_best_mode without keep_best
        return self

    @model_validator(mode="after")
    def _mtbf_needs_auto(self) -> CheckpointConfig:
        if self.mtbf is not None and self.save_freq != "auto":
            raise ConfigError(
                f"Invalid mtbf: Received: mtbf={self.mtbf!r} with save_freq={self.save_freq!r}. "
                "mtbf sets the interval of save_freq: auto only; set save_freq: auto, or drop mtbf."
            )
        return self

    def retention_options(self) -> dict[str, Any]:
        """The ``keep_*`` options, as CheckpointCallback/CheckpointManager take them."""
        return {
            "keep_last": self.keep_last,
            "keep_every_n_steps": self.keep_every_n_steps,
            "keep_best": self.keep_best,
            "keep_best_mode": self.keep_best_mode,
            "keep_within": self.keep_within,
        }

    def retention_policy(self) -> RetentionPolicy:
        return RetentionPolicy.from_options(**self.retention_options())


class TrainingConfig(_Section):
    """The example job's synthetic data and model."""

    epochs: int = Field(3, ge=1)
    samples: int = Field(2048, ge=1)
    batch_size: int = Field(64, ge=1)
    features: int = Field(32, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    learning_rate: float = Field(1e-3, gt=0)
    seed: int = 1234
    shuffle: bool = False

    @field_validator("hidden")
    @classmethod
    def _check_hidden(cls, value: list[int]) -> list[int]:
        if any(units < 1 for units in value):
            raise ValueError("use a list of layer widths >= 1, e.g. [64, 64]")
        return value


class RayConfig(_Section):
    """Multi-worker training on a Ray cluster (``ckptmgr resume --address``)."""

    address: str | None = None
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    grace_period_s: float = Field(25.0, ge=0)
    save_timeout_s: float = Field(120.0, gt=0)
    # Ranks write byte ranges of each archive (ckptmgr.ranged_write): "auto" on
    # gs:// and s3://; true also for a local path every node shares.
    parallel_write: Literal["auto"] | bool = "auto"
    # After a preemption or a lost node, start the workers again (on the nodes
    # left or new ones) from the newest tier, up to this many times.
    max_restarts: int = Field(0, ge=0)
    # Keep the run's coordinator actor after the job finished (it is detached);
    # by default a finished run stops it and its keepers (`ckptmgr coordinators`).
    keep_coordinator: bool = False
    # Stream the workers' logs (training output, save lines) to the driver (`--verbose`).
    worker_logs: bool = False


class UserCodeConfig(_Section):
    """Python code the job's model needs (``ckptmgr.user_code``), imported in every
    process that trains before the model is built; the CLI's ``--import`` and
    ``--custom-object`` add to it."""

    imports: list[str] = Field(default_factory=list)  # module names
    custom_objects: dict[str, str] = Field(default_factory=dict)  # NAME: "MODULE:ATTR"

    @field_validator("imports")
    @classmethod
    def _check_imports(cls, value: list[str]) -> list[str]:
        for module in value:
            check_module_name(module)  # ConfigError is a ValueError: pydantic reports it
        return value

    @field_validator("custom_objects")
    @classmethod
    def _check_custom_objects(cls, value: dict[str, str]) -> dict[str, str]:
        for name, target in value.items():
            parse_custom_object(f"{name}={target}")
        return value

    def user_code(self) -> UserCode:
        return UserCode.of(self.imports, [f"{k}={v}" for k, v in self.custom_objects.items()])


class JobConfig(_Section):
    """A whole job: ``name``, ``checkpoint``, ``training``, ``ray``, ``user_code``."""

    name: str = "example"
    checkpoint: CheckpointConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    user_code: UserCodeConfig = Field(default_factory=UserCodeConfig)
    _source: str = PrivateAttr(default="<config>")

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # "ray:" with nothing under it parses as None; treat it as all defaults.
        if isinstance(data, dict):
            sections = ("checkpoint", "training", "ray", "user_code")
            data = {k: ({} if v is None and k in sections else v) for k, v in data.items()}
        return data

    @property
    def source(self) -> str:
        """The file this config came from (for error messages)."""
        return self._source


def load_config(path: str | os.PathLike) -> JobConfig:
    """Read and validate a YAML job config; any problem is one ConfigError line."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: config file not found. Pass the path of a YAML job config, "
            "e.g. configs/local.yaml."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a config file. Pass a YAML file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc}.") from None
    try:
        data = _yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}. Fix the syntax.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (checkpoint, "
            f"training, ray, user_code). Received: {type(data).__name__}."
        )
    return _validate(data, source)


def apply_overrides(cfg: JobConfig, overrides: list[str] | None) -> JobConfig:
    """Return a copy of ``cfg`` with ``dotted.key=value`` overrides, re-validated.

    Values are parsed as YAML scalars (``5`` is an int, ``true`` a bool,
    ``[32, 16]`` a list, ``null`` None); a missing key under a free-form mapping
    such as ``checkpoint.storage_options.token=anon`` is created.
    """
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"--set {item}: expected key=value with a dotted key. Received: {item!r}. "
                "Use e.g. --set training.epochs=5."
            )
        try:
            value = _yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        values[key] = value
        labels[key] = f"--set {item}"
    return set_values(cfg, values, labels)


def set_values(cfg: JobConfig, values: dict[str, Any], labels: dict[str, str] | None = None) -> JobConfig:
    """Return a copy of ``cfg`` with already-typed values set at dotted keys."""
    labels = labels or {}
    data = cfg.model_dump()
    for key, value in values.items():
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None and isinstance(node, dict) and part not in node:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"{labels.get(key, key)}: '{where}' is a value, not a section. "
                    f"Received: {key}. Set '{where}' itself instead."
                )
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return _validate(data, cfg.source, labels)


# -- errors -----------------------------------------------------------------


def _validate(data: dict[str, Any], source: str, labels: dict[str, str] | None = None) -> JobConfig:
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, source, labels or {}) from None
    cfg._source = source
    return cfg


def _config_error(exc: ValidationError, source: str, labels: dict[str, str]) -> ConfigError:
    """One line for the first problem pydantic found."""
    error = exc.errors(include_url=False)[0]
    loc = tuple(str(p) for p in error["loc"])
    dotted = ".".join(loc)
    # Name the --set override that introduced the bad value, if one did.
    for key, label in labels.items():
        if dotted == key or dotted.startswith(key + ".") or (loc and key.startswith(dotted + ".")):
            source = label
            break
    kind = error["type"]
    if kind == "extra_forbidden":
        return ConfigError(f"{source}: unknown field '{dotted}'. {_suggest(loc)}")
    if kind == "missing":
        return ConfigError(
            f"{source}: missing required field '{dotted}'. Add it, e.g. "
            f"{_example(loc)}."
        )
    where = f"'{dotted}'" if dotted else "the config"
    msg = error["msg"]
    if kind == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # already says what was received
            return ConfigError(f"{source}: {where}: {cause}")
        msg = str(cause) if cause is not None else msg.removeprefix("Value error, ")
    field = loc[-1] if loc else "config"
    received = _short(error.get("input"))
    if source.startswith("--set "):
        fix = "Fix the --set value."
    else:
        fix = f"Fix it in the file or with --set {dotted or 'key'}=..."
    return ConfigError(
        f"{source}: invalid value for {where}: {msg.rstrip('.')}. "
        f"Received: {field}={received}. {fix}"
    )


def _suggest(loc: tuple[str, ...]) -> str:
    model: type[BaseModel] | None = JobConfig
    for part in loc[:-1]:
        info = model.model_fields.get(part) if model else None
        annotation = info.annotation if info else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is None:
        return "Remove it."
    fields = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.6)
    if close:
        return f"Did you mean '{close[0]}'?"
    section = f" in '{'.'.join(loc[:-1])}'" if len(loc) > 1 else ""
    return f"Remove it; valid fields{section}: {', '.join(fields)}."


def _example(loc: tuple[str, ...]) -> str:
    if loc == ("checkpoint",):
        return "checkpoint: {directory: ./checkpoints}"
    if loc == ("checkpoint", "directory"):
        return "checkpoint.directory: ./checkpoints"
    return f"{'.'.join(loc)}: ..."


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
