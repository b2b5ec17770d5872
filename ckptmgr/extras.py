"""Which install extra provides a missing module, for one-line CLI errors.

``pip install ckptmgr`` (no extras) has no TensorFlow, Ray, gcsfs or s3fs: a
command that needs one fails with ``ModuleNotFoundError`` deep inside. The CLI
turns that into one line naming the extra to install (see README,
"Installing").
"""

from __future__ import annotations

# top-level module -> (what needs it, the extras that provide it)
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorflow": ("TensorFlow (Keras's backend for training, restore and SavedModel export)",
                   "pip install 'ckptmgr[tensorflow]' (GPU) or 'ckptmgr[tensorflow-cpu]'"),
    "ray": ("Ray (ckptmgr run/resume and the coordinator)", "pip install 'ckptmgr[ray]'"),
    "gcsfs": ("gcsfs (gs:// directories)", "pip install 'ckptmgr[gcs]'"),
    "s3fs": ("s3fs (s3:// directories)", "pip install 'ckptmgr[s3]'"),
}


def missing_extra(exc: BaseException) -> str | None:
    """One line naming the extra that provides the module ``exc`` did not
    find, or None when it is not one an extra provides."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    entry = EXTRAS.get(exc.name.split(".")[0])
    if entry is None:
        return None
    what, install = entry
    return f"this needs {what}, which is not installed: {install}"
