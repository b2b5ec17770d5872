"""Unit tests for ckptmgr.retention on plain data (no I/O, no Keras)."""

from __future__ import annotations

import math
import pickle
from datetime import datetime, timedelta, timezone

import pytest

from ckptmgr.errors import ConfigError
from ckptmgr.retention import (
    CheckpointInfo,
    KeepBest,
    KeepEveryNSteps,
    KeepLast,
    KeepWithin,
    RetentionDecision,
    RetentionPolicy,
    format_duration,
    parse_duration,
)

NOW = datetime(2025, 1, 31, 12, 0, tzinfo=timezone.utc)


def ckpt(step, *, age=timedelta(hours=0), pinned=False, **metrics):
    """A checkpoint created `age` before NOW."""
    return CheckpointInfo(step=step, created=NOW - age, metrics=metrics, pinned=pinned)


def steps(*values, **kwargs):
    return [ckpt(s, **kwargs) for s in values]


def decide(rules, checkpoints, now=NOW):
    return RetentionPolicy(tuple(rules)).decide(checkpoints, now)


# --- KeepLast ---------------------------------------------------------------


def test_keep_last_keeps_newest_n_by_step_not_by_input_order():
    decision = decide([KeepLast(2)], [ckpt(300), ckpt(100), ckpt(400), ckpt(200)])
    assert list(decision.keep) == [300, 400]
    assert decision.keep[300] == ("keep_last=2",)
    assert decision.keep[400] == ("newest", "keep_last=2")
    assert decision.delete == (100, 200)


def test_keep_last_larger_than_count_keeps_all():
    decision = decide([KeepLast(10)], steps(1, 2, 3))
    assert set(decision.keep) == {1, 2, 3}
    assert decision.delete == ()


def test_keep_last_one_keeps_only_newest():
    decision = decide([KeepLast(1)], steps(1, 2, 3))
    assert decision.keep == {3: ("newest", "keep_last=1")}
    assert decision.delete == (1, 2)


# --- KeepEveryNSteps --------------------------------------------------------


def test_keep_every_n_steps_keeps_multiples_and_step_zero():
    decision = decide([KeepEveryNSteps(1000)], steps(0, 500, 1000, 1500, 2000, 2500))
    assert decision.keep == {
        0: ("keep_every_n_steps=1000",),
        1000: ("keep_every_n_steps=1000",),
        2000: ("keep_every_n_steps=1000",),
        2500: ("newest",),
    }
    assert decision.delete == (500, 1500)


def test_keep_every_one_step_keeps_everything():
    decision = decide([KeepEveryNSteps(1)], steps(3, 7, 11))
    assert decision.delete == ()


# --- KeepBest ---------------------------------------------------------------


def test_keep_best_min():
    cks = [ckpt(s, val_loss=v) for s, v in [(1, 0.9), (2, 0.2), (3, 0.5), (4, 0.7)]]
    decision = decide([KeepBest("val_loss")], cks)
    assert decision.keep == {2: ("keep_best=val_loss/min",), 4: ("newest",)}
    assert decision.delete == (1, 3)


def test_keep_best_max_n2():
    cks = [ckpt(1, acc=0.5), ckpt(2, acc=0.9), ckpt(3, acc=0.8), ckpt(4, acc=0.1), ckpt(5, acc=0.2)]
    decision = decide([KeepBest("acc", mode="max", n=2)], cks)
    assert decision.keep == {
        2: ("keep_best=acc/max",),
        3: ("keep_best=acc/max",),
        5: ("newest",),
    }
    assert decision.delete == (1, 4)


def test_newest_is_kept_even_when_keep_best_would_drop_it():
    # The Orbax failure mode: the latest checkpoint is the worst, keep-best drops it.
    cks = [ckpt(1, val_loss=0.1), ckpt(2, val_loss=0.2), ckpt(3, val_loss=9.0)]
    decision = decide([KeepBest("val_loss")], cks)
    assert 3 in decision.keep
    assert decision.keep[3] == ("newest",)
    assert decision.keep[1] == ("keep_best=val_loss/min",)
    assert decision.delete == (2,)


