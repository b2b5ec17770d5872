"""S9: replica-parallel writes: N ranks, one byte range each, one ``.keras`` archive.

Drives what the Ray coordinator does for a ranged save, without Ray or
TensorFlow: ``CheckpointManager.write_ranges(step, spec, N, dispatch)`` (the
committer's ``write_ranges``, as the coordinator calls it) plans the archive
and cuts it into N ranges; ``dispatch`` hands range ``i`` to rank process ``i``, which calls
``ckptmgr.ranged_write.write_assigned_range(Storage(url, options), snapshot,
assignment)`` on its own copy of the (replicated) state, as a Ray worker
does; the coordinator then writes the tail and assembles the archive
(positioned writes on local disk, GCS compose, S3 multipart part copies) and
commits the manifest. Ranks are processes (spawned once and kept: their start
and their state are not timed), never threads, which would share the GIL.

Object stores are reached through :class:`bench.throttle.ThrottledProxy`, which
caps every TCP connection on its own (``cap_mb_s``), as real stores cap single
streams: aggregate rate should grow ~N× until the machine (2 cores here, the
emulator's own CPU) runs out. Each backend's uncapped rate at the largest N
is measured too, as that limit.
"""

from __future__ import annotations

import bench  # noqa: F401  (environment before gcsfs)

import gc
import multiprocessing
import os
import shutil
import time
import traceback
from typing import Any

import numpy as np

from bench.context import Context
from bench.report import Row

MiB = 1024 * 1024
_ARRAY_MIB = 16  # the synthetic state: float32 arrays of this size (plus small ones)
_CONFIG = '{"class_name": "Sequential", "config": {"name": "bench_ranged"}}'
_METADATA = '{"keras_version": "3.15.1", "date_saved": "2026-12-01@10:11:12"}'


# -- the replicated state ------------------------------------------------------------


