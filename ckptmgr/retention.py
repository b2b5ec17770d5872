"""Which checkpoints to keep: pure rules, no I/O.

Modelled on Orbax's preservation policies, kept small. Rules combine as a
union: a checkpoint survives if any rule keeps it. Two guarantees hold whatever
the rules: the newest checkpoint is never deleted (keep-best must not throw away
the run's latest progress) and pinned checkpoints are never deleted. Deciding is
separate from deleting so callers can show a dry run with the reasons.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Mapping, Sequence

from ckptmgr.errors import ConfigError

_UNIT_SECONDS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_RE = re.compile(r"(?:\d+[smhdw])+")
_PART_RE = re.compile(r"(\d+)([smhdw])")
_MAX_DURATION_S = 100 * 365 * 86400

# mode="auto", as Keras infers it: "loss" goes down, and a compiled metric goes the
# way its ``_direction`` says. Keras reads that from the model; retention runs
# without one (coordinator, CLI), so these are the names fit() logs for Keras's
# own metrics, by direction (tests/test_best.py checks them against Keras).
_MAX_METRICS = frozenset({
    "accuracy", "acc", "binary_accuracy", "categorical_accuracy",
    "sparse_categorical_accuracy", "top_k_categorical_accuracy",
    "sparse_top_k_categorical_accuracy", "auc", "precision", "recall", "f1_score",
    "fbeta_score", "r2_score", "io_u", "binary_io_u", "mean_io_u", "one_hot_io_u",
    "one_hot_mean_io_u", "pearson_correlation", "concordance_correlation",
    "cosine_similarity", "precision_at_recall", "recall_at_precision",
    "sensitivity_at_specificity", "specificity_at_sensitivity",
})
_MIN_METRICS = frozenset({
    "loss", "mae", "mse", "mape", "msle", "mean_absolute_error", "mean_squared_error",
    "mean_absolute_percentage_error", "mean_squared_logarithmic_error",
    "root_mean_squared_error", "binary_crossentropy", "categorical_crossentropy",
    "sparse_categorical_crossentropy", "hinge", "squared_hinge", "categorical_hinge",
    "kl_divergence", "poisson", "logcosh",
})
_INSTANCE_SUFFIX_RE = re.compile(r"_\d+$")  # Keras names a second AUC "auc_1"
MODES = ("min", "max", "auto")


def _invalid(name: str, value: object, fix: str) -> ConfigError:
    """One-line error: what was wrong, what was received, what to do."""
    return ConfigError(f"Invalid {name}: Received: {name.split('.')[-1]}={value!r}. {fix}")


def _is_int(value: object, minimum: int) -> bool:
    # bool is an int subclass; True must not silently mean 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def infer_mode(metric: str, *, option: str = "mode") -> Literal["min", "max"]:
    """Keras's ``mode="auto"`` from a logged name: ``"max"`` for accuracy, AUC,
    precision..., ``"min"`` for losses and errors.

    ``val_``, an output's prefix (``out_a_accuracy``) and Keras's instance
    suffix (``auc_1``) are ignored. Like Keras, a name whose direction is not
    known is refused rather than guessed.
    """
    name = _INSTANCE_SUFFIX_RE.sub("", metric.removeprefix("val_"))
    for known, mode in ((_MAX_METRICS, "max"), (_MIN_METRICS, "min")):
        if any(name == k or name.endswith("_" + k) for k in known):
            return mode  # type: ignore[return-value]
    raise ConfigError(
        f"Invalid {option}: Received: {option}='auto' for metric {metric!r}, whose "
        f"direction Keras cannot infer. Use {option}='min' (lower is better) or {option}='max'."
    )


def _require_aware(name: str, value: object) -> None:
    # Naive datetimes cannot be compared with aware ones; fail early and clearly.
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise _invalid(name, value, "Use an aware datetime, e.g. datetime.now(timezone.utc).")


@dataclass(frozen=True)
class CheckpointInfo:
    """What retention needs to know about one committed checkpoint."""

    step: int
    created: datetime  # timezone-aware UTC
    metrics: Mapping[str, float] = field(default_factory=dict)
    pinned: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.step, 0):
            raise _invalid("CheckpointInfo.step", self.step, "Use an integer >= 0.")
        _require_aware("CheckpointInfo.created", self.created)


@dataclass(frozen=True)
class KeepLast:
    """Keep the newest ``n`` checkpoints by step."""

    n: int

    def __post_init__(self) -> None:
        if not _is_int(self.n, 1):
            raise _invalid("KeepLast.n", self.n, "Use an integer >= 1, e.g. KeepLast(n=3).")

    @property
    def reason(self) -> str:
        return f"keep_last={self.n}"

    def select(self, ckpts: Sequence[CheckpointInfo], now: datetime) -> set[int]:
        return set(sorted(c.step for c in ckpts)[-self.n :])


@dataclass(frozen=True)
class KeepEveryNSteps:
    """Keep checkpoints whose step is a multiple of ``k``: long-term milestones."""

    k: int

    def __post_init__(self) -> None:
        if not _is_int(self.k, 1):
            raise _invalid("KeepEveryNSteps.k", self.k, "Use an integer >= 1, e.g. k=1000.")

    @property
    def reason(self) -> str:
        return f"keep_every_n_steps={self.k}"

    def select(self, ckpts: Sequence[CheckpointInfo], now: datetime) -> set[int]:
        return {c.step for c in ckpts if c.step % self.k == 0}


@dataclass(frozen=True)
class KeepBest:
    """Keep the best ``n`` by ``metric``; missing, NaN or infinite values never count.

    Ties go to the newer step, so the most trained of equal models survives.
    """

    metric: str
    mode: Literal["min", "max"] = "min"
    n: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise _invalid("KeepBest.metric", self.metric, "Use a metric name, e.g. 'val_loss'.")
        if self.mode not in ("min", "max"):
            raise _invalid("KeepBest.mode", self.mode, "Use 'min' (e.g. loss) or 'max' (e.g. acc).")
        if not _is_int(self.n, 1):
            raise _invalid("KeepBest.n", self.n, "Use an integer >= 1, e.g. n=3.")

    @property
    def reason(self) -> str:
        return f"keep_best={self.metric}/{self.mode}"

    def scored(self, ckpts: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        """The checkpoints with a finite value of the metric."""
        return [c for c in ckpts
                if c.metrics.get(self.metric) is not None and math.isfinite(c.metrics[self.metric])]

    def select(self, ckpts: Sequence[CheckpointInfo], now: datetime) -> set[int]:
        sign = 1.0 if self.mode == "min" else -1.0
        scored = [(sign * float(c.metrics[self.metric]), -c.step) for c in self.scored(ckpts)]
        return {-neg_step for _, neg_step in sorted(scored)[: self.n]}


@dataclass(frozen=True)
class KeepWithin:
    """Keep checkpoints created at most ``window`` before ``now`` (inclusive)."""

    window: timedelta

    def __post_init__(self) -> None:
        if not isinstance(self.window, timedelta) or self.window <= timedelta(0):
            fix = "Use a positive timedelta, e.g. timedelta(days=7)."
            raise _invalid("KeepWithin.window", self.window, fix)

    @property
    def reason(self) -> str:
        return f"keep_within={format_duration(self.window)}"

    def select(self, ckpts: Sequence[CheckpointInfo], now: datetime) -> set[int]:
        # Checkpoints stamped in the future (clock skew) count as within the window.
        return {c.step for c in ckpts if now - c.created <= self.window}


Rule = KeepLast | KeepEveryNSteps | KeepBest | KeepWithin


@dataclass(frozen=True)
class RetentionDecision:
    """Steps to keep with their reasons, and steps to delete; both ascending."""

    keep: dict[int, tuple[str, ...]]
    delete: tuple[int, ...]
    warnings: tuple[str, ...] = ()  # one line each, for the caller to show


@dataclass(frozen=True)
class RetentionPolicy:
    """A union of rules; no rules means keep everything."""

    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        for rule in self.rules:
            if not isinstance(rule, (KeepLast, KeepEveryNSteps, KeepBest, KeepWithin)):
                fix = "Use KeepLast, KeepEveryNSteps, KeepBest or KeepWithin."
                raise _invalid("RetentionPolicy.rules", rule, fix)

    def is_empty(self) -> bool:
        """True when there are no rules, so pruning must delete nothing."""
        return not self.rules

    @classmethod
    def from_options(
        cls,
        *,
        keep_last: int | None = None,
        keep_every_n_steps: int | None = None,
        keep_best: str | None = None,
        keep_best_mode: Literal["min", "max", "auto"] = "min",
        keep_best_n: int = 1,
        keep_within: timedelta | str | None = None,
    ) -> RetentionPolicy:
        """Build a policy from flat CLI/config options; ``None`` means unused.

        ``keep_best_mode="auto"`` is resolved here, from the metric's name
        (:func:`infer_mode`), so the rule and its reason show ``min`` or ``max``.
        """
        if keep_best_mode not in MODES:
            raise _invalid("keep_best_mode", keep_best_mode, "Use 'min', 'max' or 'auto'.")
        if keep_best is None and (keep_best_mode != "min" or keep_best_n != 1):
            # Silently ignoring keep_best_mode/keep_best_n would surprise the user.
            raise ConfigError(
                f"Invalid keep_best_mode/keep_best_n: Received: keep_best=None, "
                f"keep_best_mode={keep_best_mode!r}, keep_best_n={keep_best_n!r}. "
                "Set keep_best to a metric name, e.g. keep_best='val_loss'."
            )
        rules: list[Rule] = []
        if keep_last is not None:
            rules.append(KeepLast(keep_last))
        if keep_every_n_steps is not None:
            rules.append(KeepEveryNSteps(keep_every_n_steps))
        if keep_best is not None:
            if keep_best_mode == "auto" and isinstance(keep_best, str):
                keep_best_mode = infer_mode(keep_best, option="keep_best_mode")
            rules.append(KeepBest(keep_best, keep_best_mode, keep_best_n))  # type: ignore[arg-type]
        if keep_within is not None:
            if not isinstance(keep_within, timedelta):
                keep_within = parse_duration(keep_within)
            rules.append(KeepWithin(keep_within))
        return cls(tuple(rules))

    def decide(self, checkpoints: Sequence[CheckpointInfo], now: datetime) -> RetentionDecision:
        """Say which steps to keep and why (newest, pinned, then rules in order)."""
        _require_aware("now", now)
        ckpts = sorted(checkpoints, key=lambda c: c.step)
        steps = [c.step for c in ckpts]
        if len(set(steps)) != len(steps):
            raise _invalid("steps", steps, "Pass each checkpoint step once.")
        if not ckpts:
            return RetentionDecision(keep={}, delete=())
        reasons: dict[int, list[str]] = {s: [] for s in steps}
        reasons[steps[-1]].append("newest")
        for c in ckpts:
            if c.pinned:
                reasons[c.step].append("pinned")
            if self.is_empty():
                reasons[c.step].append("no retention rules")
        warnings = []
        for rule in self.rules:
            if isinstance(rule, KeepBest) and not rule.scored(ckpts):
                # Nothing to rank: deleting for lack of the metric would be a guess.
                for s in steps:
                    reasons[s].append(f"{rule.reason}: no checkpoint has it")
                warnings.append(
                    f"keep_best={rule.metric!r}: no checkpoint records {rule.metric!r} "
                    f"(batch saves carry no validation metrics); keeping all {len(steps)} "
                    "checkpoints this rule would otherwise delete"
                )
                continue
            for s in rule.select(ckpts, now):
                reasons[s].append(rule.reason)
        keep = {s: tuple(r) for s, r in reasons.items() if r}
        return RetentionDecision(keep=keep, delete=tuple(s for s in steps if s not in keep),
                                 warnings=tuple(warnings))


def parse_duration(text: str, *, option: str = "keep_within") -> timedelta:
    """Parse '90s', '15m', '12h', '7d', '2w' or compounds like '1d12h'."""
    cleaned = text.strip().lower() if isinstance(text, str) else ""
    if not _DURATION_RE.fullmatch(cleaned):
        raise ConfigError(
            f"Invalid duration: Received: {option}={text!r}. "
            "Use a number followed by s, m, h, d or w, e.g. '7d'."
        )
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _PART_RE.findall(cleaned))
    if seconds > _MAX_DURATION_S:
        raise ConfigError(
            f"Invalid duration: Received: {option}={text!r}, longer than 100 years. "
            "Use a shorter window, e.g. '365d'."
        )
    return timedelta(seconds=seconds)


def check_grace(value: object, option: str = "sweep_grace_s") -> float:
    """A finite number of seconds >= 0 (leftovers younger than it are kept)."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds < 0:
        raise _invalid(option, value, "Use a number of seconds >= 0, e.g. 3600.")
    return seconds


