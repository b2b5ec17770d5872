"""Assets and bfloat16 variables beyond the parity cases (issue 9, item 6).

Assets are captured on every save (a vocabulary can change without any
variable changing), cost nothing for models without them, travel in the
snapshot (pickled, digested) to a writer that has no TensorFlow, and are
extracted only inside a temporary directory on restore.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import io  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.coordinator import snapshot_digest, with_shards  # noqa: E402
from ckptmgr.errors import CorruptCheckpointError  # noqa: E402
from ckptmgr.io.archive import ModelSnapshot, RowShards, VarGroup, extract_assets  # noqa: E402
from ckptmgr.state import StatePlan  # noqa: E402

FIRST = np.array(["red", "green", "blue", "red"])
SECOND = np.array(["cyan", "magenta", "yellow", "black", "cyan"])
VOCAB = "assets/layers/string_lookup/vocabulary.txt"


def lookup_model(adapt_with=FIRST):
    """StringLookup (vocabulary: an asset) and a bfloat16 Dense; trained two
    steps when adapted."""
    lookup = keras.layers.StringLookup()
    if adapt_with is not None:
        lookup.adapt(adapt_with)
    inputs = keras.Input((1,), dtype="string")
    h = keras.layers.Flatten()(keras.layers.Embedding(8, 3)(lookup(inputs)))
    outputs = keras.layers.Dense(2, dtype="bfloat16")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    if adapt_with is not None:
        x = tf.constant(np.array(["red", "blue", "cyan", "green"]).reshape(-1, 1))
        model.fit(x, np.ones((4, 2), "float32"), batch_size=2, verbose=0)
    return model


def vocabulary(model) -> list[str]:
    return model.layers[1].get_vocabulary()


def archive_vocabulary(path) -> str:
    with zipfile.ZipFile(path) as zf:
        return zf.read(VOCAB).decode()


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(3)


def test_a_readapted_vocabulary_is_captured_by_the_next_save(tmp_path):
    model = lookup_model()
    first = vocabulary(model)
    plan = StatePlan(model)
    before = plan.capture().assets
    model.layers[1].adapt(SECOND)  # no variable changes: the same plan stays valid
    second = vocabulary(model)
    assert plan.is_current(model) and first != second
    after = plan.capture().assets
    key = VOCAB[len("assets/"):]
    assert before[key].decode().split("\n") == first
    assert after[key].decode().split("\n") == second

    mgr = CheckpointManager(tmp_path / "ck")
    model.layers[1].adapt(FIRST)
    mgr.save(1, model)
    model.layers[1].adapt(SECOND)
    mgr.save(2, model)
    assert archive_vocabulary(mgr.local_archive_path(1)).split("\n") == first
    assert archive_vocabulary(mgr.local_archive_path(2)).split("\n") == second
    for step, expected in ((1, first), (2, second)):
        fresh = lookup_model(adapt_with=None)
        assert vocabulary(fresh) == ["[UNK]"]
        mgr.restore(fresh, step=step)
        assert vocabulary(fresh) == expected
    mgr.close()


def test_a_model_without_assets_captures_without_touching_disk(monkeypatch):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    plan = StatePlan(model)
    assert plan.assets.owners == []

    def no_disk(*args, **kwargs):
        raise AssertionError("an asset round trip for a model without assets")

    import ckptmgr.assets

    monkeypatch.setattr(ckptmgr.assets.tempfile, "TemporaryDirectory", no_disk)
    monkeypatch.setattr(ckptmgr.assets.tempfile, "mkdtemp", no_disk)
    assert plan.capture().assets == {}


def test_only_layers_with_save_assets_are_planned():
    model = lookup_model()
    plan = StatePlan(model)
    assert [path for path, _ in plan.assets.owners] == ["layers/string_lookup"]
    assert plan.assets.owners[0][1] is model.layers[1]


def test_the_snapshot_travels_pickled_and_is_written_without_tensorflow(tmp_path):
    """What the coordinator does: unpickle a worker's snapshot (bfloat16 arrays,
    asset bytes) and write the archive, with no TensorFlow or Keras imported."""
    model = lookup_model()
    snapshot = StatePlan(model).capture(reuse_buffers=False)
    assert any(a.dtype.name == "bfloat16" for g in snapshot.groups for _, a in g.arrays)
    (tmp_path / "snap.pkl").write_bytes(pickle.dumps(snapshot))
    code = (
        "import pickle, sys\n"
        "from ckptmgr.manager import CheckpointManager\n"
        f"snapshot = pickle.loads(open({str(tmp_path / 'snap.pkl')!r}, 'rb').read())\n"
        f"CheckpointManager({str(tmp_path / 'ck')!r}).write_snapshot(4, snapshot)\n"
        "sys.exit(int('tensorflow' in sys.modules or 'keras' in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    mgr = CheckpointManager(tmp_path / "ck")
    loaded = keras.saving.load_model(mgr.local_archive_path(4))
    assert vocabulary(loaded) == vocabulary(model)
    fresh = lookup_model(adapt_with=None)
    mgr.restore(fresh)
    assert vocabulary(fresh) == vocabulary(model)
    for other in (loaded, fresh):
        for a, b in zip(other.weights + other.optimizer.variables, model.weights + model.optimizer.variables):
            assert (a.dtype, np.asarray(a).tobytes()) == (b.dtype, np.asarray(b).tobytes())
    mgr.close()


def test_the_replica_digest_covers_assets_and_shards_keep_them():
    arrays = [("0", np.arange(6, dtype="float32"))]
    one = ModelSnapshot("{}", "{}", [VarGroup("layers/dense/vars", {}, arrays)], {"a/vocabulary.txt": b"x\ny"})
    other = ModelSnapshot("{}", "{}", [VarGroup("layers/dense/vars", {}, arrays)], {"a/vocabulary.txt": b"x\nz"})
    none = ModelSnapshot("{}", "{}", [VarGroup("layers/dense/vars", {}, arrays)])
    assert len({snapshot_digest(one), snapshot_digest(other), snapshot_digest(none)}) == 3
    gathered = with_shards(one, {"layers/dense/vars/0": RowShards([arrays[0][1][:3], arrays[0][1][3:]])})
    assert gathered.assets == one.assets


def _zip(members: dict[str, bytes]) -> io.BytesIO:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    out.seek(0)
    return out


def test_extracting_assets_stays_inside_the_directory(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    good = _zip({"config.json": b"{}", "assets/layers/x/vocabulary.txt": b"a\nb", "assets/root.txt": b"r"})
    assert extract_assets(good, str(dest)) == 2
    assert (dest / "layers" / "x" / "vocabulary.txt").read_bytes() == b"a\nb"
    assert (dest / "root.txt").read_bytes() == b"r"
    for name in ("assets/../evil.txt", "assets/a/../../evil.txt", "assets//evil.txt", "assets/a\\..\\evil.txt"):
        inner = tmp_path / f"inner-{abs(hash(name))}"
        inner.mkdir()
        with pytest.raises(CorruptCheckpointError) as info:
            extract_assets(_zip({name: b"pwned"}), str(inner))
        assert "\n" not in str(info.value)
        assert list(inner.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_exports_of_a_checkpoint_with_assets(tmp_path):
    model = lookup_model()
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(1, model)
    copy = tmp_path / "out" / "copy.keras"
    mgr.export_keras(str(copy))
    assert archive_vocabulary(copy) == archive_vocabulary(mgr.local_archive_path(1))
    assert vocabulary(keras.saving.load_model(copy)) == vocabulary(model)
    for include_optimizer in (True, False):
        out = tmp_path / "out" / f"{include_optimizer}.weights.h5"
        mgr.export_weights(str(out), include_optimizer=include_optimizer)
        fresh = lookup_model(adapt_with=None)
        fresh.load_weights(out)  # weights files carry no assets, as with save_weights
        for a, b in zip(fresh.weights, model.weights):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    mgr.export_saved_model(str(tmp_path / "out" / "served"))
    served = tf.saved_model.load(str(tmp_path / "out" / "served"))
    x = tf.constant(np.array(["red", "blue", "cyan", "unseen"]).reshape(-1, 1))
    np.testing.assert_array_equal(np.asarray(served.serve(x)), np.asarray(model(x)))  # the vocabulary too
    mgr.close()
