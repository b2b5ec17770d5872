"""Hostile or odd files never make ckptmgr misbehave (issue 8).

Everything runs on local disk against real Keras checkpoints. A module-scoped
fixture saves steps 10, 20, 30 of a tiny model; each test works on a private
copy and then plants something hostile in it: symlinks to ``/dev/zero`` or out
of the root, FIFOs, zip bombs, archives with extra members, stray names,
directories under checkpoint names, a symlinked ``.tmp``/``.lease``, export
destinations inside the root.

The CLI runs as a subprocess under ``RLIMIT_AS`` (3 GiB), with a 60 s timeout;
its RSS is sampled every 10 ms. (``wait4``'s ``ru_maxrss`` would not do: a
child started by ``vfork`` from a big pytest process inherits the parent's
high-water mark across ``exec``.) In-process calls are measured the same way,
by sampling this process's RSS against its RSS before the call.
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import zipfile  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.errors import CkptmgrError, ConfigError, CorruptCheckpointError  # noqa: E402
from ckptmgr.io.layout import archive_name, manifest_name, new_attempt_id  # noqa: E402
from ckptmgr.io.manifest import Manifest  # noqa: E402

STEPS = (10, 20, 30)
CKPTMGR = shutil.which("ckptmgr", path=os.path.dirname(sys.executable)) or shutil.which("ckptmgr")
CLI_TIMEOUT_S = 60
CLI_ADDRESS_LIMIT = 3 << 30  # RLIMIT_AS for CLI subprocesses
MEMORY_BOUND = 1 << 30  # peak RSS of a CLI run; growth of this process in one call
BOMB_BYTES = 2 << 30  # what a zip bomb member expands to


# -- helpers -------------------------------------------------------------------------


@dataclass
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes

    def describe(self) -> str:
        return f"ckptmgr {' '.join(self.args)} -> rc={self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


_LIMITED_EXEC = (
    "import os, resource, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def cli(*args, cwd=None, timeout: float = CLI_TIMEOUT_S) -> CliResult:
    """Run the ckptmgr console script under RLIMIT_AS; fail the test if it hangs."""
    assert CKPTMGR, "the ckptmgr console script is not installed (pip install -e .)"
    args = tuple(str(a) for a in args)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", COLUMNS="200")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LIMITED_EXEC, str(CLI_ADDRESS_LIMIT), CKPTMGR, *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd,
        )
        deadline = time.monotonic() + timeout
        with RssSampler(proc.pid) as sampler:
            while True:
                pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    os.wait4(proc.pid, 0)
                    proc.returncode = -9
                    out.seek(0), err.seek(0)
                    pytest.fail(
                        f"ckptmgr {' '.join(args)} hung for {timeout} s\nstdout:\n"
                        f"{out.read().decode(errors='replace')}\nstderr:\n{err.read().decode(errors='replace')}"
                    )
                time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return CliResult(
            args,
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            sampler.peak,
        )


class RssSampler:
    """The highest RSS of one process, sampled every 10 ms in a thread."""

    def __init__(self, pid: int | None = None):
        self._process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            self.peak = max(self.peak, self._process.memory_info().rss)
        except psutil.Error:  # exited
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def __enter__(self) -> "RssSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        self._sample()
        return False


def error_lines(result: CliResult) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_sane(result: CliResult) -> None:
    """No traceback, bounded memory, not killed by a signal."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text, result.describe()
    assert "MemoryError" not in text, result.describe()
    assert result.returncode >= 0, result.describe()
    assert result.peak_rss < MEMORY_BOUND, f"peak RSS {result.peak_rss / 2**20:.0f} MiB\n" + result.describe()


def assert_one_error(result: CliResult) -> str:
    assert_sane(result)
    assert result.returncode != 0, result.describe()
    lines = error_lines(result)
    assert len(lines) == 1, result.describe()
    return lines[0]


def listed_steps(directory) -> list[int]:
    result = cli("list", directory, "--json")
    assert_sane(result)
    assert result.returncode == 0, result.describe()
    return [row["step"] for row in json.loads(result.stdout)]


