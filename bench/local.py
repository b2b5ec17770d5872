"""Single-process sections: blocked time, slowdown, local disk, writer memory, profile."""

from __future__ import annotations

import bench  # noqa: F401

import cProfile
import gc
import hashlib
import io
import os
import pstats
import shutil
import time
import zlib

import numpy as np

from bench.common import (
    RssSampler,
    build_model,
    iterations,
    make_data,
    median,
    raw_read,
    raw_write,
    save_steps,
    step_clock,
    timed,
)
from bench.context import Context
from bench.report import Row

_ALIGN = 64


# -- setup ----------------------------------------------------------------------


def setup_model(ctx: Context) -> None:
    """Build, compile and train a few steps (Adam slots exist); time a step."""
    spec = ctx.spec
    started = time.perf_counter()
    ctx.model = build_model(spec)
    x, y = make_data(spec, 3)
    ctx.model.fit(x, y, batch_size=spec.batch, epochs=1, shuffle=False, verbose=0)
    ctx.log(f"model: {ctx.model.count_params():,} params ({spec.layers} x Dense({spec.width})), "
            f"built and warmed in {time.perf_counter() - started:.1f}s")
    x, y = make_data(spec, 5)
    clock = step_clock()
    ctx.model.fit(x, y, batch_size=spec.batch, epochs=1, shuffle=False, verbose=0, callbacks=[clock])
    ctx.step_s = clock.wall / len(clock.ends)
    variables = _state_variables(ctx.model)
    ctx.state_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    # One block of host memory, touched now: the floor's buffers and raw I/O's.
    ctx.block = np.ones(ctx.state_bytes + len(variables) * _ALIGN + 64 * 1024 * 1024, np.uint8)
    ctx.log(f"step {ctx.step_s * 1e3:.0f} ms; state {ctx.state_bytes / 1e9:.3f} GB")


def _state_variables(model) -> list:
    seen, out = set(), []
    for v in list(model.weights) + list(model.optimizer.variables):
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _tf_view(variable) -> np.ndarray:
    """A zero-copy host view of a TF-backed Keras variable (copy if impossible)."""
    inner = getattr(variable, "value", variable)
    tensor = inner.read_value() if hasattr(inner, "read_value") else inner
    if hasattr(tensor, "_numpy"):
        return tensor._numpy()
    return np.asarray(tensor)


def _views(ctx: Context, variables) -> list[np.ndarray]:
    views, offset = [], 0
    for v in variables:
        dtype = np.dtype(v.dtype)
        n = int(np.prod(v.shape)) * dtype.itemsize
        views.append(ctx.block[offset : offset + n].view(dtype).reshape(tuple(v.shape)))
        offset += (n + _ALIGN - 1) // _ALIGN * _ALIGN
    return views


def _need_model(ctx: Context):
    if ctx.model is None:
        raise RuntimeError("the model could not be set up (see the setup error)")
    return ctx.model


# -- S1: blocked time ------------------------------------------------------------------


def memcpy_floor(ctx: Context) -> None:
    model = _need_model(ctx)
    report = ctx.report
    variables = _state_variables(model)
    views = _views(ctx, variables)

    def copy_zero_copy():
        for buf, v in zip(views, variables):
            np.copyto(buf, _tf_view(v))

    def copy_via_numpy():
        for buf, v in zip(views, variables):
            np.copyto(buf, np.asarray(getattr(v, "value", v).numpy()))

    def fresh_copies():
        return [np.asarray(v.numpy()).copy() for v in variables]

    out = {}
    for name, fn, reps in (("floor", copy_zero_copy, 5), ("via_numpy", copy_via_numpy, 3),
                           ("fresh", fresh_copies, 2)):
        fn()  # warm (touch, allocator)
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - started)
            del result
            gc.collect()
        out[name] = median(times)
    ctx.results["floor_s"] = out["floor"]
    n = ctx.state_bytes
    report.add(Row("S1", "memcpy floor: np.copyto of every variable (zero-copy TF view) "
                   "into preallocated buffers", out["floor"], "s",
                   note=f"{n / out['floor'] / 1e9:.1f} GB/s over {n / 1e9:.3f} GB; median of 5"))
    report.add(Row("S1", "np.copyto from v.numpy() into preallocated buffers (a copying read first)",
                   out["via_numpy"], "s", "memcpy floor", out["floor"],
                   ratio=out["via_numpy"] / out["floor"],
                   note=f"{n / out['via_numpy'] / 1e9:.1f} GB/s: .numpy() copies first"))
    report.add(Row("S1", "v.numpy().copy() into fresh memory (reference)", out["fresh"], "s",
                   "memcpy floor", out["floor"], ratio=out["fresh"] / out["floor"],
                   note=f"{n / out['fresh'] / 1e9:.1f} GB/s: page faults"))
    report.plot_blocked.append(("memcpy floor", out["floor"]))


