"""Drawing contact sheets people can read: a title, a body of captioned tiles, a legend.

Pillow only, with its built-in font (``ImageFont.load_default``; sized where Pillow has FreeType),
so no font file is needed. :func:`image_grid` lays stills out in rows and columns (prompts x
seeds) with a caption under each tile; ``farm.media.clip_rows`` draws one row per video clip;
:func:`compose` puts a title above a body and a legend below it, and :func:`to_png` encodes it.
Importing this module loads Pillow; ``farm.manifest`` and ``farm.media`` import it only when
they draw.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (250, 250, 247)
INK = (28, 28, 30)
MUTED = (105, 105, 112)
RULE = (212, 212, 214)
EMPTY = (226, 226, 228)  # a tile without an image ...
CROSS = (196, 196, 200)  # ... crossed out
TILE = 160  # the box a still's thumbnail is fitted into
PAD = 16  # around the sheet
GAP = 10  # between tiles
TITLE_SIZE, TEXT_SIZE, SMALL_SIZE = 20, 13, 11
MIN_WIDTH = 560  # a sheet of one small tile still has room for its title and legend
MAX_TITLE_WIDTH = 1200  # a sheet is widened for its title up to this; a longer title is cut


@cache
def font(size: int) -> Any:
    """Pillow's built-in font at ``size`` pixels (its fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def line_height(size: int) -> int:
    box = font(size).getbbox("Ag|")
    return int(box[3]) + 3


def text_width(text: str, size: int) -> int:
    return int(font(size).getlength(text))


def fit(text: str, size: int, width: int) -> str:
    """``text`` on one line of at most ``width`` pixels, cut with ``...`` when longer."""
    text = " ".join(text.split())  # newlines and tabs as spaces
    if text_width(text, size) <= width:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits with the ellipsis
        mid = (low + high + 1) // 2
        if text_width(text[:mid].rstrip() + "...", size) <= width:
            low = mid
        else:
            high = mid - 1
    return text[:low].rstrip() + "..."


def wrap(text: str, size: int, width: int, max_lines: int = 3) -> list[str]:
    """``text`` in lines of at most ``width`` pixels; the last of ``max_lines`` is cut with ``...``."""
    words = text.split()
    lines: list[str] = []
    current = ""
    for index, word in enumerate(words):
        candidate = f"{current} {word}".strip()
        if text_width(candidate, size) <= width or not current:
            current = candidate
            continue
        lines.append(current)
        current = word
        if len(lines) == max_lines - 1:
            current = " ".join(words[index:])
            break
    if current:
        lines.append(fit(current, size, width))
    return [fit(line, size, width) for line in lines] or [""]