def _layout(total_mib: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(group path, key, shape) of a synthetic model of about ``total_mib``:
    each large array a little under 16 MiB, so that the archive (headers
    included) is a whole number of 16 MiB checksum chunks, which the ranks
    split evenly (ranges are cut on chunk boundaries)."""
    per = (_ARRAY_MIB * MiB - 256 * 1024) // 4
    arrays, layer = [], 0
    for i in range(max(1, total_mib // _ARRAY_MIB)):
        if i % 3 == 0:
            layer += 1
            arrays.append((f"layers/dense_{layer}/vars", "1", (1024,)))  # a small inline one
        arrays.append((f"layers/dense_{layer}/vars", str(i % 3 * 2), (per // 1024, 1024)))
    return arrays


def _groups(total_mib: int, make) -> list:
    from ckptmgr.io.snapshot import VarGroup

    groups: dict[str, Any] = {}
    for path, key, shape in _layout(total_mib):
        group = groups.setdefault(path, VarGroup(path, {"name": path.split("/")[1]}, []))
        group.arrays.append((key, make(shape)))
    return list(groups.values())


def snapshot(total_mib: int, seed: int = 7):
    """Every rank's copy of the replicated state (random float32 bytes)."""
    from ckptmgr.io.snapshot import ModelSnapshot

    rng = np.random.default_rng(seed)

    def make(shape):
        n = int(np.prod(shape))
        if n * 4 < 64 * 1024:
            return np.zeros(shape, np.float32)  # inlined in the HDF5 skeleton: as in spec()
        return np.frombuffer(rng.bytes(n * 4), dtype=np.float32).reshape(shape)

    return ModelSnapshot(_CONFIG, _METADATA, _groups(total_mib, make))


def spec(total_mib: int):
    """The coordinator's view: shapes and dtypes only (no array data)."""
    from ckptmgr.io.snapshot import ArraySpec, ModelSnapshot

    def make(shape):
        if int(np.prod(shape)) * 4 < 64 * 1024:
            return np.zeros(shape, np.float32)  # inlined: must be real (same bytes on every rank)
        return ArraySpec(tuple(shape), np.dtype(np.float32))

    return ModelSnapshot(_CONFIG, _METADATA, _groups(total_mib, make))


# -- rank processes ------------------------------------------------------------------


def _rank_main(conn, total_mib: int) -> None:
    """One rank: build the state once, then write the ranges it is handed."""
    from ckptmgr.io.storage import Storage
    from ckptmgr.ranged_write import write_assigned_range

    state = snapshot(total_mib)
    conn.send(("ready", os.getpid()))
    while True:
        message = conn.recv()
        if message is None:
            return
        url, options, assignment = message
        started = time.perf_counter()
        try:
            result = write_assigned_range(Storage(url, options), state, assignment)
            conn.send(("ok", result, time.perf_counter() - started))
        except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


class Ranks:
    """``n`` spawned rank processes, each holding its own copy of the state."""

    def __init__(self, n: int, total_mib: int):
        ctx = multiprocessing.get_context("spawn")
        self.pipes, self.processes = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_rank_main, args=(child, total_mib), daemon=True,
                                  name="bench-rank")
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)
        self.pids = []
        for pipe in self.pipes:
            if not pipe.poll(300):
                raise RuntimeError("a rank process did not start within 300 s")
            kind, pid = pipe.recv()
            self.pids.append(pid)
        self.rank_seconds: list[float] = []

    def dispatcher(self, url: str, options: dict):
        """The ``dispatch`` of ``write_ranges``: range i to process i, all at once."""
        def dispatch(assignments):
            if len(assignments) > len(self.pipes):
                raise RuntimeError(f"{len(assignments)} ranges for {len(self.pipes)} ranks")
            for pipe, assignment in zip(self.pipes, assignments):
                pipe.send((url, options, assignment))
            results, seconds, errors = [], [], []
            for pipe in self.pipes[: len(assignments)]:
                message = pipe.recv()
                if message[0] == "ok":
                    results.append(message[1])
                    seconds.append(message[2])
                else:
                    errors.append(f"{message[1]}\n{message[2]}")
            if errors:
                raise RuntimeError("a rank failed: " + errors[0])
            self.rank_seconds = seconds
            return results
        return dispatch

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- backends ------------------------------------------------------------------------


class _Backend:
    """Where the archives go: a fresh directory URL and its fsspec options."""

    name = ""

    def __init__(self, cap: float | None):
        self.cap = cap

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def new_url(self) -> tuple[str, dict]:
        raise NotImplementedError

    def connections(self) -> int | None:
        return None


class _Local(_Backend):
    name = "local disk (pwrite)"

    def __init__(self, cap, root: str):
        super().__init__(None)
        self.root, self.n = root, 0

    def new_url(self):
        self.n += 1
        return os.path.join(self.root, f"ranged-{self.n}"), {}


class _Proxied(_Backend):
    """An emulator behind its own capped proxy."""

    def __init__(self, cap):
        super().__init__(cap)
        self.proxy = None
        self.server = None

    def connections(self):
        return self.proxy.connections if self.proxy is not None else None

    def __exit__(self, *exc):
        if self.proxy is not None:
            self.proxy.close()
        if self.server is not None:
            self.server.stop()


class _Gcs(_Proxied):
    name = "fake-gcs-server (compose)"

    def __enter__(self):
        from bench.gcs import GCSServer
        from bench.throttle import ThrottledProxy

        self.proxy = ThrottledProxy(self.cap).start()
        proxy_port = self.proxy.port

        class Behind(GCSServer):  # resumable-upload URLs must point at the proxy too
            def _command(self, port):
                command = super()._command(port)
                command[command.index("-external-url") + 1] = f"http://127.0.0.1:{proxy_port}"
                return command

        self.server = Behind().start()
        self.proxy.upstream = ("127.0.0.1", self.server.port)
        return self

    def new_url(self):
        return self.server.new_url("s9-"), {"token": "anon", "endpoint_url": self.proxy.endpoint}