def tiny_model():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(4, 4)), rng.normal(size=(4, 3)), batch_size=4, epochs=1, verbose=0)
    return model


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_entry(path) -> dict:
    data = Path(path).read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def manifest_body(root: Path, step: int) -> dict:
    body = json.loads((root / manifest_name(step)).read_bytes())
    body.pop("checksum", None)
    return body


def seal(body: dict) -> bytes:
    """A manifest with a valid self-checksum, as ckptmgr writes it."""
    return Manifest.model_validate(body).to_bytes()


def seal_verbatim(body: dict) -> bytes:
    """Checksum over ``body`` exactly as given (keeps e.g. a naive timestamp)."""
    body = {k: v for k, v in body.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    body["checksum"] = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(body, indent=2).encode()


def reseal_for_archive(root: Path, step: int) -> None:
    """After replacing the archive of ``step`` in place, fix its manifest's size and sha256."""
    body = manifest_body(root, step)
    body["files"] = {body["archive"]: file_entry(root / body["archive"])}
    (root / manifest_name(step)).write_bytes(seal(body))


def hand_made_manifest(root: Path, step: int, *, like: int, entry: dict | None = None) -> str:
    """Commit a manifest for a new ``step`` (copied from step ``like``); returns the archive name
    it names (created by the caller). ``entry`` defaults to ``like``'s archive size and sha256."""
    body = manifest_body(root, like)
    entry = entry or body["files"][body["archive"]]
    attempt = new_attempt_id()
    name = archive_name(step, attempt)
    body.update(step=step, archive=name, attempt=attempt, files={name: entry})
    (root / manifest_name(step)).write_bytes(seal(body))
    return name


def members(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def write_stored_zip(path: Path, content: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in content.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            zf.writestr(info, data)


def write_bomb_member(zf: zipfile.ZipFile, name: str, total: int = BOMB_BYTES) -> None:
    """A deflated member of ``total`` spaces (about 1000:1).

    Every 16 MiB chunk deflates to the same self-contained block run (a full
    flush resets the history), so it is compressed once and repeated; the
    result is an ordinary deflate stream (checked by the caller).
    """
    chunk = b" " * (16 << 20)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = co.compress(chunk) + co.flush(zlib.Z_FULL_FLUSH)

    class _Repeat:
        def compress(self, data):
            assert data is chunk
            return segment

        def flush(self):
            return b"\x03\x00"  # final empty fixed-Huffman block

    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w", force_zip64=True) as member:
        if hasattr(member, "_compressor"):
            member._compressor = _Repeat()
        for _ in range(total // len(chunk)):
            member.write(chunk)


def tree_snapshot(path: Path) -> dict[str, tuple]:
    """Every entry under ``path`` (not following links): kind, size, mtime, content hash."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = sha256_of(p) if stat.S_ISREG(st.st_mode) else None
            snap[os.path.relpath(p, path)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return snap


def find_named(where: Path, token: str) -> list[str]:
    hits = []
    for dirpath, dirnames, filenames in os.walk(where):
        hits += [os.path.join(dirpath, n) for n in dirnames + filenames if token in n]
    return hits



class PeakGrowth:
    """How far this process's RSS rose above its RSS at entry (sampled)."""

    def __enter__(self):
        self.before = psutil.Process().memory_info().rss
        self._sampler = RssSampler().__enter__()
        return self

    def __exit__(self, *exc):
        self._sampler.__exit__(*exc)
        self.growth = max(0, self._sampler.peak - self.before)
        return False


def odd_warnings(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ckptmgr" and r.levelno == logging.WARNING and name in r.getMessage()]


# -- fixtures -------------------------------------------------------------------------


@dataclass
class Saved:
    directory: Path
    weights: dict[int, list]
    model: object


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    """Steps 10, 20, 30 of a tiny compiled model, each with distinct weights."""
    directory = tmp_path_factory.mktemp("hostile") / "template"
    model = tiny_model()
    manager = CheckpointManager(directory)
    weights = {}
    for step in STEPS:
        model.set_weights([w + step for w in model.get_weights()])
        weights[step] = model.get_weights()
        manager.save(step, model, metrics={"loss": 1.0 / step})
    manager.close()
    return Saved(directory, weights, model)


@pytest.fixture
def root(saved, tmp_path) -> Path:
    """A private copy of the saved directory, inside ``tmp_path/ckpts``."""
    target = tmp_path / "ckpts"
    shutil.copytree(saved.directory, target, symlinks=True)
    return target


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory next to the root holding files nothing may touch."""
    where = tmp_path / "outside"
    where.mkdir()
    (where / "precious.txt").write_bytes(b"do not touch\n")
    (where / "ckpt-000000001-000000000000.keras.0123.part").write_bytes(b"not ours\n")
    old = time.time() - 10 * 86400
    for p in where.iterdir():
        os.utime(p, (old, old))
    return where


def archive_of(root: Path, step: int) -> Path:
    return root / manifest_body(root, step)["archive"]


def assert_weights(model, expected) -> None:
    for got, want in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want)


# -- 1. manifests that are a symlink to /dev/zero, a FIFO, a link out of the root ------


def test_manifest_symlink_and_fifo_are_ignored_by_the_cli(root, outside):
    (root / manifest_name(40)).symlink_to("/dev/zero")
    os.mkfifo(root / manifest_name(50))
    # A perfectly valid manifest outside the root, linked in: following it would list step 70.
    body = manifest_body(root, 30)
    body["step"] = 70
    body["archive"] = archive_name(70, body["attempt"])
    body["files"] = {body["archive"]: next(iter(body["files"].values()))}
    (outside / "m70.json").write_bytes(seal(body))
    (root / manifest_name(70)).symlink_to(outside / "m70.json")
    odd = [manifest_name(40), manifest_name(50), manifest_name(70)]
    before_outside = tree_snapshot(outside)

    listing = cli("list", root, "--json")
    assert_sane(listing)
    assert listing.returncode == 0, listing.describe()
    assert [r["step"] for r in json.loads(listing.stdout)] == list(STEPS)
    for name in odd:  # reported, once each
        assert sum(name in line for line in listing.stderr.splitlines()) == 1, listing.describe()

    table = cli("list", root)
    assert_sane(table)
    assert table.returncode == 0 and " 30 " in table.stdout, table.describe()

    verify = cli("verify", root)
    assert_sane(verify)
    assert verify.returncode == 0, verify.describe()
    assert verify.stdout.splitlines() == [f"ok step {s}" for s in STEPS], verify.describe()

    inspect = cli("inspect", root)
    assert_sane(inspect)
    assert inspect.returncode == 0, inspect.describe()
    assert "checkpoint   step 30" in inspect.stdout

    for step in (40, 50, 70):  # asked for by number: one clean line, no hang
        result = cli("inspect", root, "--step", step)
        line = assert_one_error(result)
        assert f"step {step}" in line, result.describe()
        result = cli("verify", root, "--step", step)
        assert_sane(result)
        assert result.returncode == 1, result.describe()
        bad = [line for line in result.stdout.splitlines() if line.startswith("bad ")]
        assert len(bad) == 1 and f"step {step}" in bad[0], result.describe()

    prune = cli("prune", root, "--keep-last", "1")
    assert_sane(prune)
    assert prune.returncode == 0, prune.describe()
    assert "kept 1, deleted 2" in prune.stdout, prune.describe()

    after = cli("verify", root)
    assert_sane(after)
    assert after.returncode == 0 and after.stdout.splitlines() == ["ok step 30"], after.describe()
    # The odd entries are ignored, not removed or followed.
    assert (root / manifest_name(40)).is_symlink()
    assert stat.S_ISFIFO(os.lstat(root / manifest_name(50)).st_mode)
    assert (root / manifest_name(70)).is_symlink()
    assert tree_snapshot(outside) == before_outside
    assert [r.ok for r in CheckpointManager(root).verify()] == [True]


# -- 1b (extra). regular manifest files with hostile content --------------------------------


@pytest.mark.parametrize("content", ["sparse-4GiB", "nested-200k"])
def test_huge_or_deeply_nested_manifest_is_one_bad_line(root, saved, content):
    """Extra: a regular file under a manifest name holding a sparse 4 GiB of zeros, or a
    200 000-deep JSON array (200 KB, under the 1 MiB read bound)."""
    if content == "sparse-4GiB":
        with open(root / manifest_name(40), "wb") as f:
            f.truncate(4 << 30)
    else:
        (root / manifest_name(40)).write_text("[" * 200_000)

    listing = cli("list", root, "--json")
    assert_sane(listing)
    assert listing.returncode == 0, listing.describe()
    assert [r["step"] for r in json.loads(listing.stdout)] == list(STEPS)

    verify = cli("verify", root)
    assert_sane(verify)
    assert verify.returncode == 1, verify.describe()
    lines = verify.stdout.splitlines()
    assert [line for line in lines if line.startswith("ok ")] == [f"ok step {s}" for s in STEPS], verify.describe()
    bad = [line for line in lines if line.startswith("bad ")]
    assert len(bad) == 1 and "step 40" in bad[0], verify.describe()

    line = assert_one_error(cli("inspect", root, "--step", "40"))
    assert "step 40" in line

    prune = cli("prune", root, "--keep-last", "1")
    assert_sane(prune)
    assert prune.returncode == 0, prune.describe()

    mgr = CheckpointManager(root)
    with PeakGrowth() as mem:
        assert [m.step for m in mgr.manifests()] == [30]
        results = {r.step: r for r in mgr.verify()}
        assert results[30].ok and not results[40].ok
        assert_weights(mgr.load(), saved.weights[30])
    assert mem.growth < MEMORY_BOUND, f"grew {mem.growth / 2**20:.0f} MiB"


def test_deeply_nested_config_json_is_one_error_line_in_inspect(root, tmp_path):
    """Extra: an archive whose config.json is a 200 000-deep JSON array (checksums valid)."""
    content = members(archive_of(root, 30))
    content["config.json"] = b"[" * 200_000
    write_stored_zip(archive_of(root, 30), content)
    reseal_for_archive(root, 30)
    result = cli("inspect", root, "--step", "30")
    line = assert_one_error(result)
    assert "step 30" in line or "config.json" in line, result.describe()


def test_deeply_nested_lease_file_does_not_crash_save(root, saved):
    """Extra: a lease file (regular, canonical name) holding a 200 000-deep JSON array."""
    (root / ".lease" / "lease-000000009.json").write_text("[" * 200_000)
    mgr = CheckpointManager(root, keep_last=2, sweep_grace_s=0)
    try:
        mgr.save(40, saved.model)
    except CkptmgrError as exc:  # refusing is acceptable; crashing with another error is not
        assert "\n" not in str(exc), exc
    else:
        assert mgr.steps()[-1] == 40 and mgr.verify(40)[0].ok


# -- 2. archives that are a symlink or a FIFO, named by a hand-made manifest ----------------


def test_archive_symlink_or_fifo_is_not_ok_and_restore_falls_back(root, outside, saved):
    real30 = archive_of(root, 30)
    entry30 = file_entry(real30)
    name40 = hand_made_manifest(root, 40, like=30)
    (root / name40).symlink_to("/dev/zero")
    shutil.copyfile(real30, outside / "copy-of-30.keras")  # same bytes, sha256 matches the manifest
    name50 = hand_made_manifest(root, 50, like=30, entry=entry30)
    (root / name50).symlink_to(outside / "copy-of-30.keras")
    name60 = hand_made_manifest(root, 60, like=30)
    os.mkfifo(root / name60)
    before_outside = tree_snapshot(outside)

    mgr = CheckpointManager(root)
    results = {r.step: r for r in mgr.verify()}
    assert sorted(results) == [10, 20, 30, 40, 50, 60]
    assert all(results[s].ok for s in STEPS)
    for step, name in ((40, name40), (50, name50), (60, name60)):
        r = results[step]
        assert not r.ok, r
        assert "\n" not in r.problem and r.problem.startswith(f"step {step}"), r
        assert name in r.problem, r

    verify = cli("verify", root)
    assert_sane(verify)
    assert verify.returncode == 1, verify.describe()
    lines = verify.stdout.splitlines()
    assert [line for line in lines if line.startswith("ok ")] == [f"ok step {s}" for s in STEPS]
    bad = [line for line in lines if line.startswith("bad ")]
    assert len(bad) == 3 and len(lines) == 6, verify.describe()

    for step in (40, 50, 60):
        assert_one_error(cli("inspect", root, "--step", step))

    model = tiny_model()
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    restored = mgr.restore(model)
    assert restored.step == 30
    assert_weights(model, saved.weights[30])
    assert_weights(mgr.load(), saved.weights[30])
    for step in (40, 50, 60):
        model.set_weights([np.zeros_like(w) for w in model.get_weights()])
        with pytest.raises(CorruptCheckpointError) as info:
            mgr.restore(model, step=step)
        assert "\n" not in str(info.value)
        assert all(not w.any() for w in model.get_weights())  # untouched
    with pytest.raises(CorruptCheckpointError):
        mgr.export_keras(str(outside / "exported.keras"), step=50)
    assert not (outside / "exported.keras").exists()
    assert tree_snapshot(outside) == before_outside


# -- 3. zip bombs -----------------------------------------------------------------------


@pytest.mark.parametrize("bomb", ["config.json", "assets/blob"])
def test_zip_bomb_is_refused_with_bounded_memory(root, saved, tmp_path, bomb):
    token = uuid.uuid4().hex[:10]
    bomb_name = bomb if bomb == "config.json" else f"{bomb}-{token}.bin"
    target = archive_of(root, 30)
    content = members(target)
    built = tmp_path / "bomb.keras"
    with zipfile.ZipFile(built, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in content.items():
            if name == bomb_name:
                continue
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            zf.writestr(info, data)
        write_bomb_member(zf, bomb_name)
    # It really is a bomb: a few MB that declare (and inflate to) 2 GiB of spaces.
    assert built.stat().st_size < 8 << 20
    with zipfile.ZipFile(built) as zf:
        info = zf.getinfo(bomb_name)
        assert info.file_size == BOMB_BYTES and info.compress_type == zipfile.ZIP_DEFLATED
        with zf.open(info) as member:
            assert member.read(1 << 20) == b" " * (1 << 20)
    shutil.copyfile(built, target)  # in place of step 30's archive
    reseal_for_archive(root, 30)

    verify = cli("verify", root)
    assert_sane(verify)
    assert verify.returncode == 1, verify.describe()
    lines = verify.stdout.splitlines()
    assert lines[:2] == ["ok step 10", "ok step 20"] and len(lines) == 3, verify.describe()
    assert lines[2].startswith("bad step 30") and bomb_name in lines[2], verify.describe()

    inspect = cli("inspect", root)
    line = assert_one_error(inspect)
    assert "step 30" in line, inspect.describe()
    assert cli("inspect", root, "--step", "20").returncode == 0

    mgr = CheckpointManager(root)
    with PeakGrowth() as mem:
        r = mgr.verify(30)[0]
        assert not r.ok and "\n" not in r.problem
        with pytest.raises(CorruptCheckpointError) as info:
            mgr.load(step=30)
        assert "\n" not in str(info.value)
        model = mgr.load()  # falls back
        with pytest.raises(CorruptCheckpointError):
            mgr.export_keras(str(tmp_path / "out.keras"), step=30)
    assert mem.growth < MEMORY_BOUND, f"grew {mem.growth / 2**20:.0f} MiB"
    assert_weights(model, saved.weights[20])
    assert not (tmp_path / "out.keras").exists()
    assert find_named(Path(tempfile.gettempdir()), token) == []


# -- 4. archives with extra members -----------------------------------------------------


def test_extra_members_are_refused_and_never_extracted(root, saved, tmp_path):
    token = uuid.uuid4().hex[:10]
    evil = {
        40: f"evil-{token}.sh",
        50: f"../evil-{token}-up.sh",
        60: f"assets/../../evil-{token}-assets.sh",
        70: f"/tmp/evil-{token}-abs.sh",
    }
    content = members(archive_of(root, 30))
    for step, member in evil.items():
        built = tmp_path / f"built-{step}.keras"
        write_stored_zip(built, {**content, member: b"#!/bin/sh\necho pwned\n"})
        with zipfile.ZipFile(built) as zf:
            assert member in zf.namelist()
        name = hand_made_manifest(root, step, like=30, entry=file_entry(built))
        shutil.copyfile(built, root / name)
    tmp_before = set(find_named(Path(tempfile.gettempdir()), token))

    mgr = CheckpointManager(root)
    results = {r.step: r for r in mgr.verify()}
    assert all(results[s].ok for s in STEPS)
    for step, member in evil.items():
        r = results[step]
        assert not r.ok and "\n" not in r.problem, r
        assert "unexpected member" in r.problem, r

    for step in evil:
        with pytest.raises(CorruptCheckpointError):
            mgr.load(step=step)
        assert_one_error(cli("inspect", root, "--step", step))
    assert_weights(mgr.load(), saved.weights[30])
    model = tiny_model()
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    assert mgr.restore(model).step == 30
    assert_weights(model, saved.weights[30])
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    with pytest.raises(CorruptCheckpointError):
        mgr.restore(model, step=40)
    assert all(not w.any() for w in model.get_weights())

    assert set(find_named(Path(tempfile.gettempdir()), token)) == tmp_before  # only our tmp_path copies
    assert not any(token in n for n in os.listdir(root) + os.listdir(root.parent))
    assert not os.path.lexists(f"/tmp/evil-{token}-abs.sh")


# -- 5. stray names, directories, old manifests: ignored, retention still holds ------------


def test_odd_root_entries_are_ignored_and_keep_last_holds(root, outside, saved, caplog):
    caplog.set_level(logging.WARNING, logger="ckptmgr")
    stray = root / "ckpt-0000000003.json"  # ten digits: not step 3
    stray.write_bytes((root / manifest_name(10)).read_bytes())
    as_dir = root / manifest_name(9)
    as_dir.mkdir()
    (as_dir / "inside.txt").write_bytes(b"keep\n")
    (root / ".tmp" / "subdir").mkdir(parents=True, exist_ok=True)
    (root / ".tmp" / "subdir" / "f.part").write_bytes(b"keep\n")
    old = time.time() - 10 * 86400
    for p in (stray, as_dir, as_dir / "inside.txt", root / ".tmp" / "subdir", root / ".tmp" / "subdir" / "f.part"):
        os.utime(p, (old, old))

    # Step 20: a schema-2 manifest whose `created` is naive (checksum kept valid).
    body = manifest_body(root, 20)
    body["created"] = body["created"].replace("+00:00", "").replace("Z", "")
    assert "+" not in body["created"]
    (root / manifest_name(20)).write_bytes(seal_verbatim(body))
    # Step 10: a schema-1 manifest: no checksum, naive timestamp, a null metric, old archive name.
    body = manifest_body(root, 10)
    old_name = archive_name(10)
    os.rename(root / body["archive"], root / old_name)
    entry = body["files"][body["archive"]]
    body.update(schema_version=1, archive=old_name, files={old_name: entry},
                created=body["created"].replace("+00:00", ""), metrics={"loss": None})
    body.pop("attempt"), body.pop("writer")
    (root / manifest_name(10)).write_text(json.dumps(body, indent=2))
    before_outside = tree_snapshot(outside)

    mgr = CheckpointManager(root, keep_last=2, sweep_grace_s=0)
    assert mgr.steps() == list(STEPS)
    m10, m20 = mgr.manifest(10), mgr.manifest(20)
    assert m10.schema_version == 1 and math.isnan(m10.metrics["loss"])
    assert m10.created.utcoffset() is not None and m20.created.utcoffset() is not None
    assert [r.ok for r in mgr.verify()] == [True, True, True]

    assert listed_steps(root) == list(STEPS)
    dry = cli("prune", root, "--keep-within", "7d", "--dry-run")
    assert_sane(dry)
    assert dry.returncode == 0, dry.describe()
    assert "delete 0; nothing deleted" in dry.stdout and "would delete step" not in dry.stdout, dry.describe()

    for step in (40, 50, 60):
        mgr.save(step, saved.model, metrics={"loss": 1.0 / step})
        assert mgr.steps()[-1] == step
    assert mgr.steps() == [50, 60]
    mgr.prune()
    mgr.sweep(0)
    assert mgr.steps() == [50, 60]
    assert listed_steps(root) == [50, 60]
    assert [r.ok for r in mgr.verify()] == [True, True]
    prune = cli("prune", root, "--keep-last", "2", "--sweep-grace", "0")
    assert_sane(prune)
    assert prune.returncode == 0, prune.describe()

    archives = sorted(p.name for p in root.iterdir() if p.name.endswith(".keras"))
    assert [a[:14] for a in archives] == ["ckpt-000000050", "ckpt-000000060"], archives
    # Ignored, untouched.
    assert stray.read_bytes() == (saved.directory / manifest_name(10)).read_bytes()
    assert (as_dir / "inside.txt").read_bytes() == b"keep\n"
    assert (root / ".tmp" / "subdir" / "f.part").read_bytes() == b"keep\n"
    assert tree_snapshot(outside) == before_outside
    for name in ("ckpt-0000000003.json", manifest_name(9), "subdir"):
        assert len(odd_warnings(caplog, name)) == 1, (name, caplog.text)


# -- 6. .tmp (and .lease) as a symlink out of the root ---------------------------------------


def test_tmp_symlink_is_never_written_through_or_swept(root, outside, saved):
    shutil.rmtree(root / ".tmp")
    (root / ".tmp").symlink_to(outside, target_is_directory=True)
    before = tree_snapshot(outside)
    before_mtime = os.stat(outside).st_mtime_ns

    mgr = CheckpointManager(root, keep_last=1, sweep_grace_s=0)
    assert mgr.leftovers(0) == []
    mgr.sweep(0)
    prune = cli("prune", root, "--keep-last", "2", "--sweep-grace", "0")
    assert_sane(prune)
    assert prune.returncode == 0, prune.describe()
    assert tree_snapshot(outside) == before

    outcome = "saved"
    try:
        mgr.save(40, saved.model)
    except CkptmgrError as exc:
        outcome = f"refused: {type(exc).__name__}: {exc}"
        assert "\n" not in str(exc) and ".tmp" in str(exc), exc
    print(f"save with .tmp -> symlink: {outcome}")
    if outcome == "saved":
        assert mgr.steps()[-1] == 40 and mgr.verify(40)[0].ok
    mgr.prune()
    mgr.sweep(0)
    assert tree_snapshot(outside) == before
    assert os.stat(outside).st_mtime_ns == before_mtime, "something was created and removed in the linked directory"
    assert (root / ".tmp").is_symlink()


def test_lease_symlink_is_never_written_through(root, tmp_path, saved):
    """Extra (not in the brief's list): `.lease/` is as much ours as `.tmp/`."""
    elsewhere = tmp_path / "elsewhere-leases"
    elsewhere.mkdir()
    for token in (1, 2, 3):  # lease-like files someone else owns
        (elsewhere / f"lease-{token:09d}.json").write_text(json.dumps({"token": token, "owner": "x:1", "acquired": "2024-01-01T00:00:00+00:00"}))
    shutil.rmtree(root / ".lease")
    (root / ".lease").symlink_to(elsewhere, target_is_directory=True)
    before = tree_snapshot(elsewhere)
    before_mtime = os.stat(elsewhere).st_mtime_ns

    mgr = CheckpointManager(root, keep_last=2, sweep_grace_s=0)
    try:
        mgr.save(40, saved.model)
    except CkptmgrError as exc:
        assert "\n" not in str(exc), exc
    after = tree_snapshot(elsewhere)
    assert after == before, (
        f"wrote or deleted through the .lease symlink: created {sorted(set(after) - set(before))}, "
        f"deleted {sorted(set(before) - set(after))}"
    )
    assert os.stat(elsewhere).st_mtime_ns == before_mtime


# -- 7. export safety ---------------------------------------------------------------------


def test_export_into_the_checkpoint_directory_is_refused(root, outside):
    committed = archive_of(root, 20)
    digest, inode = sha256_of(committed), committed.stat().st_ino
    (outside / "link-to-root").symlink_to(root, target_is_directory=True)
    (outside / "alias.keras").symlink_to(committed)
    destinations = [
        committed,
        root / "new-name.keras",
        root / ".." / root.name / committed.name,
        outside / "link-to-root" / committed.name,
        outside / "alias.keras",
    ]
    for dest in destinations:
        for extra in ((), ("--overwrite",)):
            result = cli("export", root, "-f", "keras", "--step", "10", "-o", dest, *extra)
            assert_one_error(result)
            assert sha256_of(committed) == digest and committed.stat().st_ino == inode, result.describe()
    with pytest.raises(ConfigError):
        CheckpointManager(root).export_keras(str(committed), step=10, overwrite=True)
    assert sha256_of(committed) == digest
    assert not (root / "new-name.keras").exists()
    assert (outside / "alias.keras").is_symlink()
    assert not [p for p in root.rglob("*.part")]
    assert CheckpointManager(root).verify(20)[0].ok


def test_export_overwrite_and_failed_exports_leave_no_part_file(root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "existing.keras"
    existing.write_bytes(b"old")
    refused = cli("export", root, "-f", "keras", "--step", "20", "-o", existing)
    assert_one_error(refused)
    assert existing.read_bytes() == b"old"
    done = cli("export", root, "-f", "keras", "--step", "20", "-o", existing, "--overwrite")
    assert_sane(done)
    assert done.returncode == 0, done.describe()
    assert existing.read_bytes() == archive_of(root, 20).read_bytes()

    (out / "afile").write_bytes(b"a file, not a directory")
    (out / "adir").mkdir()
    (out / "adir" / "keep.txt").write_bytes(b"keep")
    failing = [
        ("keras", out / "afile" / "x.keras", ()),
        ("weights", out / "afile" / "x.weights.h5", ()),
        ("keras", out / "adir", ("--overwrite",)),
    ]
    for fmt, dest, extra in failing:
        result = cli("export", root, "-f", fmt, "-o", dest, *extra)
        assert_one_error(result)
        leftovers = [p for p in out.rglob("*") if ".part" in p.name]
        assert leftovers == [], (leftovers, result.describe())
    assert (out / "afile").read_bytes() == b"a file, not a directory"
    assert (out / "adir" / "keep.txt").read_bytes() == b"keep"
    assert sorted(p.name for p in out.iterdir()) == ["adir", "afile", "existing.keras"]


# -- 8. bad CLI values: one line, no traceback ------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("prune", "{root}", "--keep-within", "99999999999999999999d"),
        ("prune", "{root}", "--keep-last", "1", "--sweep-grace", "-1"),
        ("prune", "{root}", "--keep-last", "1", "--sweep-grace", "nan"),
        ("list", "gs:/bucket/run"),
    ],
    ids=["keep-within-huge", "sweep-grace-negative", "sweep-grace-nan", "gs-one-slash"],
)
def test_bad_cli_values_are_one_error_line(root, tmp_path, args):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = tree_snapshot(root)
    result = cli(*(a.format(root=root) for a in args), cwd=cwd)
    assert_sane(result)
    assert result.returncode != 0, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.describe()
    assert result.stdout == "", result.describe()
    assert tree_snapshot(root) == before  # nothing pruned
    assert os.listdir(cwd) == []  # in particular no local directory named gs:
    if args[0] == "list":
        assert "gs://bucket/run" in lines[0], result.describe()