def test_newest_is_kept_even_without_the_metric():
    cks = [ckpt(1, val_loss=0.1), ckpt(2)]
    decision = decide([KeepBest("val_loss")], cks)
    assert decision.keep == {1: ("keep_best=val_loss/min",), 2: ("newest",)}


def test_keep_best_newest_that_is_best_gets_both_reasons():
    cks = [ckpt(1, val_loss=0.5), ckpt(2, val_loss=0.1)]
    decision = decide([KeepBest("val_loss")], cks)
    assert decision.keep == {2: ("newest", "keep_best=val_loss/min")}
    assert decision.delete == (1,)


def test_keep_best_ignores_missing_metric_and_nan():
    cks = [
        ckpt(1),  # no metrics at all
        ckpt(2, loss=0.0),  # other metric only
        ckpt(3, val_loss=math.nan),
        ckpt(4, val_loss=0.8),
        ckpt(5, val_loss=0.3),
        ckpt(6, val_loss=math.nan),
    ]
    decision = decide([KeepBest("val_loss", n=2)], cks)
    assert decision.keep == {
        4: ("keep_best=val_loss/min",),
        5: ("keep_best=val_loss/min",),
        6: ("newest",),
    }
    assert decision.delete == (1, 2, 3)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_nan_never_counts_as_best_in_either_mode(mode):
    cks = [ckpt(1, m=math.nan), ckpt(2, m=1.0), ckpt(3, m=math.nan), ckpt(4, m=2.0), ckpt(5)]
    decision = decide([KeepBest("m", mode=mode)], cks)
    best = 2 if mode == "min" else 4
    assert decision.keep == {best: (f"keep_best=m/{mode}",), 5: ("newest",)}


def test_keep_best_whose_metric_no_checkpoint_has_keeps_all_and_warns():
    """Issue 9: batch saves carry no val_loss; deleting all but the newest for
    lack of the metric would be a silent guess."""
    decision = decide([KeepBest("val_loss", n=3)], steps(1, 2, 3))
    assert decision.delete == ()
    assert decision.keep[1] == ("keep_best=val_loss/min: no checkpoint has it",)
    assert decision.keep[3] == ("newest", "keep_best=val_loss/min: no checkpoint has it")
    assert len(decision.warnings) == 1 and "'val_loss'" in decision.warnings[0]
    # Other rules still apply as usual next to it.
    assert decide([KeepBest("val_loss"), KeepLast(1)], steps(1, 2)).delete == ()
    assert decide([KeepBest("val_loss")], [ckpt(1), ckpt(2, val_loss=0.5), ckpt(3)]).delete == (1,)


def test_keep_best_fewer_candidates_than_n_keeps_all_candidates():
    cks = [ckpt(1, val_loss=0.4), ckpt(2), ckpt(3, val_loss=0.9), ckpt(4)]
    decision = decide([KeepBest("val_loss", n=5)], cks)
    assert set(decision.keep) == {1, 3, 4}
    assert decision.delete == (2,)


def test_keep_best_ties_prefer_newer_step():
    cks = [ckpt(s, val_loss=v) for s, v in [(1, 0.5), (2, 0.5), (3, 0.5), (4, 0.9)]]
    decision = decide([KeepBest("val_loss", n=2)], cks)
    assert decision.keep == {
        2: ("keep_best=val_loss/min",),
        3: ("keep_best=val_loss/min",),
        4: ("newest",),
    }
    assert decision.delete == (1,)


def test_keep_best_ties_are_independent_of_input_order():
    cks = [ckpt(1, acc=0.7), ckpt(2, acc=0.7), ckpt(3, acc=0.7), ckpt(9, acc=0.0)]
    forward = decide([KeepBest("acc", mode="max")], cks)
    backward = decide([KeepBest("acc", mode="max")], list(reversed(cks)))
    assert forward == backward
    assert forward.keep == {3: ("keep_best=acc/max",), 9: ("newest",)}


def test_keep_best_never_picks_non_finite_values():
    """A diverged run logs inf/-inf: neither may count as the best model (issue 8)."""
    cks = [ckpt(1, val_loss=math.inf), ckpt(2, val_loss=-math.inf), ckpt(3, val_loss=1), ckpt(4)]
    assert decide([KeepBest("val_loss")], cks).keep == {3: ("keep_best=val_loss/min",), 4: ("newest",)}
    assert decide([KeepBest("val_loss", "max")], cks).keep == {3: ("keep_best=val_loss/max",), 4: ("newest",)}


