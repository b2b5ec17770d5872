"""What ``ckptmgr list`` and ``inspect`` print: tables, sizes, and summaries of a
model and its optimizer read from ``config.json`` and the weights file, without
building the model (so no TensorFlow is imported)."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer

from ckptmgr.io.manifest import Manifest

if TYPE_CHECKING:
    from ckptmgr.manager import CheckpointManager


def out(text: str = "") -> None:
    typer.echo(text)


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "160"))
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


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


def model_summary(config: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    inner = config.get("config") or {}
    layers = []
    for layer in inner.get("layers") or []:
        lc = layer.get("config") or {}
        name = lc.get("name", "?")
        details = {
            k: lc[k]
            for k in ("units", "activation", "filters", "kernel_size", "rate", "batch_shape", "output_dim")
            if k in lc and lc[k] is not None
        }
        layers.append({
            "name": name,
            "class": layer.get("class_name", "?"),
            "details": details,
            "params": counts.get(f"layers/{name}", 0),
        })
    return {
        "class": config.get("class_name", "?"),
        "name": inner.get("name", ""),
        "layers": layers,
        "params": sum(v for k, v in counts.items() if k.startswith("layers")),
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
        out(
            f"loop         saved at epoch {lp.epoch}, batch {lp.batch}; "
            f"next: epoch {lp.next_epoch}, batch {lp.next_batch}"
        )
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
        out(f"  {layer['name']:<{width}}  {layer['class']:<14} {layer['params']:>10,}  {details}")
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
