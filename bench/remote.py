"""S4: gs:// on fake-gcs-server (filesystem backend) vs raw gcsfs of the same bytes."""

from __future__ import annotations

import bench  # noqa: F401  (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT before gcsfs)

import gc
import os
import time

from bench.context import Context
from bench.gcs import GCSServer
from bench.report import Row


def gcs_throughput(ctx: Context) -> None:
    from ckptmgr import CheckpointManager

    if ctx.model is None:
        raise RuntimeError("the model could not be set up (see the setup error)")
    model = ctx.model
    # The filesystem backend: the memory one grows to ~8.6 GB for S4's 2.4 GB of objects,
    # which with the bench process got the full run killed for memory on a 23.5 GiB machine.
    with GCSServer(filesystem_root=os.path.join(ctx.tmp, "s4-gcs")) as gcs:
        fs = gcs.fs()
        url = gcs.new_url("s4-")
        manager = CheckpointManager(url, storage_options=gcs.storage_options, keep_last=1)
        raw_path = f"{gcs.bucket}/s4-raw.bin"
        ck_write, ck_e2e, raw_w, ck_read, raw_r = [], [], [], [], []
        data: bytes | None = None
        for rep in range(ctx.settings.gcs_reps):
            step = rep + 1
            order = ("ckptmgr", "raw") if rep % 2 == 0 else ("raw", "ckptmgr")
            for who in order:
                if who == "ckptmgr":
                    started = time.perf_counter()
                    manifest = manager.save(step, model, blocking=True)
                    ck_e2e.append(time.perf_counter() - started)
                    ck_write.append(manifest.stats.write_s)
                    nbytes = manifest.stats.bytes
                    if data is None:  # the raw payload: the same bytes (raw read, untimed)
                        data = fs.cat_file(manager.archive_url(step))
                else:
                    if data is None:
                        raise RuntimeError("raw write needs the archive bytes first")
                    started = time.perf_counter()
                    fs.pipe_file(raw_path, data)
                    raw_w.append(time.perf_counter() - started)
            for who in order:
                if who == "ckptmgr":
                    started = time.perf_counter()
                    manager.restore(model, step)
                    ck_read.append(time.perf_counter() - started)
                else:
                    started = time.perf_counter()
                    got = fs.cat_file(raw_path)
                    raw_r.append(time.perf_counter() - started)
                    if len(got) != len(data):
                        raise RuntimeError("raw read returned the wrong size")
                    del got
            fs.rm_file(raw_path)
            gc.collect()
        manager.close()
        del manager, data
        gc.collect()
    n = nbytes
    w, e, rw, r, rr = (min(v) for v in (ck_write, ck_e2e, raw_w, ck_read, raw_r))
    report = ctx.report
    how = (f"best of {ctx.settings.gcs_reps} each, alternating order" if ctx.settings.gcs_reps > 1
           else "one repetition (bounds the run time), ckptmgr first")
    report.add(Row("S4", "ckptmgr write to gs:// (manifest write_s: streamed upload)", n / w / 1e6, "MB/s",
                   "raw gcsfs pipe_file, same bytes", n / rw / 1e6, ratio=rw / w, op=">=", target=0.9,
                   note=f"{w:.2f} s vs {rw:.2f} s; {how}"))
    report.add(Row("S4", "ckptmgr save to gs:// end to end (blocking)", n / e / 1e6, "MB/s",
                   "raw gcsfs pipe_file", n / rw / 1e6, ratio=rw / e, op=">=", target=0.9,
                   note=f"{e:.2f} s vs {rw:.2f} s"))
    report.add(Row("S4", "ckptmgr restore from gs:// (download + verify + load)", n / r / 1e6, "MB/s",
                   "raw gcsfs cat_file", n / rr / 1e6, ratio=rr / r, op=">=", target=0.9,
                   note=f"{r:.2f} s vs {rr:.2f} s"))
    report.plot_ratios += [("S4 gs write", rw / w, 0.9, ">="), ("S4 gs save e2e", rw / e, 0.9, ">="),
                           ("S4 gs restore", rr / r, 0.9, ">=")]
