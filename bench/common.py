"""Pieces shared by the driver and the Ray worker actors: model, timing, memory."""

from __future__ import annotations

import bench  # noqa: F401  (environment before TensorFlow / gcsfs)

import datetime
import gc
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CHUNK = 16 * 1024 * 1024


# -- the model ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """An MLP of ``layers`` Dense(width) layers; input has ``width`` features."""

    width: int
    layers: int
    batch: int = 8
    outputs: int = 10
    seed: int = 1234

    @classmethod
    def for_params(cls, params: int, batch: int = 8) -> "ModelSpec":
        layers = 6 if params >= 30_000_000 else 4 if params >= 1_000_000 else 2
        width = max(64, int(round(math.sqrt(params / layers) / 64.0)) * 64)
        return cls(width=width, layers=layers, batch=batch)

    @property
    def params(self) -> int:
        w = self.width
        return self.layers * (w * w + w) + w * self.outputs + self.outputs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(spec: ModelSpec):
    """The compiled (Adam) model, seeded: every process builds identical weights."""
    import keras

    keras.utils.set_random_seed(spec.seed)
    layers = [keras.Input((spec.width,))]
    layers += [keras.layers.Dense(spec.width, activation="relu") for _ in range(spec.layers)]
    layers.append(keras.layers.Dense(spec.outputs))
    model = keras.Sequential(layers, name="bench_mlp")
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    return model


def make_data(spec: ModelSpec, steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    n = spec.batch * max(1, steps)
    x = rng.standard_normal((n, spec.width), dtype=np.float32)
    y = rng.standard_normal((n, spec.outputs), dtype=np.float32)
    return x, y


def free_keras() -> None:
    """Drop Keras's graph state and give freed heap pages back to the system:
    the Ray sections' workers need the memory the driver's model held."""
    try:
        import keras

        keras.backend.clear_session()
    except Exception:  # noqa: BLE001
        pass
    release_heap()


def release_heap() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc
    keeps freed arenas otherwise): the sections after need the memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- timing inside fit() ----------------------------------------------------------------


