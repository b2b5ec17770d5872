"""Results: rows of (measurement, reference, ratio, target), as markdown and PNG."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from bench import SECTIONS

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Row:
    """One measurement next to its reference.

    ``ratio`` is what the target applies to (its meaning is in ``target_text``
    or the measurement's name); ``op`` is ``"<="`` or ``">="``; no target means
    the row is for information.
    """

    section: str
    name: str
    value: float | None = None
    unit: str = ""
    ref_name: str = ""
    ref_value: float | None = None
    ref_unit: str | None = None
    ratio: float | None = None
    op: str | None = None
    target: float | None = None
    target_text: str = ""
    status: str = ""  # filled in: pass / miss / info / error / skipped
    note: str = ""

    def __post_init__(self) -> None:
        if self.status:
            return
        if self.op is None or self.target is None:
            self.status = "info"
        elif self.ratio is None or not math.isfinite(self.ratio):
            self.status = "n/a"
        elif self.op == "<=":
            self.status = "pass" if self.ratio <= self.target else "miss"
        else:
            self.status = "pass" if self.ratio >= self.target else "miss"
        if not self.target_text and self.op is not None and self.target is not None:
            self.target_text = f"{'≤' if self.op == '<=' else '≥'} {_num(self.target)}"


@dataclass
class Report:
    header: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (title, preformatted)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (section, traceback)
    plot_blocked: list[tuple[str, float]] = field(default_factory=list)
    plot_ratios: list[tuple[str, float, float, str]] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)

    def error(self, section: str, name: str, exc: BaseException, tb: str) -> None:
        text = _ANSI.sub("", str(exc)).strip()
        lines = [ln for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"^", "~"}]
        last = lines[-1] if lines else ""  # Ray puts the root cause last
        message = f"{type(exc).__name__}: {last}"
        tb = _ANSI.sub("", tb)
        self.add(Row(section, f"{name}: ERROR", status="error", note=_cell(message)[:300]))
        self.errors.append((f"{section} {name}", tb))

    def skipped(self, section: str, name: str, why: str) -> None:
        self.add(Row(section, name, status="skipped", note=why))

    # -- output ------------------------------------------------------------------
    def markdown(self) -> str:
        h = self.header
        lines = [f"# ckptmgr benchmark ({h.get('mode', '?')})", ""]
        for key, value in h.items():
            if key != "mode":
                lines.append(f"- **{key}**: {value}")
        lines += [
            "",
            "Every ratio is measured side by side with its reference in this same run. "
            "`pass`/`miss` compares the ratio column with the target column.",
            "",
            "| section | measurement | value | reference | reference value | ratio | target | status | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        order = {s: i for i, s in enumerate(SECTIONS)}
        for row in sorted(self.rows, key=lambda r: order.get(r.section, 99)):
            lines.append(
                "| " + " | ".join([
                    row.section,
                    _cell(row.name),
                    _fmt(row.value, row.unit),
                    _cell(row.ref_name),
                    _fmt(row.ref_value, row.ref_unit if row.ref_unit is not None else row.unit),
                    "" if row.ratio is None else _num(row.ratio),
                    _cell(row.target_text),
                    f"**{row.status}**" if row.status == "miss" else row.status,
                    _cell(row.note),
                ]) + " |"
            )
        lines += ["", "Sections:", ""]
        lines += [f"- {key}: {title}" for key, title in SECTIONS.items()]
        if self.notes:
            lines += ["", "## Notes", ""]
            for section in sorted(self.notes, key=lambda s: order.get(s, 99)):
                for text in self.notes[section]:
                    lines.append(f"- {section}: {text}")
        for title, text in self.blocks:
            lines += ["", f"## {title}", "", "```", text.rstrip(), "```"]
        if self.errors:
            lines += ["", "## Errors", ""]
            for where, tb in self.errors:
                lines += [f"### {where}", "", "```", tb.rstrip()[-3000:], "```", ""]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str, stem: str = "latest") -> tuple[str, str]:
        os.makedirs(out_dir, exist_ok=True)
        md_path = os.path.join(out_dir, f"{stem}.md")
        png_path = os.path.join(out_dir, f"{stem}.png")
        with open(md_path, "w") as f:
            f.write(self.markdown())
        self.plot(png_path)
        return md_path, png_path

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
        blocked = [(n, v) for n, v in self.plot_blocked if v is not None and v > 0]
        if blocked:
            names, values = zip(*blocked)
            colors = ["#2b8cbe" if "ckptmgr" in n else "#999999" if "floor" in n else "#e34a33"
                      for n in names]
            bars = ax1.bar(range(len(values)), values, color=colors)
            ax1.set_yscale("log")
            ax1.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            for bar, v in zip(bars, values):
                ax1.annotate(_fmt(v, "s"), (bar.get_x() + bar.get_width() / 2, v),
                             ha="center", va="bottom", fontsize=7)
        else:
            ax1.text(0.5, 0.5, "no data", ha="center", transform=ax1.transAxes)
        ax1.set_ylabel("seconds per checkpoint (log)")
        ax1.set_title("Blocked time per checkpoint inside fit() (median; worst incl. the first save)")

        ratios = [(n, r, t, op) for n, r, t, op in self.plot_ratios if r is not None and math.isfinite(r)]
        if ratios:
            names = [n for n, *_ in ratios]
            x = range(len(ratios))
            colors = ["#31a354" if (r >= t if op == ">=" else r <= t) else "#de2d26"
                      for _, r, t, op in ratios]
            ax2.bar(x, [r for _, r, _, _ in ratios], color=colors)
            for i, (_, r, t, op) in enumerate(ratios):
                ax2.hlines(t, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
                ax2.annotate(f"{r:.2f}", (i, r), ha="center", va="bottom", fontsize=8)
            ax2.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        else:
            ax2.text(0.5, 0.5, "no data", ha="center", transform=ax2.transAxes)
        ax2.set_ylabel("ratio (dashed: target; green pass, red miss)")
        ax2.set_title("Throughput vs raw (higher is better) and other ratios")
        title = f"ckptmgr bench: {self.header.get('params', '')} params, {self.header.get('checkpoint', '')}"
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        tmp = path + ".tmp"
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        os.replace(tmp, path)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(x: float) -> str:
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if unit == "s":
        if abs(value) < 1e-3:
            return f"{value * 1e6:.0f} µs"
        if abs(value) < 1:
            return f"{value * 1e3:.1f} ms"
        return f"{value:.2f} s"
    if unit == "B":
        if abs(value) >= 1e9:
            return f"{value / 1e9:.3f} GB"
        if abs(value) >= 1e6:
            return f"{value / 1e6:.1f} MB"
        if abs(value) >= 1e3:
            return f"{value / 1e3:.1f} kB"
        return f"{value:.0f} B"
    if unit == "MB/s":
        return f"{value:.0f} MB/s"
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    if unit == "%":
        return f"{value:.1f} %"
    return f"{_num(value)} {unit}".strip()