def blocked_ckptmgr(ctx: Context) -> None:
    from ckptmgr import CheckpointManager
    from ckptmgr.keras import CheckpointCallback

    model = _need_model(ctx)
    spec, every, saves = ctx.spec, ctx.every(), ctx.settings.ckpt_saves
    directory = os.path.join(ctx.tmp, "s1-ckptmgr")
    x, y = make_data(spec, every * saves)
    callback = timed(CheckpointCallback)(directory, save_freq=every, restore=False,
                                         save_on_train_end=False, async_save=True)
    clock = step_clock()
    offset = iterations(model)
    model.fit(x, y, batch_size=spec.batch, epochs=1, shuffle=False, verbose=0,
              callbacks=[callback, clock])
    callback.manager.close()
    at_saves = save_steps(callback.batch_seconds, every, offset)
    others = [t for i, t in enumerate(callback.batch_seconds, 1) if (offset + i) % every]
    manifests = CheckpointManager(directory).manifests()
    if len(manifests) != saves:
        raise RuntimeError(f"expected {saves} checkpoints, found {len(manifests)}")
    captures = [m.stats.blocked_s for m in manifests]
    write_s = [m.stats.write_s for m in manifests]
    ctx.ckpt_bytes = ctx.ckpt_bytes or manifests[-1].stats.bytes
    shutil.rmtree(directory, ignore_errors=True)
    steady, steady_capture = median(at_saves[1:]), median(captures[1:])
    ctx.results.update(ckpt_callback_s=steady, ckpt_capture_s=steady_capture,
                       ckpt_first_s=at_saves[0], ckpt_write_s=median(write_s))
    floor = ctx.results.get("floor_s")
    report = ctx.report
    report.add(Row("S1", f"ckptmgr CheckpointCallback (async), median of {len(at_saves) - 1} saves "
                   "after the first: time in on_train_batch_end", steady, "s", "memcpy floor", floor,
                   ratio=steady / floor if floor else None, op="<=", target=2.0,
                   target_text="≤ 2× floor",
                   note=f"K={every} batches ({every * (ctx.step_s or 0):.1f} s of training) between saves"))
    report.add(Row("S1", "ckptmgr capture only (manifest stats.blocked_s), median after the first",
                   steady_capture, "s", "memcpy floor", floor,
                   ratio=steady_capture / floor if floor else None, op="<=", target=2.0,
                   target_text="≤ 2× floor",
                   note="callback − capture = " + _ms(steady - steady_capture)
                   + " (loop state, metrics, waiting for a previous write)"))
    report.add(Row("S1", "ckptmgr first save in fit(): callback time", at_saves[0], "s",
                   note=f"capture {_ms(captures[0])}"))
    report.add(Row("S1", "ckptmgr callback on batches without a save (median)", median(others), "s"))
    report.add(Row("S1", "ckptmgr background write while training (manifest write_s, median)",
                   median(write_s), "s",
                   note=f"{ctx.ckpt_bytes / median(write_s) / 1e6:.0f} MB/s; shares 2 cores with training"))
    report.plot_blocked.append(("ckptmgr capture", steady_capture))
    report.plot_blocked.append(("ckptmgr callback", steady))