def format_duration(td: timedelta) -> str:
    """Inverse of parse_duration: 7 days -> '7d', 36 hours -> '1d12h'.

    Weeks are not used, so a window set as '14d' reads back as '14d'.
    """
    if not isinstance(td, timedelta) or td < timedelta(0) or td.microseconds:
        raise _invalid("duration", td, "Use a non-negative whole number of seconds.")
    remaining, parts = td.days * 86400 + td.seconds, []
    for unit in ("d", "h", "m", "s"):
        count, remaining = divmod(remaining, _UNIT_SECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


# -- the callback's two spellings of "best" -------------------------------------


def callback_best_options(
    *, keep_best, keep_best_mode, monitor, mode, save_best_only, rules: dict[str, Any]
) -> tuple[str | None, dict[str, Any]]:
    """The monitored metric and the manager's keep_best options, from the two
    spellings: ``keep_best="METRIC"`` (older, with ``keep_best_mode``) or
    Keras's ``monitor``/``mode`` with ``keep_best=N`` or ``save_best_only``.
    Mixing them, or options that contradict, is refused in one line."""
    if not isinstance(save_best_only, bool):
        raise ConfigError(f"Invalid save_best_only: Received: save_best_only={save_best_only!r}. "
                          "Use True or False.")
    if isinstance(keep_best, str):
        mixed = received_options(monitor=monitor, mode=mode, save_best_only=save_best_only or None)
        if mixed:
            raise ConfigError(
                f"Invalid keep_best: Received: keep_best={keep_best!r}, {mixed}. Use either "
                "keep_best='METRIC' (with keep_best_mode) or monitor='METRIC' (with mode, "
                "keep_best=N or save_best_only=True), not both."
            )
        return keep_best, {"keep_best": keep_best, "keep_best_mode": keep_best_mode}
    if keep_best_mode != "min":
        raise ConfigError(
            f"Invalid keep_best_mode: Received: keep_best_mode={keep_best_mode!r} without "
            "keep_best='METRIC'. Use keep_best='val_loss' with it, or mode= with monitor=."
        )
    if mode is not None and mode not in MODES:
        raise ConfigError(f"Invalid mode: Received: mode={mode!r}. Use 'min', 'max' or 'auto'.")
    if keep_best is not None and (isinstance(keep_best, bool) or not isinstance(keep_best, int)
                                  or keep_best < 1):
        raise ConfigError(
            f"Invalid keep_best: Received: keep_best={keep_best!r}. Use a metric name "
            "(keep_best='val_loss') or, with monitor=, a number of checkpoints >= 1."
        )
    keep_n = keep_best
    if save_best_only:
        others = received_options(**rules, keep_best=keep_best)
        if others:
            raise ConfigError(
                f"Invalid save_best_only: Received: save_best_only=True, {others}. Use "
                "save_best_only alone (it keeps the best and the newest), or keep_best=N "
                "with the other keep_* rules."
            )
        monitor, keep_n = ("val_loss" if monitor is None else monitor), 1  # Keras's default
    if monitor is None:
        if keep_n is not None or mode is not None:
            given = received_options(keep_best=keep_best, mode=mode)
            raise ConfigError(f"Invalid monitor: Received: monitor=None, {given}. "
                              "Use monitor='METRIC' with them, e.g. monitor='val_loss'.")
        return None, {"keep_best": None, "keep_best_mode": "min"}
    if not isinstance(monitor, str) or not monitor:
        raise ConfigError(f"Invalid monitor: Received: monitor={monitor!r}. "
                          "Use a metric name from fit()'s logs, e.g. 'val_loss'.")
    if keep_n is None:  # monitored only: no keep-best rule
        return monitor, {"keep_best": None, "keep_best_mode": "min"}
    if mode in (None, "auto"):
        infer_mode(monitor)  # refuse here, naming `mode`, what Keras cannot infer
    options = {"keep_best": monitor, "keep_best_mode": mode or "auto"}
    return monitor, options if keep_n == 1 else {**options, "keep_best_n": keep_n}


def received_options(**options: Any) -> str:
    """``"a=1, b='x'"`` for the options that were set (not None, not the default mode)."""
    return ", ".join(f"{k}={v!r}" for k, v in options.items()
                     if v is not None and not (k == "keep_best_mode" and v == "min"))