def fit_image(image: Any, box: tuple[int, int]) -> Any:
    """``image`` as RGB, scaled (up or down, aspect kept) to fit ``box``."""
    image = image.convert("RGB")
    scale = min(box[0] / image.width, box[1] / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    return image.resize(size, resample)


def placeholder(box: tuple[int, int], note: str) -> Any:
    """A grey box crossed out, with ``note`` (why there is no image) in its middle."""
    tile = Image.new("RGB", box, EMPTY)
    draw = ImageDraw.Draw(tile)
    draw.line((0, 0, box[0] - 1, box[1] - 1), fill=CROSS, width=2)
    draw.line((0, box[1] - 1, box[0] - 1, 0), fill=CROSS, width=2)
    label = fit(note, SMALL_SIZE, box[0] - 8)
    width, height = text_width(label, SMALL_SIZE), line_height(SMALL_SIZE)
    x, y = (box[0] - width) // 2, (box[1] - height) // 2
    draw.rectangle((x - 4, y - 2, x + width + 4, y + height), fill=EMPTY)
    draw.text((x, y), label, fill=INK, font=font(SMALL_SIZE))
    return tile


def paste_centered(canvas: Any, image: Any, box: tuple[int, int, int, int]) -> None:
    """Paste ``image`` in the middle of ``box`` (left, top, width, height) with a thin frame."""
    left, top, width, height = box
    x, y = left + (width - image.width) // 2, top + (height - image.height) // 2
    canvas.paste(image, (x, y))
    ImageDraw.Draw(canvas).rectangle((x - 1, y - 1, x + image.width, y + image.height), outline=RULE)


@dataclass(frozen=True)
class Tile:
    """One cell of an image grid: a picture (``None``: there is none, say why in ``note``) and
    the caption lines under it."""

    image: Any
    caption: tuple[str, ...]
    note: str = "no image"


def image_grid(
    rows: Sequence[Sequence[Tile | None]],
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
) -> Any:
    """Tiles in rows and columns, each thumbnail fitted into a :data:`TILE` box with its caption
    below; ``row_labels`` go left of each row, ``column_labels`` above each column; a ``None``
    cell is left empty."""
    columns = max((len(row) for row in rows), default=0)
    caption_lines = max((len(t.caption) for row in rows for t in row if t is not None), default=0)
    cell_w, cell_h = TILE, TILE + 4 + caption_lines * line_height(SMALL_SIZE)
    label_w = max((text_width(label, TEXT_SIZE) for label in row_labels), default=0)
    label_w = label_w + GAP if label_w else 0
    header_h = line_height(TEXT_SIZE) + 4 if column_labels else 0
    width = label_w + columns * cell_w + max(0, columns - 1) * GAP
    height = header_h + len(rows) * cell_h + max(0, len(rows) - 1) * GAP
    canvas = Image.new("RGB", (max(1, width), max(1, height)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels[:columns]):
        x = label_w + c * (cell_w + GAP)
        draw.text((x, 0), fit(label, TEXT_SIZE, cell_w), fill=MUTED, font=font(TEXT_SIZE))
    for r, row in enumerate(rows):
        top = header_h + r * (cell_h + GAP)
        if r < len(row_labels):
            draw.text((0, top + TILE // 2 - line_height(TEXT_SIZE) // 2), row_labels[r], fill=INK, font=font(TEXT_SIZE))
        for c, tile in enumerate(row):
            if tile is None:
                continue
            left = label_w + c * (cell_w + GAP)
            picture = (
                fit_image(tile.image, (TILE, TILE)) if tile.image is not None else placeholder((TILE, TILE), tile.note)
            )
            paste_centered(canvas, picture, (left, top, TILE, TILE))
            for i, text in enumerate(tile.caption):
                y = top + TILE + 4 + i * line_height(SMALL_SIZE)
                colour = INK if i == 0 else MUTED
                draw.text((left, y), fit(text, SMALL_SIZE, cell_w), fill=colour, font=font(SMALL_SIZE))
    return canvas


def compose(title: str, subtitle: Sequence[str], body: Any, legend: Sequence[str]) -> Any:
    """The whole sheet: ``title`` (large) and ``subtitle`` lines above ``body``, a rule, and the
    ``legend`` lines below it (each wrapped to the sheet's width)."""
    width = max(MIN_WIDTH, body.width + 2 * PAD, min(MAX_TITLE_WIDTH, text_width(title, TITLE_SIZE)) + 2 * PAD)
    inner = width - 2 * PAD
    heads = [(fit(title, TITLE_SIZE, inner), TITLE_SIZE, INK)]
    heads += [(fit(line, TEXT_SIZE, inner), TEXT_SIZE, MUTED) for line in subtitle]
    notes = [(line, TEXT_SIZE, INK) for entry in legend for line in wrap(entry, TEXT_SIZE, inner, max_lines=2)]
    head_h = sum(line_height(size) for _, size, _ in heads)
    note_h = sum(line_height(size) for _, size, _ in notes)
    height = PAD + head_h + GAP + body.height + GAP + 1 + GAP + note_h + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for text, size, colour in heads:
        draw.text((PAD, y), text, fill=colour, font=font(size))
        y += line_height(size)
    y += GAP
    sheet.paste(body, (PAD, y))
    y += body.height + GAP
    draw.line((PAD, y, width - PAD, y), fill=RULE, width=1)
    y += 1 + GAP
    for text, size, colour in notes:
        draw.text((PAD, y), text, fill=colour, font=font(size))
        y += line_height(size)
    return sheet


def to_png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