def blocked_keras(ctx: Context, which: str) -> None:
    import keras

    model = _need_model(ctx)
    spec, every, saves = ctx.spec, ctx.every(), ctx.settings.keras_saves
    where = os.path.join(ctx.tmp, f"s1-{which}")
    os.makedirs(where, exist_ok=True)
    if which == "ModelCheckpoint":
        callback = timed(keras.callbacks.ModelCheckpoint)(
            os.path.join(where, "model.keras"), save_freq=every, save_weights_only=False)
    else:
        callback = timed(keras.callbacks.BackupAndRestore)(
            os.path.join(where, "backup"), save_freq=every, delete_checkpoint=True)
    x, y = make_data(spec, every * saves)
    model.fit(x, y, batch_size=spec.batch, epochs=1, shuffle=False, verbose=0,
              callbacks=[callback, step_clock()])
    shutil.rmtree(where, ignore_errors=True)
    at_saves = save_steps(callback.batch_seconds, every)
    steady = median(at_saves[1:])
    ctx.results[f"{which}_s"] = steady
    report = ctx.report
    label = ("keras ModelCheckpoint (full .keras save)" if which == "ModelCheckpoint"
             else "keras BackupAndRestore (save_weights)")
    mc = ctx.results.get("ModelCheckpoint_s")
    if which == "ModelCheckpoint":
        report.add(Row("S1", f"{label}, median of {len(at_saves) - 1} after the first", steady, "s",
                       note=f"first {_s(at_saves[0])}; K={every}; "
                       f"{(ctx.ckpt_bytes or 0) / steady / 1e6:.0f} MB/s"))
        ck, cap = ctx.results.get("ckpt_callback_s"), ctx.results.get("ckpt_capture_s")
        if ck is not None:
            for target, text in ((1 / 20, "≤ 1/20"), (1 / 50, "≤ 1/50 (stretch)")):
                report.add(Row("S1", "ckptmgr callback time / ModelCheckpoint", ck, "s",
                               "ModelCheckpoint", steady, ratio=ck / steady, op="<=", target=target,
                               target_text=text, note=f"1/{steady / ck:.0f}"))
        if cap is not None:
            report.add(Row("S1", "ckptmgr capture / ModelCheckpoint", cap, "s", "ModelCheckpoint",
                           steady, ratio=cap / steady, op="<=", target=1 / 20, target_text="≤ 1/20",
                           note=f"1/{steady / cap:.0f}"))
    else:
        report.add(Row("S1", f"{label}, median of {len(at_saves) - 1} after the first", steady, "s",
                       "ModelCheckpoint", mc, ratio=steady / mc if mc else None,
                       note=f"first {_s(at_saves[0])}"))
    report.plot_blocked.append((which, steady))


# -- S2: slowdown --------------------------------------------------------------------


def slowdown(ctx: Context) -> None:
    import keras

    from ckptmgr.keras import CheckpointCallback

    model = _need_model(ctx)
    spec, every = ctx.spec, ctx.every()
    steps = every * ctx.settings.slow_saves + every // 2
    x, y = make_data(spec, steps)

    def run(with_ckpt: bool, nice: bool = False) -> dict:
        directory = os.path.join(ctx.tmp, "s2")
        first = iterations(model)
        saves = (first + steps) // every - first // every  # ckptmgr counts optimizer steps
        callbacks = [timed(keras.callbacks.Callback)()]  # same (sync) callback dispatch
        if with_ckpt:
            callbacks = [timed(CheckpointCallback)(directory, save_freq=every, keep_last=2,
                                                   restore=False, save_on_train_end=False)]
        clock = step_clock()
        with _ReniceThreads("ckptmgr", 19) if nice else _nothing():
            model.fit(x, y, batch_size=spec.batch, epochs=1, shuffle=False, verbose=0,
                      callbacks=callbacks + [clock])
        shutil.rmtree(directory, ignore_errors=True)
        return dict(wall=clock.wall, tail=(clock.train_end or clock.ends[-1]) - clock.ends[-1],
                    saves=saves, blocked=max(save_steps(callbacks[0].batch_seconds, every, first),
                                             default=0.0))

    base1 = run(False)["wall"]
    ck = run(True)
    base2 = run(False)["wall"]
    niced = run(True, nice=True) if ctx.settings.slow_nice_experiment else None
    with_ckpt, tail, saves = ck["wall"], ck["tail"], ck["saves"]
    base = (base1 + base2) / 2
    ratio = with_ckpt / base
    per_ckpt = (with_ckpt - base) / max(1, saves)
    ctx.results["ckpt_lost_s"] = per_ckpt  # S8: the measured cost of a save to training
    step = base / steps
    report = ctx.report
    report.add(Row("S2", f"wall time of {steps} steps, ckptmgr async checkpoint every K={every} steps",
                   with_ckpt, "s", "no checkpointing (mean of before/after)", base, ratio=ratio,
                   op="<=", target=1.03, target_text="≤ 1.03 (≤ 3 % slower)",
                   note=f"{saves} checkpoints, one every {every * step:.1f} s; "
                   f"baselines {_s(base1)} / {_s(base2)}; final write waited {_s(tail)} in on_train_end (not counted)"))
    k_3 = per_ckpt / (0.03 * step) if per_ckpt > 0 else 0.0
    report.add(Row("S2", "training time lost per checkpoint", per_ckpt, "s",
                   note=f"≈ the writer's CPU time (2 cores shared with training); ≤ 3 % needs a checkpoint "
                   f"every ≥ {k_3:.0f} steps ({k_3 * step:.0f} s) here"))
    if niced is not None:
        report.add(Row("S2", "experiment: same, with ckptmgr's writer threads at nice 19 (set by the bench)",
                       niced["wall"], "s", "no checkpointing", base, ratio=niced["wall"] / base,
                       note=f"max callback time at a save {_s(niced['blocked'])} (vs {_s(ck['blocked'])} "
                       f"at nice 0): a starved writer makes the next save wait; "
                       f"final write waited {_s(niced['tail'])}"))
    report.plot_ratios.append(("S2 slowdown (≤)", ratio, 1.03, "<="))


