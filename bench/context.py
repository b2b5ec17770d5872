"""Settings and the state shared between sections of one run."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.common import ModelSpec
from bench.report import Report

FULL_PARAMS = 100_000_000
QUICK_PARAMS = 10_000_000


@dataclass
class Settings:
    quick: bool
    params: int
    spec: ModelSpec
    out: str
    skip_ray: bool = False
    skip_gcs: bool = False
    every: int | None = None  # force K (batches between checkpoints)
    ckpt_saves: int = 5  # S1 ckptmgr: first + 4 measured
    keras_saves: int = 3  # S1 ModelCheckpoint / BackupAndRestore: first + 2
    fast_every: int = 10  # S1/S2: a cadence the writer cannot sustain (issue 10)
    slow_saves: int = 2  # S2: checkpoints inside the timed window at the interval below
    slow_interval_s: float = 30.0  # S2: a checkpoint every this many seconds of training
    fast_saves: int = 6  # S2: checkpoints inside the timed window at fast_every
    reps: int = 4  # S3 repetitions (alternating order)
    slow_nice_experiment: bool = False  # S2: also run with ckptmgr's threads at nice 19
    gcs_reps: int = 1  # ~100 s per repetition at 1.2 GB on fake-gcs-server
    scaling: tuple[int, ...] = (1, 2, 4)
    min_every: int = 3
    max_every: int = 60
    max_interval_s: float = 12.0  # bounds the run time when saves are slow
    every_factor: float = 2.0  # K = factor x uncontended save time
    ranged_ranks: tuple[int, ...] = (1, 2, 4)  # S9: ranks writing one archive
    ranged_mib: int = 128  # S9: size of the replicated state
    ranged_backends: tuple[str, ...] = ("local", "gcs", "s3")
    cap_mb_s: float = 50.0  # S9: per-connection cap of the proxy in front of object stores
    cap_share: float = 0.6  # S9: ... lowered so that N x cap <= this share of the uncapped rate

    @classmethod
    def make(cls, *, quick: bool, params: int | None, out: str, skip_ray: bool,
             skip_gcs: bool, every: int | None) -> "Settings":
        params = params or (QUICK_PARAMS if quick else FULL_PARAMS)
        common = dict(quick=quick, params=params, spec=ModelSpec.for_params(params), out=out,
                      skip_ray=skip_ray, skip_gcs=skip_gcs, every=every)
        if quick:
            return cls(**common, ckpt_saves=4, keras_saves=3, slow_saves=2, slow_interval_s=3.0,
                       fast_saves=5, reps=2, gcs_reps=2, scaling=(1, 2), every_factor=3.0,
                       ranged_ranks=(1, 2), ranged_mib=64, ranged_backends=("local", "gcs"))
        return cls(**common)


@dataclass
class Context:
    settings: Settings
    report: Report
    tmp: str
    started: float = field(default_factory=time.perf_counter)
    model: Any = None
    step_s: float | None = None  # seconds per training step (warm)
    ckpt_bytes: int | None = None  # size of a ckptmgr .keras archive
    state_bytes: int | None = None  # bytes of all variables (weights + optimizer)
    block: np.ndarray | None = None  # preallocated host memory (floor, raw I/O)
    results: dict[str, Any] = field(default_factory=dict)  # figures shared across sections

    def log(self, text: str) -> None:
        print(f"[bench {time.perf_counter() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    @property
    def spec(self) -> ModelSpec:
        return self.settings.spec

    def every(self) -> int:
        """K: batches between checkpoints, so that an async write has time to finish.

        ``every_factor`` x the uncontended end-to-end save time measured in S3
        (training and the writer share the CPU, which slows the write), in
        steps, at most ``max_interval_s`` of training; forced with ``--every``.
        """
        s = self.settings
        if s.every:
            return s.every
        if "every" in self.results:
            return self.results["every"]
        write_s = self.results.get("local_save_e2e_s")
        if write_s is None:
            write_s = (self.ckpt_bytes or self.spec.params * 12) / 200e6
        step_s = self.step_s or 0.5
        k = math.ceil(s.every_factor * write_s / step_s)
        k = min(k, s.max_every, max(1, math.ceil(s.max_interval_s / step_s)))
        k = max(s.min_every, k)
        self.results["every"] = k
        return k