class _S3(_Proxied):
    name = "moto S3 (multipart part copy)"

    def __enter__(self):
        from bench.gcs import S3Server
        from bench.throttle import ThrottledProxy

        self.proxy = ThrottledProxy(self.cap).start()
        self.server = S3Server().start()
        self.proxy.upstream = ("127.0.0.1", self.server.port)
        return self

    def new_url(self):
        options = self.server.storage_options
        options["client_kwargs"] = {"endpoint_url": self.proxy.endpoint}
        return self.server.new_url("s9-"), options


BACKENDS = {"local": _Local, "gcs": _Gcs, "s3": _S3}


# -- one measurement ------------------------------------------------------------------


def write_once(ranks: Ranks, backend: _Backend, n: int, spec_, *, verify: bool = False) -> dict:
    """One archive written by ``n`` ranks; its size, time and rate. ``verify``
    reads it back whole (through the proxy: do it uncapped)."""
    from ckptmgr import CheckpointManager

    url, options = backend.new_url()
    manager = CheckpointManager(url, storage_options=options)
    started = time.perf_counter()
    manifest = manager.write_ranges(1, spec_, n, ranks.dispatcher(url, options), prune=False)
    wall = time.perf_counter() - started
    if manifest.world.get("ranges") != n:
        raise RuntimeError(f"{n} ranks asked, {manifest.world.get('ranges')} ranges written")
    if verify and not manager.verify(1)[0].ok:
        raise RuntimeError(f"{url}: the ranged archive does not verify")
    size = manifest.stats.bytes
    out = dict(bytes=size, write_s=manifest.stats.write_s, wall_s=wall,
               rank_s=list(ranks.rank_seconds), rate=size / manifest.stats.write_s)
    try:
        if backend.cap is None and isinstance(backend, _Local):
            shutil.rmtree(url, ignore_errors=True)
        else:
            manager.storage.fs.rm(manager.storage.root, recursive=True)
    except Exception:  # noqa: BLE001 - tidying only
        pass
    return out


def ranged_writes(ctx: Context) -> None:
    s = ctx.settings
    backends = [b for b in s.ranged_backends if not (s.skip_gcs and b in ("gcs", "s3"))]
    if not backends:
        raise RuntimeError("no backend left to measure")
    counts = sorted(set(s.ranged_ranks))
    top = max(counts)
    spec_ = spec(s.ranged_mib)
    report = ctx.report
    started = time.perf_counter()
    caps = {}
    with Ranks(top, s.ranged_mib) as ranks:
        ctx.log(f"S9: {len(ranks.pids)} rank processes ready in {time.perf_counter() - started:.1f}s")
        for key in backends:
            factory = BACKENDS[key]
            results: dict[int, dict] = {}
            ceiling = cap = None
            if key == "local":
                backend = factory(None, ctx.tmp)
                write_once(ranks, backend, 1, spec_)  # warm: imports, page cache
                for n in counts:
                    results[n] = write_once(ranks, backend, n, spec_, verify=n == top)
            else:
                with factory(None) as backend:  # the machine's own limit at the largest N
                    write_once(ranks, backend, top, spec_)  # warm: imports, connections
                    ceiling = write_once(ranks, backend, top, spec_, verify=True)["rate"]
                # Each connection's cap: the configured one, or lower where N × cap would
                # not fit under the machine's limit (2 cores: the emulator is the limit).
                cap = min(s.cap_mb_s * 1e6, s.cap_share * ceiling / top)
                caps[key] = cap
                with factory(cap) as backend:
                    for n in counts:
                        results[n] = write_once(ranks, backend, n, spec_)
            for n, r in results.items():
                ctx.log(f"S9 {key}: {n} rank(s): {r['rate'] / 1e6:.0f} MB/s ({r['write_s']:.2f} s)"
                        + (f"; cap {cap / 1e6:.1f} MB/s, uncapped {top}: {ceiling / 1e6:.0f} MB/s" if cap else ""))
            _report(report, key, factory.name, results, ceiling, cap, ctx.results.get("raw_write_rate"))
            gc.collect()
    capped = "; ".join(f"{k}: {v / 1e6:.1f} MB/s" for k, v in caps.items())
    report.note("S9", (
        f"Synthetic replicated state of {s.ranged_mib} MiB (float32, random bytes) held by every rank "
        "process; ranks are spawned processes kept across runs (start and state not timed); time = the "
        "manifest's write_s (plan, every rank's range, tail, server-side assembly, which is included); "
        "the archive at the largest N is read back and verified. Object stores go through "
        "bench/throttle.py, a TCP proxy on 127.0.0.1 that caps each connection on its own. The cap is "
        f"{s.cap_mb_s:g} MB/s, lowered to {s.cap_share:g} × (the uncapped rate at {top} ranks) / {top} where "
        f"that is less, so that N × cap fits under what this machine carries ({capped or 'no object store'}). "
        "'single stream' = the 1-rank rate through the same proxy; the target is aggregate ≥ 0.8 × N × "
        "single."))


