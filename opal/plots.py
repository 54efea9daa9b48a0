"""Minimal PNG charts with Pillow (both environments have it; no matplotlib): latency histograms, metric bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def histogram_png(series: dict[str, Sequence[float]], path: Path, title: str, unit: str = "ms", bins: int = 30) -> Path:
    """Overlaid histograms of several latency series, one colour each."""
    w, h, pad = 900, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    values = [v for s in series.values() for v in s]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    width = (hi - lo) / bins
    counts = {name: [0] * bins for name in series}
    for name, s in series.items():
        for v in s:
            counts[name][min(int((v - lo) / width), bins - 1)] += 1
    top = max(max(c) for c in counts.values()) or 1
    d.text((pad, 15), title, fill="black")
    d.line([(pad, h - pad), (w - pad, h - pad)], fill="black")
    d.line([(pad, pad), (pad, h - pad)], fill="black")
    bw = (w - 2 * pad) / bins
    for i, (name, c) in enumerate(counts.items()):
        col = COLOURS[i % len(COLOURS)]
        for b, n in enumerate(c):
            if n:
                x0 = pad + b * bw + i * bw / len(counts)
                y0 = h - pad - (h - 2 * pad) * n / top
                d.rectangle([x0, y0, x0 + bw / len(counts) - 1, h - pad], fill=col)
        d.rectangle([w - 250, 20 + 18 * i, w - 238, 32 + 18 * i], fill=col)
        d.text((w - 230, 20 + 18 * i), f"{name} (n={len(series[name])})", fill="black")
    for k in range(5):
        x = pad + (w - 2 * pad) * k / 4
        d.text((x - 15, h - pad + 8), f"{lo + (hi - lo) * k / 4:.0f}", fill="black")
    d.text((w // 2 - 20, h - 25), unit, fill="black")
    d.text((10, pad - 20), f"max {top}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def bars_png(groups: Sequence[str], series: dict[str, Sequence[float]], path: Path, title: str, top: float = 1.0) -> Path:
    """Grouped bars: one group per label in ``groups`` (e.g. a metric), one bar per series (e.g. a system).

    The chart widens with the number of groups (at least 130 px each) so labels stay apart,
    and the legend sits in a band above the bars, never over them.
    """
    pad = 60
    y_top = max(pad, 44 + 18 * len(series))  # legend band
    w, h = max(900, 120 + 130 * len(groups)), 420 + y_top
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 15), title, fill="black")
    d.line([(pad, h - pad), (w - pad, h - pad)], fill="black")
    d.line([(pad, y_top), (pad, h - pad)], fill="black")
    gw = (w - 2 * pad) / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(series))
    for gi, label in enumerate(groups):
        x_group = pad + gi * gw + gw * 0.1
        d.text((x_group, h - pad + 8), label, fill="black")
        for si, (_name, values) in enumerate(series.items()):
            v = max(0.0, min(top, float(values[gi])))
            x0 = x_group + si * bw
            y0 = h - pad - (h - pad - y_top) * v / top
            d.rectangle([x0, y0, x0 + bw - 2, h - pad], fill=COLOURS[si % len(COLOURS)])
            d.text((x0, y0 - 14), f"{float(values[gi]):.2f}", fill="black")
    for si, name in enumerate(series):
        d.rectangle([w - 250, 20 + 18 * si, w - 238, 32 + 18 * si], fill=COLOURS[si % len(COLOURS)])
        d.text((w - 230, 20 + 18 * si), name, fill="black")
    for k in range(5):
        y = h - pad - (h - pad - y_top) * k / 4
        d.text((10, y - 6), f"{top * k / 4:.2f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def line_png(series: dict[str, Sequence[tuple[float, float]]], path: Path, title: str, x_label: str = "step") -> Path:
    """One polyline per series of (x, y) points, e.g. training loss over steps."""
    w, h, pad = 900, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    points = [p for s in series.values() for p in s]
    x_lo, x_hi = min(x for x, _ in points), max(x for x, _ in points)
    y_lo, y_hi = min(0.0, min(y for _, y in points)), max(y for _, y in points)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)

    def at(x: float, y: float) -> tuple[float, float]:
        return pad + (w - 2 * pad) * (x - x_lo) / (x_hi - x_lo), h - pad - (h - 2 * pad) * (y - y_lo) / (y_hi - y_lo)

    d.text((pad, 15), title, fill="black")
    d.line([(pad, h - pad), (w - pad, h - pad)], fill="black")
    d.line([(pad, pad), (pad, h - pad)], fill="black")
    for i, (name, s) in enumerate(series.items()):
        col = COLOURS[i % len(COLOURS)]
        xy = [at(x, y) for x, y in sorted(s)]
        if len(xy) > 1:
            d.line(xy, fill=col, width=2)
        for x0, y0 in xy:
            d.ellipse([x0 - 3, y0 - 3, x0 + 3, y0 + 3], fill=col)
        d.rectangle([w - 250, 20 + 18 * i, w - 238, 32 + 18 * i], fill=col)
        d.text((w - 230, 20 + 18 * i), name, fill="black")
    for k in range(5):
        d.text((pad + (w - 2 * pad) * k / 4 - 10, h - pad + 8), f"{x_lo + (x_hi - x_lo) * k / 4:.0f}", fill="black")
        d.text((10, h - pad - (h - 2 * pad) * k / 4 - 6), f"{y_lo + (y_hi - y_lo) * k / 4:.2f}", fill="black")
    d.text((w // 2 - 20, h - 25), x_label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
