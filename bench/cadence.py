"""S8: save cadence on paper: lost work per failure and overhead, auto vs fixed intervals.

No training and no I/O: it takes the save costs this run measured (S1: capture
and background write; S2: training time lost per checkpoint; S3: restore) and
applies the model behind ``save_freq="auto"`` (:mod:`ckptmgr.cadence`): a save
every ``T`` seconds costs ``C/T`` of training time, a failure loses ``T/2`` of
work plus the restart ``R``, failures come every ``M`` seconds, so the share of
time wasted is ``C/T + (T/2 + R)/M``. An interval shorter than the background
write cannot be sustained (saves are replaced or wait), so it counts as the
write time.
"""

from __future__ import annotations

from bench.context import Context
from bench.report import Row
from ckptmgr.cadence import DEFAULT_MTBF, choose_interval, job_mtbf_s, waste

NODES = (1, 8)
FIXED = (("every 10 steps", 10, None), ("every 100 steps", 100, None), ("every 30 min", None, 1800.0))


def save_cost(results: dict) -> tuple[float, float, float]:
    """(C, write_s, restart_s) from the run: C is S2's measured training time lost
    per checkpoint when it is above the capture time (it includes it), else the capture."""
    blocked = results["ckpt_capture_s"]
    lost = results.get("ckpt_lost_s")
    cost = lost if lost is not None and lost > blocked else blocked
    return cost, results["ckpt_write_s"], results.get("restore_s") or 0.0


def lost_work(ctx: Context) -> None:
    if not ctx.step_s or "ckpt_capture_s" not in ctx.results or "ckpt_write_s" not in ctx.results:
        raise RuntimeError("needs S1's measured save costs and the step time (see the S1 errors)")
    step_s = ctx.step_s
    cost, write, restart = save_cost(ctx.results)
    report = ctx.report
    report.note("S8", (
        f"Paper computation from this run's measurements: cost to training C = {cost:.3g} s per save "
        f"(S2's measured loss per checkpoint, or S1's capture if larger), background write {write:.3g} s "
        f"(S1), restart R = {restart:.3g} s (S3 restore; starting the process again is not counted), "
        f"step {step_s * 1e3:.0f} ms. Per-node MTBF {DEFAULT_MTBF} (ckptmgr's default: the longest a "
        "preemptible GCP VM runs), divided by the nodes. Expected lost work per failure = T/2 + R; "
        "waste = C/T + (T/2 + R)/M. Ratio column: this interval's waste / the auto interval's."))
    for nodes in NODES:
        mtbf = job_mtbf_s(None, nodes)
        auto = choose_interval(cost_s=cost, write_s=write, step_s=step_s, mtbf_s=mtbf)
        auto_s = auto.steps * step_s
        best = waste(auto_s, cost_s=cost, mtbf_s=mtbf, restart_s=restart)
        where = f"{nodes} node{'s' if nodes > 1 else ''} (job MTBF {mtbf / 3600:.3g} h)"
        report.add(Row("S8", f"{where}: save_freq='auto' every {auto.steps} steps ({_secs(auto_s)}): "
                       "expected lost work per failure", best.lost_per_failure_s, "s",
                       note=f"overhead {best.overhead:.2%}, waste {best.expected:.2%} of training time; "
                       f"{auto.reason}"))
        for label, steps, seconds in FIXED:
            interval_s = seconds if seconds is not None else steps * step_s
            effective = max(interval_s, write)
            w = waste(effective, cost_s=cost, mtbf_s=mtbf, restart_s=restart)
            behind = (f"; faster than the writer ({write:.2f} s a save): counted as one save per write"
                      if interval_s < write else "")
            report.add(Row("S8", f"{where}: {label} ({_secs(interval_s)}): expected lost work per failure",
                           w.lost_per_failure_s, "s", "save_freq='auto'", best.lost_per_failure_s,
                           ratio=w.expected / best.expected,
                           note=f"overhead {w.overhead:.2%}, waste {w.expected:.2%} vs auto "
                           f"{best.expected:.2%}{behind}"))


def _secs(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 100 else f"{seconds:.3g} s"
