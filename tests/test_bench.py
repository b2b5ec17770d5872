"""The benchmark still runs end to end: ``python -m bench --quick`` (no timing asserts).

At 2M parameters rather than the quick default (10M): every section's code
runs the same; the figures are not the point here, and it takes 115 s, not 190 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9")


@pytest.mark.slow
def test_quick_bench_writes_a_row_per_section_and_a_plot(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--strict", "--params", "2000000", "--out", str(out),
         "--tmp", str(tmp_path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    table = (out / "latest.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| S")]
    for section in SECTIONS:
        mine = [r for r in rows if r.startswith(f"| {section} |")]
        assert mine, f"no row for {section} in latest.md:\n{table}"
        errors = [r for r in mine if "| error |" in r]
        assert not errors, f"{section} failed: {errors}\n{proc.stdout[-4000:]}"
    png = out / "latest.png"
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_runs_named_sections_and_keeps_bench_results():
    from bench.cli import DEFAULT_OUT, parse_args

    args = parse_args(["--only", "s3, S7", "--tmp", "/somewhere"])
    assert args.only == {"S3", "S7"}
    assert args.out == os.path.join("/somewhere", "ckptmgr-bench-only") != DEFAULT_OUT
    assert parse_args(["--only", "S3", "--out", "/x"]).out == "/x"
    assert parse_args([]).only is None and parse_args([]).out == DEFAULT_OUT
    with pytest.raises(SystemExit):
        parse_args(["--only", "S3,S42"])