class _ReniceThreads:
    """Renice (Linux, per thread) every thread whose name starts with ``prefix``."""

    def __init__(self, prefix: str, nice: int):
        import threading

        self.prefix, self.nice = prefix, nice
        self._stop = threading.Event()
        self._done: set[int] = set()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-renice")

    def _run(self) -> None:
        import threading

        while not self._stop.wait(0.002):
            for t in threading.enumerate():
                tid = getattr(t, "native_id", None)
                if t.name.startswith(self.prefix) and tid and tid not in self._done:
                    try:
                        os.setpriority(os.PRIO_PROCESS, tid, self.nice)
                    except OSError:
                        pass
                    self._done.add(tid)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


# -- S3: local disk throughput ----------------------------------------------------------------


def local_disk(ctx: Context) -> None:
    from ckptmgr import CheckpointManager

    model = _need_model(ctx)
    directory = os.path.join(ctx.tmp, "s3")
    manager = CheckpointManager(directory, keep_last=1)
    raw_path = os.path.join(ctx.tmp, "s3-raw.bin")
    ck_write, ck_e2e, raw_w, ck_read, raw_r, verify = [], [], [], [], [], []
    for rep in range(ctx.settings.reps + 1):  # rep 0 warms (plan, buffers); not counted
        step = rep + 1
        order = ("ckptmgr", "raw") if rep % 2 == 0 else ("raw", "ckptmgr")
        for who in order:
            os.sync()  # every timed write starts with no dirty pages outstanding
            if who == "ckptmgr":
                started = time.perf_counter()
                manifest = manager.save(step, model, blocking=True)
                e2e = time.perf_counter() - started
                ctx.ckpt_bytes = manifest.stats.bytes
                if rep:
                    ck_write.append(manifest.stats.write_s)
                    ck_e2e.append(e2e)
            else:
                nbytes = ctx.ckpt_bytes or ctx.state_bytes
                t = raw_write(raw_path, ctx.block, nbytes)
                if rep:
                    raw_w.append(t)
        # Reads, both warm (the archive was just written and is in the page cache).
        for who in order:
            if who == "ckptmgr":
                started = time.perf_counter()
                manager.restore(model, step)
                t = time.perf_counter() - started
                if rep:
                    ck_read.append(t)
            else:
                t, got = raw_read(manager.local_archive_path(step), ctx.block)
                if rep:
                    raw_r.append(t)
        if rep:
            started = time.perf_counter()
            ok = manager.verify(step)[0].ok
            verify.append(time.perf_counter() - started)
            if not ok:
                raise RuntimeError(f"step {step} does not verify")
        os.remove(raw_path)
    manager.close()
    del manager
    shutil.rmtree(directory, ignore_errors=True)
    n = ctx.ckpt_bytes
    w, e, rw, r, rr = (min(v) for v in (ck_write, ck_e2e, raw_w, ck_read, raw_r))
    mw, me, mrw, mr, mrr = (median(v) for v in (ck_write, ck_e2e, raw_w, ck_read, raw_r))
    ctx.results["local_save_e2e_s"] = me
    ctx.results["restore_s"] = r  # S8: the restart cost
    report = ctx.report
    how = (f"best of {ctx.settings.reps} each (median ratio {mrw / mw:.2f}), alternating order, "
           "os.sync() before each")
    report.note("S3", "Disk times on this shared machine are bimodal (the same 1.2 GB raw write takes "
                "0.6 s or 3+ s depending on other tenants' I/O), so each ratio compares the best of "
                "the repetitions on both sides; the median ratio is in the note.")
    report.add(Row("S3", "ckptmgr write (manifest write_s: stream + fsync + rename)", n / w / 1e6, "MB/s",
                   "raw buffered write + fsync, same bytes", n / rw / 1e6, ratio=rw / w, op=">=",
                   target=0.8, note=f"{_s(w)} vs {_s(rw)}; {how}; ranges {_range(ck_write)} vs {_range(raw_w)}"))
    report.add(Row("S3", "ckptmgr save end to end (blocking: capture + write + manifest)", n / e / 1e6,
                   "MB/s", "raw buffered write + fsync", n / rw / 1e6, ratio=rw / e, op=">=", target=0.8,
                   note=f"{_s(e)} vs {_s(rw)}; range {_range(ck_e2e)}; median ratio {mrw / me:.2f}"))
    report.add(Row("S3", "ckptmgr restore (verify sha256 + load into the model), warm cache", n / r / 1e6,
                   "MB/s", "raw sequential read of the archive, warm cache", n / rr / 1e6, ratio=rr / r,
                   op=">=", target=0.8,
                   note=f"{_s(r)} vs {_s(rr)}, best of {ctx.settings.reps}; ranges {_range(ck_read)} vs "
                   f"{_range(raw_r)}; median ratio {mrr / mr:.2f}; both read right after writing "
                   "(no cache drop possible)"))
    report.add(Row("S3", "verify alone (read + sha256 pass over the archive)", min(verify), "s",
                   "raw read", rr, ratio=min(verify) / rr if rr else None, note="best of each"))
    report.plot_ratios += [("S3 local write", rw / w, 0.8, ">="), ("S3 local save e2e", rw / e, 0.8, ">="),
                           ("S3 local restore", rr / r, 0.8, ">=")]


