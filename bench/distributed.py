"""Ray sections: ckptmgr through the coordinator (S1, S5) and scaling (S6)."""

from __future__ import annotations

import bench  # noqa: F401

import gc
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from bench.common import RssSampler, median, save_steps
from bench.context import Context
from bench.report import Row

REPO = str(Path(__file__).resolve().parents[1])
CALL_TIMEOUT_S = 900


@contextmanager
def ray_session(ctx: Context):
    import ray

    from ckptmgr.ray_job import WORKER_ENV

    env = dict(WORKER_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    started = time.perf_counter()
    # address="local": always our own cluster, never one that another process started.
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
             log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": env})
    ctx.log(f"ray.init in {time.perf_counter() - started:.1f}s")
    try:
        yield ray
    finally:
        ray.shutdown()


def _created_bytes() -> int | None:
    """Bytes ever created in the object store (Ray's store stats); None if unavailable."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return int(get_memory_info_reply(state).store_stats.cumulative_created_bytes)
    except Exception:  # noqa: BLE001 - private API; report n/a
        return None


def _worker_class():
    import ray

    from bench.actors import BenchWorker

    return ray.remote(max_restarts=0)(BenchWorker)


def _kill(*actors) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001
            pass


def coordinator_blocked(ctx: Context) -> None:
    """S1 with one worker actor + the coordinator; S5: the coordinator's peak RSS."""
    import ray

    from ckptmgr import CheckpointManager
    from ckptmgr.coordinator import CoordinatorOptions, get_or_create

    spec, every, saves = ctx.spec, ctx.every(), ctx.settings.ckpt_saves
    directory = os.path.join(ctx.tmp, "s1-ray")
    coordinator = get_or_create(CoordinatorOptions(directory, world_size=1))
    worker = _worker_class().options(num_cpus=1).remote(spec.as_dict(), 0, 1)
    try:
        coordinator_pid = ray.get(coordinator.pid.remote(), timeout=CALL_TIMEOUT_S)
        ray.get(coordinator.latest_step.remote(), timeout=CALL_TIMEOUT_S)  # warm imports
        setup = ray.get(worker.setup.remote(3), timeout=CALL_TIMEOUT_S)
        ctx.log(f"ray worker ready in {setup['setup_s']:.1f}s")
        before = _created_bytes()
        with RssSampler(coordinator_pid) as rss:
            out = ray.get(worker.fit_with_checkpoints.remote(directory, every, every * saves),
                          timeout=CALL_TIMEOUT_S)
        after = _created_bytes()
        if out["manager"] != "CoordinatorClient":
            raise RuntimeError(f"the callback did not switch to the coordinator ({out['manager']})")
        manifests = CheckpointManager(directory).manifests()
        dropped = sum(m.stats.replaced + m.stats.skipped for m in manifests)
        if len(manifests) + dropped != saves:
            raise RuntimeError(f"{saves} saves due: {len(manifests)} committed + {dropped} replaced or skipped")
        probe = ray.get(worker.probe_handover.remote(), timeout=CALL_TIMEOUT_S)
        ray.get(worker.close.remote(), timeout=CALL_TIMEOUT_S)
    finally:
        _kill(worker, coordinator)
        shutil.rmtree(directory, ignore_errors=True)
        gc.collect()
    n = manifests[-1].stats.bytes
    ctx.ckpt_bytes = ctx.ckpt_bytes or n
    at_saves = save_steps(out["batch_seconds"], every, out["offset"])
    others = [t for i, t in enumerate(out["batch_seconds"], 1) if (out["offset"] + i) % every]
    captures = [m.stats.blocked_s for m in manifests]
    steady, steady_capture = median(at_saves[1:]), median(captures[1:])
    write_s = median(m.stats.write_s for m in manifests)
    floor, mc = ctx.results.get("floor_s"), ctx.results.get("ModelCheckpoint_s")
    report = ctx.report
    report.add(Row("S1", f"ckptmgr + Ray coordinator (1 worker actor): time in on_train_batch_end, "
                   f"median of {len(at_saves) - 1} after the first", steady, "s", "ModelCheckpoint", mc,
                   ratio=steady / mc if mc else None, op="<=", target=1 / 50, target_text="≤ 1/50",
                   note=f"first {at_saves[0]:.2f} s; K={every}; {len(manifests)} of {saves} saves written "
                   f"({dropped} replaced)" + (f"; 1/{mc / steady:.0f}" if mc else "")))
    report.add(Row("S1", "ckptmgr + Ray: client capture (manifest stats.blocked_s), median after the first",
                   steady_capture, "s", "memcpy floor (driver)", floor,
                   ratio=steady_capture / floor if floor else None, op="<=", target=2.0,
                   target_text="≤ 2× floor", note=f"first {captures[0]:.2f} s"))
    report.add(Row("S1", "ckptmgr + Ray: callback on batches without a save (median)", median(others), "s",
                   note="checks for an emergency step each batch; asks the coordinator at most every 0.2 s"))
    report.add(Row("S1", "ckptmgr + Ray: coordinator write (manifest write_s, median)", write_s, "s",
                   note=f"{n / write_s / 1e6:.0f} MB/s"))
    if before is not None and after is not None:
        report.add(Row("S1", "ckptmgr + Ray: object-store bytes created per checkpoint", (after - before) / saves,
                       "B", "checkpoint size", n, ratio=(after - before) / saves / n))
    report.plot_blocked.append(("ckptmgr+Ray callback", steady))
    # S5: the coordinator is the process that writes.
    report.add(Row("S5", "Ray coordinator: peak RSS growth during the saves (delta)", rss.delta_rss, "B",
                   "checkpoint size", n, ratio=rss.delta_rss / n, op="<=", target=1.25,
                   target_text="≤ 1.25× checkpoint",
                   note=f"baseline {rss.baseline_rss / 1e6:.0f} MB; {rss.samples} samples at 10 ms "
                   f"over {saves} saves; includes object-store (shared) pages it maps"))
    report.add(Row("S5", "Ray coordinator: absolute peak RSS", rss.peak_rss, "B", "checkpoint size", n,
                   ratio=rss.peak_rss / n, op="<=", target=1.25, target_text="≤ 1.25× checkpoint"))
    report.add(Row("S5", "Ray coordinator: peak private RSS growth (RSS − shared pages)", rss.delta_private,
                   "B", "checkpoint size", n, ratio=rss.delta_private / n))
    report.note("S5", "The coordinator reads each snapshot zero-copy from the Ray object store, so its RSS "
                "counts the shared-memory pages it touches; pages of earlier snapshots stay mapped after "
                "they are freed (they belong to the store), which is why RSS can exceed 1x across several "
                "saves while private memory hardly grows.")
    report.plot_ratios.append(("S5 coordinator RSS (≤)", rss.delta_rss / n, 1.25, "<="))
    # S7: the hand-over steps on a worker.
    pb = probe["bytes"]
    report.add(Row("S7", "Ray worker: snapshot_digest (CRC32 fingerprint of replicated state, every rank)",
                   probe["digest_s"], "s", "worker capture", probe["capture_s"],
                   ratio=probe["digest_s"] / probe["capture_s"], note=f"{pb / probe['digest_s'] / 1e9:.2f} GB/s"))
    report.add(Row("S7", "Ray worker: ray.put(snapshot) (copy into the object store, rank 0)",
                   probe["put_s"], "s", "worker capture", probe["capture_s"],
                   ratio=probe["put_s"] / probe["capture_s"], note=f"{pb / probe['put_s'] / 1e9:.2f} GB/s"))
    report.add(Row("S7", "Ray worker: first capture (plan + fresh buffers) vs steady", probe["first_capture_s"],
                   "s", "worker capture", probe["capture_s"],
                   ratio=probe["first_capture_s"] / probe["capture_s"], note=f"plan {probe['plan_s']:.2f} s"))


def scaling(ctx: Context) -> None:
    """S6: 1, 2, 4 workers with the same model. With 2+ ranks each writes its own
    byte range of the archive (``parallel_write=True`` on this local path) and
    rank 0 hands the coordinator only a spec; S5: the writers' RSS meanwhile."""
    import ray

    from ckptmgr import CheckpointManager
    from ckptmgr.coordinator import CoordinatorOptions, get_or_create

    spec = ctx.spec
    cpus = max(2, os.cpu_count() or 2)
    results = {}
    for n_workers in ctx.settings.scaling:
        directory = os.path.join(ctx.tmp, f"s6-{n_workers}")
        options = CoordinatorOptions(directory, world_size=n_workers, retention={"keep_last": 1},
                                     parallel_write=n_workers > 1)
        coordinator = get_or_create(options)
        workers = [_worker_class().options(num_cpus=min(1.0, cpus / n_workers / 2))
                   .remote(spec.as_dict(), rank, n_workers) for rank in range(n_workers)]
        try:
            ray.get([w.setup.remote(0) for w in workers], timeout=CALL_TIMEOUT_S)
            coordinator_pid = ray.get(coordinator.pid.remote(), timeout=CALL_TIMEOUT_S)
            worker_pids = ray.get([w.pid.remote() for w in workers], timeout=CALL_TIMEOUT_S)
            per_step = []
            for step in (1, 2):  # 1: plans and fresh buffers; 2: steady state
                before = _created_bytes()
                samplers = [RssSampler(pid) for pid in [coordinator_pid, *worker_pids]]
                for sampler in samplers:
                    sampler.__enter__()
                started = time.perf_counter()
                try:
                    saves = ray.get([w.save.remote(directory, step) for w in workers], timeout=CALL_TIMEOUT_S)
                finally:
                    latency = time.perf_counter() - started
                    for sampler in samplers:
                        sampler.__exit__(None, None, None)
                after = _created_bytes()
                per_step.append((latency, saves, None if before is None or after is None else after - before,
                                 samplers))
            manifest = CheckpointManager(directory).manifest(2)
            if manifest.world.get("ranks") != list(range(n_workers)):
                raise RuntimeError(f"manifest ranks {manifest.world.get('ranks')}")
            ranges = manifest.world.get("ranges")
            if n_workers > 1 and not ranges:
                raise RuntimeError("parallel_write=True but the archive was not written in ranges")
            ray.get([w.close.remote() for w in workers], timeout=CALL_TIMEOUT_S)
        finally:
            _kill(*workers, coordinator)
            shutil.rmtree(directory, ignore_errors=True)
            gc.collect()
        latency, saves, moved, samplers = per_step[1]
        results[n_workers] = dict(latency=latency, moved=moved, write_s=manifest.stats.write_s,
                                  bytes=manifest.stats.bytes, blocked=max(s["blocked_s"] for s in saves),
                                  first_latency=per_step[0][0], ranges=ranges or 1,
                                  coordinator=samplers[0], workers=samplers[1:])
        ctx.log(f"S6: {n_workers} workers: latency {latency:.2f}s, write {manifest.stats.write_s:.2f}s, "
                f"ranges {ranges}, coordinator RSS +{samplers[0].delta_rss / 1e6:.0f} MB")
    report = ctx.report
    one = results.get(min(results)) if results else None
    for n_workers, r in results.items():
        base = n_workers == min(results)
        size = r["bytes"]
        how = (f"ranged: each of {r['ranges']} ranks writes its byte range" if r["ranges"] > 1
               else "the coordinator writes the archive")
        if r["moved"] is not None:
            report.add(Row("S6", f"{n_workers} worker(s): object-store bytes per checkpoint ({how})", r["moved"],
                           "B", "1 worker" if not base else "checkpoint size",
                           one["moved"] if not base else size,
                           ratio=r["moved"] / (one["moved"] if not base else size),
                           op="<=", target=1.1, target_text="≤ 1.1 (flat)"))
        report.add(Row("S6", f"{n_workers} worker(s): archive write time (write_s; {how})", r["write_s"], "s",
                       "1 worker" if not base else "", None if base else one["write_s"],
                       ratio=None if base else r["write_s"] / one["write_s"],
                       op=None if base else "<=", target=None if base else 1.25,
                       target_text="" if base else "≤ 1.25 (flat)",
                       note=f"{size / r['write_s'] / 1e6:.0f} MB/s"))
        report.add(Row("S6", f"{n_workers} worker(s): save latency, all ranks to commit (steady)", r["latency"],
                       "s", note=f"max capture {r['blocked']:.3f} s; first save {r['first_latency']:.2f} s"))
        # S5: the writers' memory during the steady save.
        coordinator, workers = r["coordinator"], r["workers"]
        if r["ranges"] > 1:
            report.add(Row("S5", f"Ray coordinator, ranged writes ({n_workers} ranks): peak RSS growth during a "
                           "save (it writes only the tail and the manifest)", coordinator.delta_rss, "B",
                           "checkpoint size", size, ratio=coordinator.delta_rss / size, op="<=", target=0.05,
                           target_text="≤ 0.05× checkpoint (holds no checkpoint bytes)",
                           note=f"private (RSS − shared) growth {coordinator.delta_private / 1e6:.1f} MB; baseline "
                           f"{coordinator.baseline_rss / 1e6:.0f} MB; {coordinator.samples} samples at 10 ms"))
            share = size / r["ranges"]
            worst = max(workers, key=lambda w: w.delta_rss)
            report.add(Row("S5", f"Ray workers, ranged writes ({n_workers} ranks): worst rank's peak RSS growth "
                           "during a steady save (its buffers already exist)", worst.delta_rss, "B",
                           "its share of the checkpoint (1/N)", share, ratio=worst.delta_rss / share, op="<=",
                           target=1.25, target_text="≤ 1.25× its share",
                           note="growth per rank " + ", ".join(f"{w.delta_rss / 1e6:.0f} MB" for w in workers)
                           + "; the host buffers a rank copies its state into were allocated at its "
                           "first save (not counted here)"))
    if len(results) > 1:
        biggest = max(results)
        if results[biggest]["moved"] is not None and one["moved"]:
            report.plot_ratios.append((f"S6 bytes {biggest}w/1w (≤)",
                                       results[biggest]["moved"] / one["moved"], 1.1, "<="))
        report.plot_ratios.append((f"S6 write {biggest}w/1w (≤)",
                                   results[biggest]["write_s"] / one["write_s"], 1.25, "<="))