def _report(report, key: str, name: str, results: dict[int, dict], ceiling: float | None,
            cap: float | None, raw_rate: float | None) -> None:
    cap_mb_s = cap / 1e6 if cap else None
    one = results[min(results)]
    single, single_ranges = one["rate"], one["bytes"] / max(one["rank_s"])
    where = f"cap {cap_mb_s:.1f} MB/s per connection" if cap_mb_s else "no cap"
    for n, r in sorted(results.items()):
        slowest = max(r["rank_s"])
        ranges_rate = r["bytes"] / slowest
        note = (f"{r['bytes'] / 1e6:.0f} MB in {r['write_s']:.2f} s ({where}): ranks' ranges "
                f"{', '.join(f'{t:.2f}' for t in r['rank_s'])} s, then tail + assembly + commit "
                f"{r['write_s'] - slowest:.2f} s")
        if n == min(results):
            if cap_mb_s:
                ref, ref_value, ratio = "cap per connection", cap_mb_s, r["rate"] / cap
            else:
                ref, ref_value = "raw write + fsync (S3)", raw_rate / 1e6 if raw_rate else None
                ratio = r["rate"] / raw_rate if raw_rate else None
            report.add(Row("S9", f"{name}: 1 rank (single stream), write rate end to end", r["rate"] / 1e6,
                           "MB/s", ref, ref_value, ratio=ratio, note=note))
            continue
        ideal = n * single
        ratio = r["rate"] / ideal
        note += f"; ranges phase alone {ranges_rate / (n * single_ranges):.2f} of N × its single-rank rate"
        if ceiling is not None:
            note += f"; uncapped, {max(results)} ranks: {ceiling / 1e6:.0f} MB/s (this machine's limit)"
        elif raw_rate:
            note += f"; {r['rate'] / raw_rate:.2f} of the raw single-stream disk rate (S3)"
        name_n = f"{name}: {n} ranks, aggregate write rate end to end"
        if key == "local":
            report.add(Row("S9", name_n, r["rate"] / 1e6, "MB/s", f"{n} × single stream", ideal / 1e6,
                           ratio=ratio, target_text="none: no per-stream cap on a local disk (the page "
                           "cache, the disk and 2 cores are the limit)", note=note))
        elif ceiling is not None and ideal > 0.8 * ceiling:
            report.add(Row("S9", name_n, r["rate"] / 1e6, "MB/s", f"{n} × single stream", ideal / 1e6,
                           ratio=ratio, target_text="n/a: N × single is above this machine's uncapped rate",
                           note=note))
        else:
            report.add(Row("S9", name_n, r["rate"] / 1e6, "MB/s", f"{n} × single stream", ideal / 1e6,
                           ratio=ratio, op=">=", target=0.8, target_text="≥ 0.8 (~N×)", note=note))
            report.plot_ratios.append((f"S9 {key} {n} ranks / N×1", ratio, 0.8, ">="))
