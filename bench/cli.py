"""``python -m bench [--quick] [--params N] [--out DIR] [--skip-ray] [--skip-gcs]``."""

from __future__ import annotations

import bench  # noqa: F401  (environment first)

import argparse
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from bench import SECTIONS
from bench.common import code_state, free_keras, machine_info, parse_count, release_heap
from bench.context import Context, Settings
from bench.report import Report

DEFAULT_OUT = str(Path(__file__).resolve().parent / "results")
REPO = str(Path(__file__).resolve().parents[1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="~10M-parameter smoke run (a few minutes); timings are indicative only")
    p.add_argument("--params", type=parse_count, default=None,
                   help="model size in parameters, e.g. 100M (default: 100M, or 10M with --quick)")
    p.add_argument("--out", default=DEFAULT_OUT, help="where latest.md and latest.png go")
    p.add_argument("--skip-ray", action="store_true", help="skip the Ray sections")
    p.add_argument("--skip-gcs", action="store_true", help="skip the gs:// section")
    p.add_argument("--every", type=int, default=None,
                   help="batches between checkpoints (default: derived from the measured save time)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any section failed")
    p.add_argument("--tmp", default="/tmp", help="parent of the temporary working directory")
    p.add_argument("--only", default=None,
                   help="run only these sections, comma-separated (e.g. S3); the model setup runs "
                        "when one needs it. The partial report goes to --out (default: "
                        "<tmp>/ckptmgr-bench-only, not bench/results)")
    args = p.parse_args(argv)
    args.only = _sections_wanted(p, args.only)
    if args.only is not None and args.out == DEFAULT_OUT:
        args.out = str(Path(args.tmp) / "ckptmgr-bench-only")
    return args


def _sections_wanted(parser: argparse.ArgumentParser, only: str | None) -> frozenset[str] | None:
    if only is None:
        return None
    wanted = frozenset(s.strip().upper() for s in only.split(",") if s.strip())
    unknown = sorted(wanted - set(SECTIONS))
    if not wanted or unknown:
        parser.error(f"--only: unknown section(s) {unknown or only!r}; known: {', '.join(SECTIONS)}")
    return wanted


_ONLY: frozenset[str] | None = None  # --only, for _run


def _run(ctx: Context, section: str, name: str, fn, *args) -> bool:
    if _ONLY is not None and section not in _ONLY and section != "S0":
        ctx.report.skipped(section, name, "not in --only")
        return False
    ctx.log(f"{section} {name} ...")
    try:
        fn(ctx, *args)
        return True
    except Exception as exc:  # noqa: BLE001 - one section failing must not stop the others
        ctx.report.error(section, name, exc, traceback.format_exc())
        ctx.log(f"{section} {name} FAILED: {type(exc).__name__}: {exc}")
        return False
    finally:
        release_heap()
        ctx.log(f"{section} {name}: done, bench process RSS {_rss_bytes() / 1e9:.2f} GB")


def main(argv=None) -> int:
    global _ONLY
    args = parse_args(argv)
    _ONLY = args.only
    settings = Settings.make(quick=args.quick, params=args.params, out=args.out,
                             skip_ray=args.skip_ray, skip_gcs=args.skip_gcs, every=args.every)
    spec = settings.spec
    code, code_digest = code_state(REPO)
    mode = "quick" if args.quick else "full"
    if args.params:
        mode += f" settings, --params {args.params:,}"
    if args.only is not None:
        mode += f", only {', '.join(sorted(args.only))}"
    report = Report(header={"mode": mode, **machine_info(), "code": code})
    tmp = tempfile.mkdtemp(prefix="ckptmgr-bench-", dir=args.tmp)
    ctx = Context(settings, report, tmp)
    ctx.log(f"working in {tmp}; {spec.params:,} params ({spec.layers} x Dense({spec.width})), "
            f"batch {spec.batch}")
    try:
        _sections(ctx)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _finish_header(ctx)
        if code_state(REPO)[1] != code_digest:
            report.header["code"] += " — WARNING: ckptmgr sources changed during the run"
        md, png = report.write(args.out)
        ctx.log(f"wrote {md} and {png}")
    failed = [r for r in report.rows if r.status == "error"]
    misses = [r for r in report.rows if r.status == "miss"]
    ctx.log(f"{len(report.rows)} rows, {len(misses)} targets missed, {len(failed)} sections failed")
    return 1 if (args.strict and failed) else 0


def _sections(ctx: Context) -> None:
    from bench import cadence, local

    s = ctx.settings
    if not _run(ctx, "S0", "model setup", local.setup_model):
        for section in ("S1", "S2", "S3", "S5", "S7", "S8"):
            ctx.report.skipped(section, "single-process sections", "model setup failed (see Errors)")
    else:
        # S3 first: its save time sets K (batches between checkpoints) for S1/S2.
        _run(ctx, "S3", "local disk throughput", local.local_disk)
        ctx.log(f"K = {ctx.every()} batches between checkpoints "
                f"({ctx.every() * (ctx.step_s or 0):.1f} s of training)")
        _run(ctx, "S1", "memcpy floor", local.memcpy_floor)
        # The default callback on a freshly compiled model, side by side with
        # ModelCheckpoint: at K=10 (faster than the writer) and at the bench's K.
        for every in dict.fromkeys((s.fast_every, ctx.every())):
            _run(ctx, "S1", f"ModelCheckpoint K={every}", local.blocked_keras, "ModelCheckpoint", every)
            _run(ctx, "S1", f"ckptmgr CheckpointCallback K={every}", local.blocked_ckptmgr, every)
        _run(ctx, "S1", "BackupAndRestore", local.blocked_keras, "BackupAndRestore", ctx.every())
        _run(ctx, "S2", "training slowdown", local.slowdown)
        _run(ctx, "S8", "save cadence (paper)", cadence.lost_work)
        _run(ctx, "S5", "single-process writer memory", local.writer_memory)
        _run(ctx, "S7", "profile", local.profile)
        if s.skip_gcs:
            ctx.report.skipped("S4", "gs:// throughput", "--skip-gcs")
        else:
            from bench import remote

            _run(ctx, "S4", "gs:// throughput", remote.gcs_throughput)
        if s.skip_ray or s.skip_gcs:
            ctx.report.skipped("S10", "recovery by tier", "--skip-ray/--skip-gcs")
        else:
            from bench import tiers

            ctx.block = None  # S10 needs the memory: three nodes' object stores
            _run(ctx, "S10", "recovery by tier", tiers.recovery_by_tier)
    # Free the driver's model before Ray workers build their own copies.
    ctx.model = None
    ctx.block = None
    free_keras()
    ctx.log(f"driver RSS {_rss_bytes() / 1e9:.2f} GB after freeing the model")
    from bench import parallel_write

    _run(ctx, "S9", "replica-parallel writes", parallel_write.ranged_writes)
    if _ONLY is not None and not _ONLY & {"S1", "S6"}:
        return  # no Ray section wanted: no Ray session
    if s.skip_ray:
        for section in ("S1", "S5", "S6"):
            ctx.report.skipped(section, "Ray coordinator", "--skip-ray")
        return
    from bench import distributed

    try:
        with distributed.ray_session(ctx):
            _run(ctx, "S1", "ckptmgr + Ray coordinator", distributed.coordinator_blocked)
            _run(ctx, "S6", "scaling", distributed.scaling)
    except Exception as exc:  # noqa: BLE001 - ray.init itself failed
        for section in ("S1", "S5", "S6"):
            ctx.report.error(section, "Ray session", exc, traceback.format_exc())


def _finish_header(ctx: Context) -> None:
    s, h = ctx.settings, ctx.report.header
    spec = s.spec
    h["params"] = f"{spec.params:,} ({spec.layers} x Dense({spec.width}) + Dense({spec.outputs}), Adam, batch {spec.batch})"
    if ctx.ckpt_bytes:
        h["checkpoint"] = f"{ctx.ckpt_bytes / 1e9:.3f} GB .keras archive ({ctx.ckpt_bytes:,} bytes)"
    if ctx.step_s:
        h["training step"] = f"{ctx.step_s * 1e3:.0f} ms"
    if "every" in ctx.results or s.every:
        k = ctx.every()
        h["K"] = (f"{k} batches between checkpoints ({k * (ctx.step_s or 0):.1f} s of training): "
                  f"{s.every_factor:g}x the uncontended save time of S3 (at most {s.max_interval_s:g} s), "
                  f"so an async write can finish in between; S1 and S2 also run at K={s.fast_every}, "
                  "which the writer cannot sustain")
    h["disk reads"] = ("S3 reads each archive warm (right after writing it) and cold (its pages evicted with "
                       "posix_fadvise(POSIX_FADV_DONTNEED) first)")
    h["temp data"] = f"under {ctx.tmp} (removed)"
    missing = [sec for sec in SECTIONS if not any(r.section == sec for r in ctx.report.rows)]
    for sec in missing:
        ctx.report.skipped(sec, SECTIONS[sec], "no result recorded")


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

