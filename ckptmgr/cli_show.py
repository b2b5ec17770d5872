"""What ``ckptmgr list`` and ``inspect`` print: tables, sizes, and summaries of a
model and its optimizer read from ``config.json`` and the weights file, without
building the model (so no TensorFlow is imported).

Epochs and batches are shown counted from 1, as Keras's progress bar shows
them ("Epoch 2/3"); manifests and ``--json`` keep Keras's 0-based ``epoch``
(what callbacks receive).
"""

from __future__ import annotations

import io
import json
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any


from ckptmgr.cli_common import console, out
from ckptmgr.io.manifest import Manifest

if TYPE_CHECKING:
    from ckptmgr.manager import CheckpointManager


def human(n: int | float) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def when(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")


def metrics_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def manifest_row(manager: CheckpointManager, m: Manifest, pinned: set[int]) -> dict[str, Any]:
    loop = m.loop
    return {
        "step": m.step,
        "path": manager.storage.url_of(m.archive),
        "bytes": m.archive_entry.bytes,
        "created": m.created.isoformat(),
        "metrics": dict(m.metrics),
        "epoch": loop.epoch if loop else None,
        "batch": loop.batch if loop else None,
        "pinned": m.step in pinned,
        "keras_version": m.keras_version,
        "stats": m.stats.model_dump(),
    }


# ``list``: columns in display order; when the table is wider than the
# terminal, columns go in DROP_ORDER (metrics wrap first); step always stays whole.
LIST_COLUMNS = ("step", "created", "size", "epoch", "blocked", "write", "MB/s", "metrics", "pinned")
DROP_ORDER = ("MB/s", "write", "blocked", "epoch", "pinned", "created", "size", "metrics")
_LEFT = {"created", "metrics", "pinned"}


def list_cells(m: Manifest, row: dict[str, Any]) -> dict[str, str]:
    """One checkpoint's cells for the ``list`` table (epoch counted from 1)."""
    return {
        "step": str(m.step),
        "created": when(m.created),
        "size": human(row["bytes"]),
        "epoch": "" if row["epoch"] is None else str(row["epoch"] + 1),
        "blocked": f"{m.stats.blocked_s:.3f}s",
        "write": f"{m.stats.write_s:.2f}s",
        "MB/s": f"{m.stats.mb_per_s:.0f}",
        "metrics": metrics_text(m.metrics),
        "pinned": "pinned" if row["pinned"] else "",
    }


def print_list(directory: str, cells: list[dict[str, str]]) -> None:
    """The ``list`` table, fitted to the terminal's width by dropping columns
    in :data:`DROP_ORDER` and wrapping metrics between their ``k=v`` items."""
    con = console()
    columns = list(LIST_COLUMNS)
    hidden: list[str] = []
    while _needed_width(columns, cells) > con.width:
        droppable = [c for c in DROP_ORDER if c in columns]
        if not droppable:
            break
        columns.remove(droppable[0])
        hidden.append(droppable[0])
    out(directory)
    con.print(_table(columns, cells))
    if hidden:
        out(f"(not shown at {con.width} columns: {', '.join(reversed(hidden))}; "
            "widen the terminal or use --json)")


def _table(columns: list[str], cells: list[dict[str, str]], wrap: bool = True):
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for name in columns:
        widest = max([len(name)] + [len(c[name]) for c in cells])
        wraps = wrap and name == "metrics"
        table.add_column(name, justify="left" if name in _LEFT else "right", no_wrap=not wraps,
                         min_width=_min_width(name, cells) if wraps else widest, overflow="fold")
    for c in cells:
        table.add_row(*(c[name] for name in columns))
    return table


def _min_width(name: str, cells: list[dict[str, str]]) -> int:
    """The narrowest a column may be: no word cut, and metrics at least 20
    wide (or as wide as the widest), so they wrap into a few lines, not a list."""
    words = max([len(name)] + [len(word) for c in cells for word in c[name].split()])
    widest = max([len(name)] + [len(c[name]) for c in cells])
    return max(words, min(widest, 20)) if name == "metrics" else words


def _needed_width(columns: list[str], cells: list[dict[str, str]]) -> int:
    """The table's width with every column whole and metrics wrapped as far as
    their words allow."""
    from rich.console import Console

    con = Console(file=io.StringIO(), width=100_000, highlight=False)
    con.print(_table(columns, cells, wrap=False))
    full = max(len(line) for line in con.file.getvalue().splitlines())
    if "metrics" in columns:
        widest = max([len("metrics")] + [len(c["metrics"]) for c in cells])
        full -= widest - _min_width("metrics", cells)
    return full


def print_superseded(superseded) -> None:
    """The abandoned futures (see ckptmgr.history), after the live history."""
    if not superseded:
        return
    out("superseded (moved aside when training continued from an older step; never "
         "restored; `ckptmgr prune URL --superseded` deletes them):")
    for entry in superseded:
        out(f"  {entry.describe()}")


def weight_counts(h5) -> dict[str, int]:
    """Number of values per top-level group of the weights file (layers, optimizer)."""
    counts: dict[str, int] = {}

    def visit(name: str, obj) -> None:
        if hasattr(obj, "shape") and obj.shape is not None:
            size = 1
            for d in obj.shape:
                size *= d
            parts = name.split("/")
            key = "/".join(parts[:2]) if parts[0] == "layers" and len(parts) > 1 else parts[0]
            counts[key] = counts.get(key, 0) + size

    h5.visititems(visit)
    return counts


def keras_weight_groups(layers: list[dict[str, Any]]) -> list[str]:
    """The group of each layer of a Functional/Sequential config in
    ``model.weights.h5``: ``layers/<snake_case class name>``, ``_1``, ``_2``...
    for repeats, in the config's order (Keras's ``saving_lib`` names them so,
    never by ``layer.name``; ``tests/test_cli.py`` checks it against
    ``count_params()`` on the installed Keras)."""
    used: dict[str, int] = {}
    groups = []
    for layer in layers:
        name = _snake_case(str(layer.get("class_name", "")))
        if name in used:
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        groups.append(f"layers/{name}")
    return groups


def _snake_case(name: str) -> str:
    """``keras.src.utils.naming.to_snake_case`` (Conv2D -> conv2d, MyBlock -> my_block)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


_DETAILS = ("units", "activation", "filters", "kernel_size", "rate", "batch_shape", "output_dim")


def model_summary(config: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """Layers and parameter counts from ``config.json`` and the weights file.

    A model without a layer list in its config (a subclassed ``Model``) stores
    each layer under the attribute that holds it: those groups are listed, by
    attribute name, with no class.
    """
    inner = config.get("config") or {}
    layers = []
    config_layers = inner.get("layers") if isinstance(inner.get("layers"), list) else None
    if config_layers is not None:
        for layer, group in zip(config_layers, keras_weight_groups(config_layers)):
            lc = layer.get("config") or {}
            layers.append({
                "name": lc.get("name", "?"),
                "class": layer.get("class_name", "?"),
                "details": {k: lc[k] for k in _DETAILS if k in lc and lc[k] is not None},
                "params": counts.get(group, 0),
            })
    else:
        for group, n in counts.items():
            if group != "optimizer":
                layers.append({"name": group, "class": "", "details": {}, "params": n})
    return {
        "class": config.get("class_name", "?"),
        "name": inner.get("name", ""),
        "layers": layers,
        "params": sum(v for k, v in counts.items() if k != "optimizer"),
        "optimizer_values": counts.get("optimizer", 0),
    }


def built_model_summary(model, counts: dict[str, int]) -> dict[str, Any]:
    """The same summary from a model Keras built (``inspect`` with user code)."""
    layers = []
    for layer in model.layers:
        try:
            lc = layer.get_config()
        except Exception:  # noqa: BLE001 - a custom layer without get_config
            lc = {}
        layers.append({
            "name": layer.name,
            "class": type(layer).__name__,
            "details": {k: lc[k] for k in _DETAILS if k in lc and lc[k] is not None},
            "params": layer.count_params() if layer.built else 0,
        })
    return {
        "class": type(model).__name__,
        "name": model.name,
        "layers": layers,
        "params": model.count_params(),
        "optimizer_values": counts.get("optimizer", 0),
    }


def optimizer_summary(config: dict[str, Any]) -> dict[str, Any] | None:
    compile_config = config.get("compile_config") or {}
    optimizer = compile_config.get("optimizer")
    if not optimizer:
        return None
    if isinstance(optimizer, str):
        return {"class": optimizer, "config": {}, "loss": compile_config.get("loss")}
    return {
        "class": optimizer.get("class_name", "?"),
        "config": optimizer.get("config") or {},
        "loss": compile_config.get("loss"),
        "metrics": compile_config.get("metrics"),
    }


def print_inspect(manager, m: Manifest, pinned: bool, model, optimizer) -> None:
    out(f"checkpoint   step {m.step}")
    out(f"path         {manager.storage.url_of(m.archive)}")
    out(f"created      {when(m.created)}")
    out(f"keras        {m.keras_version or '?'} (manifest schema {m.schema_version})")
    out(f"pinned       {'yes' if pinned else 'no'}")
    out(f"metrics      {metrics_text(m.metrics) or '-'}")
    if m.loop:
        lp = m.loop
        saved = f"epoch {lp.epoch + 1} after batch {lp.batch}" if lp.batch else f"epoch {lp.epoch + 1}, before its first batch"
        resumes = f"epoch {lp.next_epoch + 1}, batch {lp.next_batch + 1}" if lp.next_batch else f"the start of epoch {lp.next_epoch + 1}"
        out(f"loop         saved in {saved}; resumes at {resumes}")
    else:
        out("loop         -")
    s = m.stats
    out(
        f"save         {human(s.bytes)}, blocked {s.blocked_s:.3f} s, "
        f"write {s.write_s:.3f} s, {s.mb_per_s:.1f} MB/s"
    )
    if m.world:
        out(f"world        {json.dumps(m.world, default=str)}")
    if m.extra:
        out(f"extra        {json.dumps(m.extra, default=str)}")
    out()
    out(f"model        {model['class']} {model['name']!r}: {model['params']:,} parameters")
    width = max([len(layer["name"]) for layer in model["layers"]] + [4])
    for layer in model["layers"]:
        details = ", ".join(f"{k}={v}" for k, v in layer["details"].items())
        out(f"  {layer['name']:<{width}}  {layer['class'] or '-':<14} {layer['params']:>10,}  {details}".rstrip())
    if optimizer:
        cfg = ", ".join(
            f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in optimizer["config"].items()
            if v is not None and k != "name"
        )
        out(f"optimizer    {optimizer['class']}: {cfg}")
        out(f"  state      {model['optimizer_values']:,} values")
        out(f"loss         {json.dumps(optimizer.get('loss'), default=str)}")
    out()
    out("files")
    for name, entry in m.files.items():
        out(f"  {name}  {entry.bytes} bytes  {checksums_text(entry)}")


def checksums_text(entry) -> str:
    parts = []
    if entry.crc32c is not None:
        count = len(entry.crc32c)
        parts.append(f"crc32c per {human(entry.chunk_bytes)} chunk ({count} chunk{'s' * (count != 1)})")
    if entry.sha256 is not None:
        parts.append(f"sha256 {entry.sha256}")
    return ", ".join(parts)