def timed(cls):
    """A subclass of callback ``cls`` that times its ``on_train_batch_end``.

    ``batch_seconds[i]`` is the time spent in the callback after global batch
    ``i + 1`` (1-based step numbers, across epochs); ``begin_seconds`` and
    ``end_seconds`` the time in ``on_train_begin`` / ``on_train_end``.
    """

    class Timed(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.batch_seconds: list[float] = []
            self.begin_seconds: float | None = None
            self.end_seconds: float | None = None

        def on_train_begin(self, logs=None):
            started = time.perf_counter()
            try:
                return super().on_train_begin(logs)
            finally:
                self.begin_seconds = time.perf_counter() - started

        def on_train_end(self, logs=None):
            started = time.perf_counter()
            try:
                return super().on_train_end(logs)
            finally:
                self.end_seconds = time.perf_counter() - started

        def on_train_batch_end(self, batch, logs=None):
            started = time.perf_counter()
            try:
                return super().on_train_batch_end(batch, logs)
            finally:
                self.batch_seconds.append(time.perf_counter() - started)

    Timed.__name__ = Timed.__qualname__ = f"Timed{cls.__name__}"
    return Timed


def step_clock():
    """A callback recording when the first batch began and every batch ended.

    Put it *last* in the callback list, so a batch's end time includes the
    other callbacks' work. It overrides ``on_train_batch_end``, which makes
    Keras dispatch callbacks synchronously, so use it in every compared run.
    """
    import keras

    class StepClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.begin: float | None = None
            self.ends: list[float] = []
            self.train_end: float | None = None

        def on_train_batch_begin(self, batch, logs=None):
            if self.begin is None:
                self.begin = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

        def on_train_end(self, logs=None):
            self.train_end = time.perf_counter()

        @property
        def wall(self) -> float:
            return self.ends[-1] - self.begin

    return StepClock()


def save_steps(batch_seconds: list[float], every: int, offset: int = 0) -> list[float]:
    """The callback times of the batches that ended on a save.

    Saves happen when ``offset + batch`` is a multiple of ``every``: Keras's
    callbacks count batches from the start of ``fit()`` (``offset=0``);
    ckptmgr counts the optimizer's iterations (``offset`` = iterations at the
    start of ``fit()``).
    """
    return [t for i, t in enumerate(batch_seconds, start=1) if (offset + i) % every == 0]


def iterations(model) -> int:
    """The optimizer's step counter (ckptmgr's global step)."""
    return int(np.asarray(model.optimizer.iterations.numpy()))


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# -- memory ------------------------------------------------------------------------


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that an
    RSS measurement that follows sees new allocations as growth instead of
    reusing pages that earlier sections freed but the allocator kept."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except Exception:  # noqa: BLE001 - not glibc
        pass


class RssSampler:
    """Peak RSS of one process, sampled every ``interval`` s in a thread.

    ``private`` is RSS minus shared (file-backed and shared-memory) pages: for a
    Ray worker, what it allocated itself, as opposed to object-store pages it
    only maps.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.01):
        import psutil

        self.process = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.baseline_rss = self.peak_rss = 0
        self.baseline_private = self.peak_private = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[int, int]:
        info = self.process.memory_info()
        return info.rss, info.rss - getattr(info, "shared", 0)

    def __enter__(self) -> "RssSampler":
        self.baseline_rss, self.baseline_private = self._read()
        self.peak_rss, self.peak_private = self.baseline_rss, self.baseline_private
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-rss")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss, private = self._read()
            except Exception:  # noqa: BLE001 - process gone
                return
            self.samples += 1
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_private = max(self.peak_private, private)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            rss, private = self._read()
            self.peak_rss, self.peak_private = max(self.peak_rss, rss), max(self.peak_private, private)
        except Exception:  # noqa: BLE001
            pass

    @property
    def delta_rss(self) -> int:
        return self.peak_rss - self.baseline_rss

    @property
    def delta_private(self) -> int:
        return self.peak_private - self.baseline_private


# -- page cache ---------------------------------------------------------------------


def drop_cache(path: str) -> float | None:
    """Evict ``path``'s (clean) pages from the page cache; the fraction of its
    pages still resident afterwards (None if that cannot be checked).

    ``posix_fadvise(POSIX_FADV_DONTNEED)`` needs no privileges and works on a
    file whose pages are clean (written and fsynced) and not mapped; the next
    read then comes from the disk (or the hypervisor's cache below it).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


def resident_fraction(path: str) -> float | None:
    """Share of ``path``'s pages in the page cache (``mincore``), or None."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        pages = -(-size // mmap.PAGESIZE)
        fd = os.open(path, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if address in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, vec) != 0:
                return None
            return float((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) / pages
        finally:
            libc.munmap(address, size)
    except Exception:  # noqa: BLE001 - not Linux/glibc: unknown
        return None


# -- raw I/O references ---------------------------------------------------------------


def raw_write(path: str, block: np.ndarray, nbytes: int) -> float:
    """Seconds to write ``nbytes`` (from ``block``, zero-padded) buffered, then fsync."""
    view = memoryview(block.reshape(-1).view(np.uint8))
    pad = bytes(max(0, nbytes - len(view)))
    view = view[: min(len(view), nbytes)]
    started = time.perf_counter()
    with open(path, "wb") as f:
        for start in range(0, len(view), CHUNK):
            f.write(view[start : start + CHUNK])
        if pad:
            f.write(pad)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


def raw_read(path: str, block: np.ndarray) -> tuple[float, int]:
    """Seconds to read all of ``path`` sequentially into ``block`` (16 MiB reads).

    ``block`` (already touched, so no page faults) must hold the whole file.
    """
    view = memoryview(block.reshape(-1).view(np.uint8))
    total = 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(view[total : total + CHUNK])
            if not got:
                break
            total += got
    return time.perf_counter() - started, total


# -- the machine -------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break
    except OSError:
        pass
    versions = []
    for name in ("numpy", "h5py", "keras", "tensorflow", "ray", "fsspec", "gcsfs"):
        try:
            from importlib.metadata import version

            dist = "tensorflow-cpu" if name == "tensorflow" else name
            try:
                versions.append(f"{name} {version(dist)}")
            except Exception:  # noqa: BLE001
                versions.append(f"{name} {version(name)}")
        except Exception:  # noqa: BLE001
            pass
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores, {ram} RAM, {platform.system()} {platform.release()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "software": f"Python {platform.python_version()}, " + ", ".join(versions),
    }


def code_state(repo: str) -> tuple[str, str]:
    """(description of the ckptmgr code being measured, digest of its sources)."""
    import hashlib
    import subprocess
    from pathlib import Path

    digest = hashlib.sha256()
    for path in sorted(Path(repo, "ckptmgr").glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                                capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ckptmgr"], cwd=repo, text=True,
                               capture_output=True, timeout=10).stdout.split("\n")
        changed = [line[3:] for line in dirty if line.strip()]
    except Exception:  # noqa: BLE001 - not a git checkout
        return f"ckptmgr sources sha256 {digest.hexdigest()[:12]}", digest.hexdigest()
    text = f"commit {commit or '?'}"
    if changed:
        text += " + uncommitted changes in " + ", ".join(changed)
    return f"{text} (ckptmgr sources sha256 {digest.hexdigest()[:12]})", digest.hexdigest()


def parse_count(text: str) -> int:
    """``100M``, ``1.5e8``, ``10_000_000`` -> int."""
    t = str(text).strip().replace("_", "").upper()
    mult = 1
    if t.endswith(("K", "M", "G", "B")):
        mult = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}[t[-1]]
        t = t[:-1]
    return int(float(t) * mult)