# --- KeepWithin -------------------------------------------------------------


def test_keep_within_keeps_recent_checkpoints():
    cks = [
        ckpt(1, age=timedelta(days=10)),
        ckpt(2, age=timedelta(days=8)),
        ckpt(3, age=timedelta(days=6)),
        ckpt(4, age=timedelta(days=1)),
    ]
    decision = decide([KeepWithin(timedelta(days=7))], cks)
    assert decision.keep == {3: ("keep_within=7d",), 4: ("newest", "keep_within=7d")}
    assert decision.delete == (1, 2)


def test_keep_within_boundary_is_inclusive():
    window = timedelta(hours=12)
    cks = [
        ckpt(1, age=window + timedelta(microseconds=1)),
        ckpt(2, age=window),
        ckpt(3, age=window - timedelta(microseconds=1)),
        ckpt(4, age=timedelta(days=30)),  # newest by step, but old
    ]
    decision = decide([KeepWithin(window)], cks)
    assert decision.keep == {2: ("keep_within=12h",), 3: ("keep_within=12h",), 4: ("newest",)}
    assert decision.delete == (1,)


def test_keep_within_keeps_future_stamped_checkpoints():
    # Clock skew between writers: a checkpoint "from the future" is recent, not stale.
    cks = [ckpt(1, age=-timedelta(minutes=5)), ckpt(2, age=timedelta(days=2))]
    decision = decide([KeepWithin(timedelta(hours=1))], cks)
    assert decision.keep == {1: ("keep_within=1h",), 2: ("newest",)}


def test_keep_within_compares_across_timezones():
    plus2 = timezone(timedelta(hours=2))
    # Same instant as NOW - 30 minutes, expressed in UTC+2.
    recent = CheckpointInfo(step=1, created=(NOW - timedelta(minutes=30)).astimezone(plus2))
    old = CheckpointInfo(step=2, created=NOW - timedelta(hours=3))
    decision = decide([KeepWithin(timedelta(hours=1))], [recent, old])
    assert decision.keep == {1: ("keep_within=1h",), 2: ("newest",)}


# --- Union, pinned, newest --------------------------------------------------


def test_rules_combine_as_union_with_every_reason_in_rule_order():
    cks = [
        ckpt(1000, age=timedelta(days=20), val_loss=0.1),
        ckpt(1500, age=timedelta(days=15), val_loss=0.5),
        ckpt(2000, age=timedelta(days=10), val_loss=0.6),
        ckpt(2500, age=timedelta(days=3), val_loss=0.7),
        ckpt(2600, age=timedelta(days=2), val_loss=0.8),
        ckpt(2700, age=timedelta(days=1), val_loss=0.9),
    ]
    policy = RetentionPolicy(
        (KeepLast(2), KeepEveryNSteps(1000), KeepBest("val_loss"), KeepWithin(timedelta(days=7)))
    )
    decision = policy.decide(cks, NOW)
    assert decision.keep == {
        1000: ("keep_every_n_steps=1000", "keep_best=val_loss/min"),
        2000: ("keep_every_n_steps=1000",),
        2500: ("keep_within=7d",),
        2600: ("keep_last=2", "keep_within=7d"),
        2700: ("newest", "keep_last=2", "keep_within=7d"),
    }
    assert decision.delete == (1500,)


def test_reason_order_follows_rule_order():
    cks = steps(1000, 2000)
    a = decide([KeepEveryNSteps(1000), KeepLast(2)], cks)
    b = decide([KeepLast(2), KeepEveryNSteps(1000)], cks)
    assert a.keep[1000] == ("keep_every_n_steps=1000", "keep_last=2")
    assert b.keep[1000] == ("keep_last=2", "keep_every_n_steps=1000")


