"""User code for the commands that build a model from a checkpoint.

The CLI's ``--import MODULE`` and ``--custom-object NAME=MODULE:ATTR`` (and a
job config's ``user_code:`` section) name the Python code a checkpoint needs:
importing a module runs its ``@keras.saving.register_keras_serializable``
decorators; a custom object is handed to ``keras.saving.load_model`` as
``custom_objects={NAME: MODULE.ATTR}``. Modules are looked up on ``sys.path``
(PYTHONPATH included), to which the current directory is appended: a console
script does not have it, ``python -m`` does.

Runs wherever a model is built: the CLI, and each worker of a job. Every
problem is one :class:`~ckptmgr.errors.ConfigError` line that names the spec
and says what to do.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ckptmgr.errors import ConfigError

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

CUSTOM_OBJECT_EXAMPLE = "CustomModel=mymodels:CustomModel"


def parse_custom_object(spec: str) -> tuple[str, str, str]:
    """``"NAME=MODULE:ATTR"`` as ``(NAME, MODULE, ATTR)``; ATTR may be dotted."""
    name, sep, target = spec.partition("=")
    module, colon, attr = target.partition(":")
    name = name.strip()
    if not sep or not name or not colon or not _DOTTED.match(module) or not _DOTTED.match(attr):
        raise ConfigError(
            f"Invalid custom object: Received: {spec!r}. Use NAME=MODULE:ATTR, e.g. "
            f"{CUSTOM_OBJECT_EXAMPLE} (NAME as the checkpoint's config names the class; "
            "MODULE importable from the current directory or PYTHONPATH)."
        )
    return name, module, attr


def check_module_name(module: str) -> str:
    """``module`` if it is a dotted module name; a file path gets a hint."""
    if module.endswith(".py") or os.sep in module or "/" in module:
        stem = os.path.splitext(os.path.basename(module))[0]
        directory = os.path.dirname(module) or "."
        raise ConfigError(
            f"Invalid module: Received: {module!r}, a file path. Pass a module name: "
            f"{stem!r}, with {directory!r} as the current directory or on PYTHONPATH "
            f"(e.g. PYTHONPATH={directory} ckptmgr ... --import {stem})."
        )
    if not _DOTTED.match(module):
        raise ConfigError(f"Invalid module: Received: {module!r}. Pass a module name such as mymodels or pkg.layers.")
    return module


@dataclass(frozen=True)
class UserCode:
    """Modules to import and custom objects to pass to Keras.

    ``imports``: module names. ``custom_objects``: ``"NAME=MODULE:ATTR"`` specs.
    Both are checked for syntax here; :meth:`load` imports.
    """

    imports: tuple[str, ...] = ()
    custom_objects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for module in self.imports:
            check_module_name(module)
        for spec in self.custom_objects:
            parse_custom_object(spec)

    @classmethod
    def of(cls, imports: Iterable[str] | None = None, custom_objects: Iterable[str] | None = None) -> UserCode:
        return cls(tuple(imports or ()), tuple(custom_objects or ()))

    def __bool__(self) -> bool:
        return bool(self.imports or self.custom_objects)

    def check_findable(self) -> None:
        """Fail now, without importing anything heavy, if a module cannot be found."""
        _current_directory_on_path()
        labels = [(m, f"import {m!r}") for m in self.imports]
        labels += [(parse_custom_object(spec)[1], f"custom object {spec!r}") for spec in self.custom_objects]
        for module, label in labels:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            except Exception:  # noqa: BLE001 - a parent package fails: import_module says how
                found = True
            if not found:
                raise _not_found(label, module)

    def load(self) -> dict[str, Any]:
        """Import every module; return ``{NAME: object}`` for ``custom_objects=``."""
        for module in self.imports:
            import_module(module, f"import {module!r}")
        objects: dict[str, Any] = {}
        for spec in self.custom_objects:
            name, module, attr = parse_custom_object(spec)
            label = f"custom object {spec!r}"
            objects[name] = resolve(import_module(module, label), module, attr, label)
        return objects


def import_module(module: str, label: str):
    """Import ``module`` for ``label``; failures are one ConfigError line."""
    _current_directory_on_path()
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            raise _not_found(label, missing) from None
        raise ConfigError(
            f"{label}: importing {module!r} failed: it imports {missing!r}, which is not "
            "installed. Install it in this environment."
        ) from exc
    except (Exception, SystemExit) as exc:
        text = str(exc).strip().splitlines()
        raise ConfigError(
            f"{label}: importing {module!r} failed: {type(exc).__name__}: "
            f"{text[0] if text else ''}. Fix the module; `ckptmgr --debug ...` shows the traceback."
        ) from exc


def _not_found(label: str, module: str) -> ConfigError:
    return ConfigError(
        f"{label}: no module named {module!r} in the current directory or on PYTHONPATH. "
        "Run ckptmgr in the directory that holds it, or add that directory to PYTHONPATH."
    )


def resolve(module_obj, module: str, attr: str, label: str) -> Any:
    """``module.attr`` (dotted ``attr`` walks attributes)."""
    obj = module_obj
    for depth, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = ".".join([module, *attr.split(".")[:depth]])
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
            hint = f"Did you mean {close[0]!r}?" if close else "Check the name after the colon."
            raise ConfigError(f"{label}: {where} has no attribute {part!r}. {hint}") from None
    return obj


def _current_directory_on_path() -> None:
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)  # last: never shadows an installed package
