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
    module = exc.name.split(".")[0]
    return _needs(module) if module in EXTRAS else None


def _needs(module: str) -> str:
    what, install = EXTRAS[module]
    return f"this needs {what}, which is not installed: {install}"


# URL scheme -> the module its fsspec filesystem needs
SCHEMES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs"}


def missing_for_url(url: str) -> str | None:
    """One line naming the extra a URL's filesystem needs, when its module is
    not installed (fsspec then raises a plain ImportError); else None."""
    import importlib

    module = SCHEMES.get(url.split("://", 1)[0].lower()) if "://" in url else None
    if module is None:
        return None
    try:
        importlib.import_module(module)  # only on an error path: the cost does not matter
    except ImportError:
        return _needs(module)
    return None