def test_pinned_checkpoints_are_always_kept():
    cks = [ckpt(1, pinned=True), ckpt(2), ckpt(3, pinned=True), ckpt(4), ckpt(5)]
    decision = decide([KeepLast(1)], cks)
    assert decision.keep == {
        1: ("pinned",),
        3: ("pinned",),
        5: ("newest", "keep_last=1"),
    }
    assert decision.delete == (2, 4)


def test_pinned_newest_and_rule_reasons_are_all_listed():
    cks = [ckpt(1), ckpt(2, pinned=True, val_loss=0.1)]
    decision = decide([KeepBest("val_loss"), KeepLast(1)], cks)
    assert decision.keep == {2: ("newest", "pinned", "keep_best=val_loss/min", "keep_last=1")}
    assert decision.delete == (1,)


def test_single_checkpoint_is_always_kept():
    decision = decide([KeepBest("val_loss")], [ckpt(7, val_loss=1.0, age=timedelta(days=400))])
    assert decision.keep == {7: ("newest", "keep_best=val_loss/min")}
    assert decision.delete == ()


def test_keep_and_delete_partition_the_input_and_are_ascending():
    cks = [ckpt(s, val_loss=float(s % 7)) for s in (50, 10, 40, 30, 20, 60, 0)]
    decision = decide([KeepLast(2), KeepBest("val_loss", n=2)], cks)
    assert list(decision.keep) == sorted(decision.keep)
    assert list(decision.delete) == sorted(decision.delete)
    assert set(decision.keep) | set(decision.delete) == {c.step for c in cks}
    assert not set(decision.keep) & set(decision.delete)
    assert decision.delete == (10, 20, 30, 40)


def test_decision_is_deterministic_regardless_of_input_order():
    cks = [ckpt(s, age=timedelta(days=s), acc=s / 10) for s in range(1, 9)]
    rules = [KeepLast(2), KeepBest("acc", "max", 2), KeepWithin(timedelta(days=3))]
    first = decide(rules, cks)
    second = decide(rules, list(reversed(cks)))
    assert first == second
    assert list(first.keep.items()) == list(second.keep.items())


# --- Empty policy, empty input ----------------------------------------------


def test_empty_policy_keeps_everything():
    policy = RetentionPolicy()
    assert policy.is_empty()
    decision = policy.decide([ckpt(2, pinned=True), ckpt(1), ckpt(3)], NOW)
    assert decision.keep == {
        1: ("no retention rules",),
        2: ("pinned", "no retention rules"),
        3: ("newest", "no retention rules"),
    }
    assert decision.delete == ()


def test_non_empty_policy_is_not_empty():
    assert not RetentionPolicy((KeepLast(1),)).is_empty()


@pytest.mark.parametrize("policy", [RetentionPolicy(), RetentionPolicy((KeepLast(1),))])
def test_no_checkpoints_gives_empty_decision(policy):
    assert policy.decide([], NOW) == RetentionDecision(keep={}, delete=())


# --- Validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field, received",
    [
        (lambda: KeepLast(0), "KeepLast.n", "n=0"),
        (lambda: KeepLast(-3), "KeepLast.n", "n=-3"),
        (lambda: KeepLast(2.5), "KeepLast.n", "n=2.5"),
        (lambda: KeepLast(True), "KeepLast.n", "n=True"),
        (lambda: KeepLast("3"), "KeepLast.n", "n='3'"),
        (lambda: KeepEveryNSteps(0), "KeepEveryNSteps.k", "k=0"),
        (lambda: KeepBest("val_loss", n=0), "KeepBest.n", "n=0"),
        (lambda: KeepBest("val_loss", mode="best"), "KeepBest.mode", "mode='best'"),
        (lambda: KeepBest("val_loss", mode="MIN"), "KeepBest.mode", "mode='MIN'"),
        (lambda: KeepBest(""), "KeepBest.metric", "metric=''"),
        (lambda: KeepWithin(timedelta(0)), "KeepWithin.window", "window=datetime.timedelta(0)"),
        (lambda: KeepWithin(timedelta(hours=-1)), "KeepWithin.window", "window=datetime.timedelta"),
        (lambda: KeepWithin("7d"), "KeepWithin.window", "window='7d'"),
    ],
)
def test_invalid_rule_arguments_raise_config_error(make, field, received):
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert message.startswith(f"Invalid {field}: Received: {received}")
    assert "Use " in message  # says what to do
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_mode_error_names_both_valid_modes():
    with pytest.raises(ConfigError, match=r"'min'.*'max'"):
        KeepBest("acc", mode="maximum")