# -- S5: single-process writer memory -------------------------------------------------------------


def writer_memory(ctx: Context) -> None:
    from ckptmgr import CheckpointManager

    model = _need_model(ctx)
    gc.collect()
    directory = os.path.join(ctx.tmp, "s5")
    manager = CheckpointManager(directory, keep_last=1)
    out = []
    for step in (1, 2):  # 1: fresh plan and host buffers; 2: buffers reused
        with RssSampler() as rss:
            manager.save(step, model, blocking=False)
            manager.wait_until_finished()
        out.append(rss)
    manager.close()
    n = manager.manifest(2).stats.bytes
    del manager
    gc.collect()
    shutil.rmtree(directory, ignore_errors=True)
    report = ctx.report
    for rss, what in zip(out, ("first async save (allocates host buffers)",
                               "async save, buffers reused (steady state)")):
        report.add(Row("S5", f"single-process writer: RSS growth during {what}", rss.delta_rss, "B",
                       "checkpoint size", n, ratio=rss.delta_rss / n, op="<=", target=1.25,
                       target_text="≤ 1.25× checkpoint",
                       note=f"absolute peak {rss.peak_rss / 1e9:.2f} GB (includes the model itself); "
                       f"{rss.samples} samples at 10 ms"))
    report.plot_ratios.append(("S5 writer RSS growth (≤)", out[0].delta_rss / n, 1.25, "<="))


# -- S7: profile ---------------------------------------------------------------------------------


class _Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return memoryview(data).nbytes


