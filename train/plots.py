"""Line charts as PNG with numpy and zlib only (no plotting dependency): series, axes, a 3x5 font.

line_chart("acc.png", "TASK ACCURACY", ["BASE", "R1 SFT", ...], {"accuracy": [0.2, 0.5, ...]})
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

# 3x5 glyphs, one 15-bit row-major bitmap each (top row first).
_FONT = {
    "0": 0b111101101101111, "1": 0b010110010010111, "2": 0b111001111100111, "3": 0b111001111001111,
    "4": 0b101101111001001, "5": 0b111100111001111, "6": 0b111100111101111, "7": 0b111001010010010,
    "8": 0b111101111101111, "9": 0b111101111001111, "A": 0b010101111101101, "B": 0b110101110101110,
    "C": 0b011100100100011, "D": 0b110101101101110, "E": 0b111100110100111, "F": 0b111100110100100,
    "G": 0b011100101101011, "H": 0b101101111101101, "I": 0b111010010010111, "J": 0b001001001101010,
    "K": 0b101101110101101, "L": 0b100100100100111, "M": 0b101111111101101, "N": 0b110101101101101,
    "O": 0b010101101101010, "P": 0b110101110100100, "Q": 0b010101101110011, "R": 0b110101110101101,
    "S": 0b011100010001110, "T": 0b111010010010010, "U": 0b101101101101111, "V": 0b101101101101010,
    "W": 0b101101111111101, "X": 0b101101010101101, "Y": 0b101101010010010, "Z": 0b111001010100111,
    ".": 0b000000000000010, "-": 0b000000111000000, "_": 0b000000000000111, ":": 0b000010000010000,
    "/": 0b001001010100100, "%": 0b101001010100101, " ": 0, "(": 0b010100100100010, ")": 0b010001001001010,
    "=": 0b000111000111000, "+": 0b000010111010000,
}  # fmt: skip
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _text(img, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 2) -> None:
    for ch in s.upper():
        bits = _FONT.get(ch, _FONT["-"])
        for r in range(5):
            for c in range(3):
                if bits >> (14 - (r * 3 + c)) & 1:
                    img[y + r * scale : y + (r + 1) * scale, x + c * scale : x + (c + 1) * scale] = color
        x += 4 * scale


def _line(img, x0, y0, x1, y1, color, width=2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    for t in np.linspace(0, 1, n):
        x, y = int(round(x0 + (x1 - x0) * t)), int(round(y0 + (y1 - y0) * t))
        img[max(0, y - width // 2) : y + width // 2 + 1, max(0, x - width // 2) : x + width // 2 + 1] = color


def write_png(path, img: np.ndarray) -> None:
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def line_chart(path, title: str, xlabels: list[str], series: dict[str, list[float | None]], w=640, h=400) -> None:
    """One line per series over the categorical x axis; None values are gaps."""
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 60, w - 20, 40, h - 70
    values = [v for vs in series.values() for v in vs if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    _text(img, left, 12, title, scale=3)
    _line(img, left, top, left, bottom, (0, 0, 0), 1)
    _line(img, left, bottom, right, bottom, (0, 0, 0), 1)
    for k in range(5):  # y ticks
        v = lo + (hi - lo) * k / 4
        y = int(bottom - (bottom - top) * k / 4)
        _line(img, left - 4, y, right, y, (225, 225, 225), 1)
        _text(img, 4, y - 5, f"{v:.2f}")
    n = max(len(xlabels), 2)
    xs = [left + 20 + (right - left - 40) * i / (n - 1) for i in range(len(xlabels))]
    for x, label in zip(xs, xlabels):
        _text(img, int(x) - 4 * len(label), bottom + 10, label)
    for s, (name, vs) in enumerate(series.items()):
        color = COLORS[s % len(COLORS)]
        pts = [(x, bottom - (bottom - top) * (v - lo) / (hi - lo)) for x, v in zip(xs, vs) if v is not None]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            _line(img, x0, y0, x1, y1, color)
        for x, y in pts:
            img[int(y) - 3 : int(y) + 4, int(x) - 3 : int(x) + 4] = color
        _text(img, left + 10 + 150 * s, h - 25, name, color)
    write_png(path, img)