def test_policy_rejects_non_rules():
    with pytest.raises(ConfigError, match=r"Invalid RetentionPolicy.rules: Received: rules=3"):
        RetentionPolicy((KeepLast(1), 3))


def test_checkpoint_info_rejects_naive_datetime():
    pattern = (
        r"^Invalid CheckpointInfo.created: "
        r"Received: created=datetime.datetime\(2025, 1, 1, 0, 0\)\. Use an aware datetime"
    )
    with pytest.raises(ConfigError, match=pattern):
        CheckpointInfo(step=1, created=datetime(2025, 1, 1))


def test_checkpoint_info_rejects_negative_step():
    with pytest.raises(ConfigError, match=r"Invalid CheckpointInfo.step: Received: step=-1"):
        CheckpointInfo(step=-1, created=NOW)


def test_decide_rejects_naive_now():
    with pytest.raises(ConfigError, match=r"Invalid now: Received: now=datetime.datetime"):
        RetentionPolicy((KeepLast(1),)).decide(steps(1), datetime(2025, 1, 1))


def test_decide_rejects_duplicate_steps():
    with pytest.raises(ConfigError, match=r"Received: steps=\[1, 2, 2\]"):
        RetentionPolicy((KeepLast(1),)).decide(steps(2, 1, 2), NOW)


def test_config_error_pickles_with_message():
    with pytest.raises(ConfigError) as info:
        KeepLast(0)
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is ConfigError
    assert str(clone) == str(info.value)


# --- parse_duration / format_duration ---------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1w2d3h4m5s", timedelta(weeks=1, days=2, hours=3, minutes=4, seconds=5)),
        (" 7D ", timedelta(days=7)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["7x", "", "   ", "d", "7", "7 d", "1.5h", "-1d", "7dd", "h7"])
def test_parse_duration_rejects_bad_text(text):
    with pytest.raises(ConfigError) as info:
        parse_duration(text)
    assert str(info.value) == (
        f"Invalid duration: Received: keep_within={text!r}. "
        "Use a number followed by s, m, h, d or w, e.g. '7d'."
    )


def test_parse_duration_message_matches_spec_example():
    with pytest.raises(ConfigError) as info:
        parse_duration("7x")
    assert str(info.value) == (
        "Invalid duration: Received: keep_within='7x'. "
        "Use a number followed by s, m, h, d or w, e.g. '7d'."
    )


def test_parse_duration_names_custom_option_and_rejects_non_strings():
    with pytest.raises(ConfigError, match=r"Received: timeout=7\."):
        parse_duration(7, option="timeout")


@pytest.mark.parametrize(
    "td, text",
    [
        (timedelta(days=7), "7d"),
        (timedelta(days=14), "14d"),
        (timedelta(hours=36), "1d12h"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(minutes=15), "15m"),
        (timedelta(days=1, seconds=1), "1d1s"),
        (timedelta(0), "0s"),
    ],
)
def test_format_duration(td, text):
    assert format_duration(td) == text


@pytest.mark.parametrize(
    "td",
    [timedelta(seconds=s) for s in (1, 59, 60, 3599, 3600, 86399, 86400, 90061, 10**9)],
)
def test_format_parse_round_trip(td):
    assert parse_duration(format_duration(td)) == td


@pytest.mark.parametrize("text", ["45s", "15m", "12h", "7d", "1d12h", "3d4h5m6s"])
def test_parse_format_round_trip_canonical_text(text):
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize("td", [timedelta(seconds=-1), timedelta(milliseconds=1500)])
def test_format_duration_rejects_unrepresentable(td):
    with pytest.raises(ConfigError, match=r"Invalid duration: Received: duration="):
        format_duration(td)


# --- from_options -----------------------------------------------------------


def test_from_options_no_options_is_empty_policy():
    policy = RetentionPolicy.from_options()
    assert policy == RetentionPolicy()
    assert policy.is_empty()


