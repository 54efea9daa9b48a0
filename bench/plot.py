"""Minimal PNG charts with Pillow (both environments have it; no matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw


def histogram_png(series: dict[str, Sequence[float]], path: Path, title: str, unit: str = "ms", bins: int = 30) -> Path:
    """Overlaid histograms of several latency series, one colour each."""
    w, h, pad = 900, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    values = [v for s in series.values() for v in s]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    width = (hi - lo) / bins
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
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
        col = colours[i % len(colours)]
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
