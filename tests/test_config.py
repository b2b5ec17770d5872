"""Tests for ckptmgr.config: YAML loading, validation messages, --set overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptmgr.config import JobConfig, apply_overrides, load_config
from ckptmgr.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_local_config_is_valid_and_matches_documented_defaults():
    cfg = load_config(REPO_ROOT / "configs" / "local.yaml")
    assert cfg.checkpoint.directory == os.path.abspath("checkpoints")
    assert cfg.checkpoint.storage_options == {}
    assert cfg.checkpoint.save_freq == 10
    assert cfg.checkpoint.keep_last == 3
    assert cfg.training.epochs == 3
    assert cfg.training.learning_rate == 0.001  # written 1e-3
    assert cfg.ray.num_workers == 2


def test_minimal_config_gets_defaults_and_relative_directory_resolves_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, "checkpoint:\n  directory: runs/a\nray:\n"))
    assert cfg.checkpoint.directory == str(tmp_path / "runs" / "a")
    assert cfg.name == "example"
    assert cfg.checkpoint.save_freq == "epoch"
    assert cfg.checkpoint.keep_best_mode == "min"
    assert cfg.checkpoint.on_busy == "newest"
    assert cfg.checkpoint.prune_interval_s == 60
    assert cfg.training.hidden == [64, 64]
    assert cfg.training.shuffle is False
    assert cfg.ray.address is None and cfg.ray.num_workers == 2


def test_urls_are_kept_as_given(tmp_path):
    cfg = load_config(write(tmp_path, "checkpoint: {directory: 'gs://bucket/run', keep_within: 1d12h}\n"))
    assert cfg.checkpoint.directory == "gs://bucket/run"
    assert cfg.checkpoint.retention_options()["keep_within"] == "1d12h"
    assert not cfg.checkpoint.retention_policy().is_empty()


def test_unknown_field_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, "checkpoint:\n  directory: x\n  keep_lst: 3\n")
    message = error_of(path)
    assert message == f"{path}: unknown field 'checkpoint.keep_lst'. Did you mean 'keep_last'?"


def test_unknown_section_without_close_match_lists_valid_fields(tmp_path):
    message = error_of(write(tmp_path, "checkpoint: {directory: x}\nzzz: 1\n"))
    assert "unknown field 'zzz'" in message
    assert "checkpoint" in message and "training" in message


def test_wrong_type_names_field_and_received_value(tmp_path):
    path = write(tmp_path, "checkpoint: {directory: x}\ntraining:\n  epochs: three\n")
    message = error_of(path)
    assert message.startswith(f"{path}: invalid value for 'training.epochs'")
    assert "Received: epochs='three'" in message


@pytest.mark.parametrize(
    "line, field",
    [
        ("save_freq: 0", "checkpoint.save_freq"),
        ("save_freq: weekly", "checkpoint.save_freq"),
        ("keep_last: 0", "checkpoint.keep_last"),
        ("on_busy: drop", "checkpoint.on_busy"),
        ("prune_interval_s: 0", "checkpoint.prune_interval_s"),
    ],
)
def test_out_of_range_values_are_rejected(tmp_path, line, field):
    message = error_of(write(tmp_path, f"checkpoint:\n  directory: x\n  {line}\n"))
    assert f"'{field}'" in message and "Received:" in message


def test_bad_duration_is_reported(tmp_path):
    message = error_of(write(tmp_path, "checkpoint: {directory: x, keep_within: 7x}\n"))
    assert "'checkpoint.keep_within'" in message
    assert "keep_within='7x'" in message and "'7d'" in message


def test_keep_best_mode_without_keep_best_is_rejected(tmp_path):
    message = error_of(write(tmp_path, "checkpoint: {directory: x, keep_best_mode: max}\n"))
    assert "keep_best" in message


def test_missing_file_and_missing_directory_field(tmp_path):
    message = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml: config file not found" in message
    message = error_of(write(tmp_path, "training: {epochs: 1}\n"))
    assert "missing required field 'checkpoint'" in message
    message = error_of(write(tmp_path, "checkpoint: {}\n"))
    assert "missing required field 'checkpoint.directory'" in message


def test_invalid_yaml_and_non_mapping(tmp_path):
    assert "invalid YAML at line" in error_of(write(tmp_path, "checkpoint:\n  directory: [\n"))
    assert "must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_overrides_parse_yaml_scalars_and_revalidate(tmp_path):
    cfg = load_config(write(tmp_path, "checkpoint: {directory: x}\n"))
    new = apply_overrides(
        cfg,
        [
            "checkpoint.directory=memory://run",
            "training.epochs=5",
            "checkpoint.save_freq=7",
            "training.shuffle=true",
            "training.hidden=[8, 4]",
            "checkpoint.storage_options.token=anon",
            "ray.address=ray://head:10001",
        ],
    )
    assert isinstance(new, JobConfig)
    assert new.checkpoint.directory == "memory://run"
    assert new.training.epochs == 5 and new.checkpoint.save_freq == 7
    assert new.training.shuffle is True and new.training.hidden == [8, 4]
    assert new.checkpoint.storage_options == {"token": "anon"}
    assert new.ray.address == "ray://head:10001"
    assert cfg.training.epochs == 3  # the original is unchanged
    assert new.source == cfg.source


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.epochs=abc", "--set training.epochs=abc: invalid value for 'training.epochs'"),
        ("training.epoch=3", "--set training.epoch=3: unknown field 'training.epoch'. Did you mean 'epochs'?"),
        ("checkpoint.keep_within=soon", "keep_within='soon'"),
        ("epochs", "expected key=value"),
        ("name.x=1", "'name' is a value, not a section"),
    ],
)
def test_bad_overrides_are_one_line_errors(tmp_path, override, expected):
    cfg = load_config(write(tmp_path, "checkpoint: {directory: x}\n"))
    with pytest.raises(ConfigError) as info:
        apply_overrides(cfg, [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_numbers_in_scientific_notation_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as a string; YAML 1.2 and JSON read a number.
    cfg = load_config(write(tmp_path, "checkpoint: {directory: x, prune_interval_s: 6E+1}\n"
                                      "training: {learning_rate: 1e-3}\n"))
    assert cfg.training.learning_rate == 0.001 and cfg.checkpoint.prune_interval_s == 60.0
    assert apply_overrides(cfg, ["training.learning_rate=2.5e-4"]).training.learning_rate == 0.00025
    assert apply_overrides(cfg, ["training.learning_rate=5E-5"]).training.learning_rate == 0.00005
    assert "Received: learning_rate=-0.001" in error_of(write(tmp_path, "checkpoint: {directory: x}\n"
                                                                         "training: {learning_rate: -1e-3}\n"))
    # Still typed: a float is no epoch count, and a quoted number stays a string.
    assert "Received: epochs=1000.0" in error_of(write(tmp_path, "checkpoint: {directory: x}\ntraining: {epochs: 1e3}\n"))
    assert "Received: learning_rate='1e-3'" in error_of(write(tmp_path, "checkpoint: {directory: x}\n"
                                                                        "training: {learning_rate: '1e-3'}\n"))


def test_user_code_section(tmp_path):
    cfg = load_config(write(tmp_path, "checkpoint: {directory: x}\nuser_code:\n  imports: [mypkg.layers]\n"
                                      "  custom_objects: {CustomModel: 'mymodels:CustomModel'}\n"))
    assert cfg.user_code.imports == ["mypkg.layers"]
    code = cfg.user_code.user_code()
    assert code.imports == ("mypkg.layers",) and code.custom_objects == ("CustomModel=mymodels:CustomModel",)
    assert load_config(write(tmp_path, "checkpoint: {directory: x}\nuser_code:\n")).user_code.user_code() == type(code)()
    message = error_of(write(tmp_path, "checkpoint: {directory: x}\nuser_code: {custom_objects: {A: mymodels}}\n"))
    assert "'user_code.custom_objects'" in message and "'A=mymodels'" in message and "NAME=MODULE:ATTR" in message
    message = error_of(write(tmp_path, "checkpoint: {directory: x}\nuser_code: {imports: [models.py]}\n"))
    assert "'user_code.imports'" in message and "a file path" in message
    assert "Did you mean 'imports'?" in error_of(write(tmp_path, "checkpoint: {directory: x}\nuser_code: {import: [a]}\n"))