def profile(ctx: Context) -> None:
    from ckptmgr import CheckpointManager
    from ckptmgr.io.archive import open_weights
    from ckptmgr.io.archive_plan import _h5_skeleton, write_keras_archive
    from ckptmgr.state import StatePlan, apply_weights
    from ckptmgr.io.storage import HashingWriter

    model = _need_model(ctx)
    report = ctx.report
    floor = ctx.results.get("floor_s")
    gc.collect()
    started = time.perf_counter()
    plan = StatePlan(model)
    plan_s = time.perf_counter() - started
    started = time.perf_counter()
    snapshot = plan.capture(reuse_buffers=True)
    first_s = time.perf_counter() - started
    times = []
    for _ in range(3):
        started = time.perf_counter()
        snapshot = plan.capture(reuse_buffers=True)
        times.append(time.perf_counter() - started)
    capture_s = median(times)
    n = snapshot.nbytes
    report.add(Row("S7", "StatePlan(model): planning, once per model", plan_s, "s"))
    report.add(Row("S7", "first capture into fresh host buffers (page faults)", first_s, "s",
                   "steady capture", capture_s, ratio=first_s / capture_s,
                   note=f"{n / first_s / 1e9:.2f} GB/s"))
    report.add(Row("S7", "steady capture (StatePlan.capture, reused buffers)", capture_s, "s",
                   "memcpy floor", floor, ratio=capture_s / floor if floor else None,
                   note=f"{n / capture_s / 1e9:.2f} GB/s"))
    arrays = [memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
              for g in snapshot.groups for _, a in g.arrays]

    def timed_pass(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    def sha():
        h = hashlib.sha256()
        for a in arrays:
            h.update(a)

    def crc():
        c = 0
        for a in arrays:
            c = zlib.crc32(a, c)

    sha_s, crc_s = timed_pass(sha), timed_pass(crc)
    started = time.perf_counter()
    with _h5_skeleton(snapshot):
        skeleton_s = time.perf_counter() - started
    zip_s = timed_pass(lambda: write_keras_archive(_Null(), snapshot))
    hashed_s = timed_pass(lambda: write_keras_archive(HashingWriter(_Null()), snapshot))
    raw_w = None
    raw_path = os.path.join(ctx.tmp, "s7-raw.bin")
    os.sync()
    raw_w = raw_write(raw_path, ctx.block, n)
    os.remove(raw_path)
    report.add(Row("S7", "sha256 over the state (manifest checksum), one thread", sha_s, "s",
                   "raw write + fsync", raw_w, ratio=sha_s / raw_w, note=f"{n / sha_s / 1e9:.2f} GB/s"))
    report.add(Row("S7", "zlib.crc32 over the state (zip entry CRC), one thread", crc_s, "s",
                   "raw write + fsync", raw_w, ratio=crc_s / raw_w, note=f"{n / crc_s / 1e9:.2f} GB/s"))
    report.add(Row("S7", "HDF5 skeleton (create, offsets)", skeleton_s, "s"))
    report.add(Row("S7", "write_keras_archive to a null sink (skeleton + zip + crc32, no disk)", zip_s,
                   "s", "raw write + fsync", raw_w, ratio=zip_s / raw_w))
    report.add(Row("S7", "... through HashingWriter (+ sha256), null sink", hashed_s, "s",
                   "raw write + fsync", raw_w, ratio=hashed_s / raw_w))
    del snapshot, arrays, plan
    gc.collect()

    # cProfile of one blocking save and one restore on local disk.
    directory = os.path.join(ctx.tmp, "s7")
    manager = CheckpointManager(directory)
    manager.save(1, model, blocking=True)  # plan + buffers
    blocks = []
    for label, call in (("save (blocking, local disk)", lambda: manager.save(2, model, blocking=True)),
                        ("restore (local disk, warm)", lambda: manager.restore(model, 2))):
        prof = cProfile.Profile()
        started = time.perf_counter()
        prof.enable()
        call()
        prof.disable()
        total = time.perf_counter() - started
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        body = text.getvalue()
        body = body[body.find("ncalls"):] if "ncalls" in body else body
        blocks.append((f"S7 cProfile: {label}, {total:.2f} s in all (top 12 by own time)", body))
    # Restore, split: verify (hash pass) vs HDF5 read + assign.
    started = time.perf_counter()
    manager.verify(2)
    verify_s = time.perf_counter() - started
    started = time.perf_counter()
    with open(manager.local_archive_path(2), "rb") as f, open_weights(f) as h5:
        apply_weights(model, h5)
    apply_s = time.perf_counter() - started
    raw_r, _ = raw_read(manager.local_archive_path(2), ctx.block)
    report.add(Row("S7", "restore part 1: verify (read + sha256)", verify_s, "s", "raw read", raw_r,
                   ratio=verify_s / raw_r))
    report.add(Row("S7", "restore part 2: HDF5 read through the zip window + variable assign", apply_s,
                   "s", "raw read", raw_r, ratio=apply_s / raw_r))
    manager.close()
    del manager
    shutil.rmtree(directory, ignore_errors=True)
    report.blocks += blocks


def _range(values) -> str:
    return f"{_s(min(values))}–{_s(max(values))}" if values else "n/a"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else _ms(seconds)
