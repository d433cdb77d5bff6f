"""The demo's picture: for each filesystem, a grid of its 16 KiB pages (columns) in each
crash state (rows, by crash point: the random cuts, then the cuts just before flushes),
torn pages red, pages missing an fsynced write orange.

Written with zlib and struct alone (a PNG is a signature and three chunks), with a 3x5
pixel font for the labels: the demo's install stays pyfuse3, trio and cffi; matplotlib or
Pillow would add tens of megabytes for one picture.
"""
from __future__ import annotations

import struct
import zlib
from typing import Sequence

from atomicfs.crashtest.compare import FsResult

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
INTACT = (205, 215, 205)
TORN = (215, 25, 30)
TORN_TITLE = (150, 0, 0)  # not TORN: only cells are drawn in that colour
LOST = (255, 150, 0)

CELL_W, CELL_H = 4, 3  # a page: 3x3 pixels and a 1-pixel gap to its right neighbour
MARGIN = 16
PANEL_GAP = 32
TEXT_SCALE = 2

# Glyphs of 3x5 pixels, rows top to bottom, "1" = ink.
_FONT = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011",
    "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111",
    "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010",
    "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111",
    "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111",
    "0": "111101101101111", "1": "010110010010111", "2": "110001010100111",
    "3": "110001010001110", "4": "101101111001001", "5": "111100110001110",
    "6": "011100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001110", " ": "000000000000000", ":": "000010000010000",
    ",": "000000000010010", ".": "000000000000010", "/": "001001010100100",
    "-": "000000111000000", "(": "010100100100010", ")": "010001001001010",
}


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(WHITE) * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, color: tuple[int, int, int]) -> None:
        row = bytes(color) * w
        for yy in range(y, y + h):
            start = (yy * self.width + x) * 3
            self.pixels[start: start + 3 * w] = row

    def text(self, x: int, y: int, text: str, color: tuple[int, int, int] = BLACK,
             scale: int = TEXT_SCALE) -> None:
        for ch in text.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for i, bit in enumerate(glyph):
                if bit == "1":
                    self.rect(x + (i % 3) * scale, y + (i // 3) * scale, scale, scale, color)
            x += 4 * scale

    def png(self) -> bytes:
        rows = b"".join(b"\x00" + bytes(self.pixels[y * self.width * 3:
                                                    (y + 1) * self.width * 3])
                        for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_width(text: str, scale: int = TEXT_SCALE) -> int:
    return len(text) * 4 * scale


def _section_titles(r: FsResult) -> tuple[str, str]:
    f = r.flush_cuts
    return (f"{r.name}: {r.torn_pages} torn pages in {r.torn_states} of {r.states} random "
            f"cuts, {r.lost_writes} lost fsynced writes",
            f"just before flushes: {f.torn_pages} torn pages in {f.torn_states} of "
            f"{f.states} cuts, {f.lost_writes} lost")


def page_grid(results: Sequence[FsResult]) -> Canvas:
    """One panel per filesystem, side by side: its random cuts, then its cuts just
    before flushes, each titled with its counts; a legend below."""
    line = 5 * TEXT_SCALE + 8
    titles = [_section_titles(r) for r in results]
    panel_w = [max(len(r.pages) * CELL_W, *(text_width(t) for t in ts))
               for r, ts in zip(results, titles)]
    rows = max((r.states for r in results), default=0)
    cut_rows = max((r.flush_cuts.states for r in results), default=0)
    legend = ["rows: crash states, by crash point. columns: 16 KiB pages of 3 files.",
              "red: torn page (two versions mixed). orange: an fsynced write missing."]
    width = max(sum(panel_w) + PANEL_GAP * (len(results) - 1),
                max(text_width(t) for t in legend)) + 2 * MARGIN
    cuts_top = MARGIN + line + rows * CELL_H + 8
    legend_top = cuts_top + line + cut_rows * CELL_H + 8
    c = Canvas(width, legend_top + len(legend) * line + MARGIN)
    x = MARGIN
    for r, ts, pw in zip(results, titles, panel_w):
        column = {p: k for k, p in enumerate(r.pages)}
        for top, title, tally in ((MARGIN, ts[0], r), (cuts_top, ts[1], r.flush_cuts)):
            c.text(x, top, title, TORN_TITLE if tally.torn_pages else BLACK)
            for k, v in enumerate(tally.rows):
                y = top + line + k * CELL_H
                c.rect(x, y, len(r.pages) * CELL_W - 1, CELL_H, INTACT)
                for colour, pages in ((LOST, v.lost_at), (TORN, v.torn_at)):
                    for page in pages:
                        if page in column:
                            c.rect(x + column[page] * CELL_W, y, CELL_W - 1, CELL_H, colour)
        x += pw + PANEL_GAP
    y = legend_top
    for t in legend:
        c.text(MARGIN, y, t)
        y += line
    return c


def write_page_grid(results: Sequence[FsResult], path: str) -> str:
    with open(path, "wb") as f:
        f.write(page_grid(results).png())
    return path