def test_from_options_builds_rules_in_fixed_order():
    policy = RetentionPolicy.from_options(
        keep_within="1d12h",
        keep_best="acc",
        keep_best_mode="max",
        keep_best_n=3,
        keep_every_n_steps=500,
        keep_last=4,
    )
    assert policy.rules == (
        KeepLast(4),
        KeepEveryNSteps(500),
        KeepBest("acc", "max", 3),
        KeepWithin(timedelta(days=1, hours=12)),
    )


def test_from_options_accepts_timedelta_keep_within():
    policy = RetentionPolicy.from_options(keep_within=timedelta(hours=6))
    assert policy.rules == (KeepWithin(timedelta(hours=6)),)


def test_from_options_keep_best_defaults_to_min_n1():
    policy = RetentionPolicy.from_options(keep_best="val_loss")
    assert policy.rules == (KeepBest("val_loss", "min", 1),)


@pytest.mark.parametrize("metric, mode", [
    ("val_loss", "min"), ("val_accuracy", "max"), ("auc_1", "max"), ("val_out_a_mae", "min"),
])
def test_from_options_auto_mode_is_resolved_from_the_name(metric, mode):
    policy = RetentionPolicy.from_options(keep_best=metric, keep_best_mode="auto", keep_best_n=2)
    assert policy.rules == (KeepBest(metric, mode, 2),)
    assert policy.rules[0].reason == f"keep_best={metric}/{mode}"


def test_from_options_auto_mode_refuses_what_it_cannot_infer():
    with pytest.raises(ConfigError) as info:
        RetentionPolicy.from_options(keep_best="val_score", keep_best_mode="auto")
    assert str(info.value) == (
        "Invalid keep_best_mode: Received: keep_best_mode='auto' for metric 'val_score', whose "
        "direction Keras cannot infer. Use keep_best_mode='min' (lower is better) or "
        "keep_best_mode='max'."
    )


def test_from_options_rejects_auto_without_metric():
    with pytest.raises(ConfigError, match=r"Set keep_best to a metric name"):
        RetentionPolicy.from_options(keep_best_mode="auto")


def test_from_options_bad_duration_names_keep_within():
    with pytest.raises(ConfigError, match=r"Received: keep_within='7x'"):
        RetentionPolicy.from_options(keep_within="7x")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"keep_last": 0}, r"Invalid KeepLast.n: Received: n=0"),
        ({"keep_every_n_steps": -5}, r"Invalid KeepEveryNSteps.k: Received: k=-5"),
        ({"keep_best": "acc", "keep_best_mode": "up"},
         r"^Invalid keep_best_mode: Received: keep_best_mode='up'\. Use 'min', 'max' or 'auto'\.$"),
        ({"keep_best": "acc", "keep_best_n": 0}, r"Invalid KeepBest.n: Received: n=0"),
        ({"keep_within": "0s"}, r"Invalid KeepWithin.window"),
    ],
)
def test_from_options_validates(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        RetentionPolicy.from_options(**kwargs)


@pytest.mark.parametrize("kwargs", [{"keep_best_mode": "max"}, {"keep_best_n": 3}])
def test_from_options_rejects_keep_best_settings_without_metric(kwargs):
    with pytest.raises(ConfigError) as info:
        RetentionPolicy.from_options(**kwargs)
    message = str(info.value)
    assert "keep_best=None" in message
    assert "Set keep_best to a metric name" in message


def test_from_options_policy_decides_end_to_end():
    policy = RetentionPolicy.from_options(keep_last=1, keep_best="val_loss", keep_within="1h")
    cks = [
        ckpt(1, age=timedelta(hours=5), val_loss=0.1),
        ckpt(2, age=timedelta(hours=4), val_loss=0.5),
        ckpt(3, age=timedelta(minutes=30), val_loss=0.6),
        ckpt(4, age=timedelta(minutes=10), val_loss=0.9),
    ]
    decision = policy.decide(cks, NOW)
    assert decision.keep == {
        1: ("keep_best=val_loss/min",),
        3: ("keep_within=1h",),
        4: ("newest", "keep_last=1", "keep_within=1h"),
    }
    assert decision.delete == (2,)
