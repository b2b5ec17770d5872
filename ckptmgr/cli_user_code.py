"""The CLI's user-code options, ``--custom-object NAME=MODULE:ATTR`` and
``--import MODULE`` (both repeatable), on the commands that build a model:
``inspect``, ``export``, ``verify --deep``, ``run`` and ``resume``.

A spec with bad syntax is a usage error (exit 2) naming it; a module that
does not import is one ``error:`` line (exit 1). See :mod:`ckptmgr.user_code`.
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from ckptmgr.errors import ConfigError, UnknownCustomObjectError
from ckptmgr.tf_noise import filtered_stderr, import_keras_quietly
from ckptmgr.user_code import UserCode, check_module_name, parse_custom_object


def _check_specs(check):
    def callback(values: Optional[list[str]]) -> Optional[list[str]]:
        for value in values or []:
            try:
                check(value)
            except ConfigError as exc:  # "Invalid module: Received: ..." -> "Received: ..."
                raise typer.BadParameter(str(exc).split(": ", 1)[-1]) from None
        return values

    return callback


CustomObjectOpt = typer.Option(
    None, "--custom-object", metavar="NAME=MODULE:ATTR", callback=_check_specs(parse_custom_object),
    help="Give Keras MODULE.ATTR as the custom object NAME when it loads the model "
         "(repeatable), e.g. CustomModel=mymodels:CustomModel. MODULE is imported from "
         "the current directory or PYTHONPATH.",
)
ImportOpt = typer.Option(
    None, "--import", metavar="MODULE", callback=_check_specs(check_module_name),
    help="Import MODULE first, so its @keras.saving.register_keras_serializable classes "
         "are known (repeatable).",
)


UNKNOWN_OBJECT_HINT = (
    " (CLI: --custom-object NAME=MODULE:ATTR, or --import MODULE for registered classes)"
)


def user_code(custom_objects: Optional[list[str]], imports: Optional[list[str]]) -> UserCode:
    return UserCode.of(imports, custom_objects)


def load_user_code(code: UserCode) -> dict[str, Any]:
    """Import Keras and the user's modules without TensorFlow's start-up noise;
    return ``custom_objects`` for Keras."""
    code.check_findable()  # before TensorFlow is imported: a typo fails fast
    import_keras_quietly()
    with filtered_stderr():
        return code.load()




def load_model(manager, step: int, code: UserCode, *, compile: bool, safe_mode: bool = True):
    """``manager.load`` with the user's code; an unknown class names the options."""
    custom_objects = load_user_code(code)
    try:
        return manager.load(step, custom_objects, compile=compile, safe_mode=safe_mode)
    except UnknownCustomObjectError as exc:
        raise UnknownCustomObjectError(f"{exc}{UNKNOWN_OBJECT_HINT}") from None
