"""Rebuild QR codes drawn without an image: HTML tables, div grids and Unicode block characters.

A QR code (ISO/IEC 18004) is a square of dark and light modules, so a lure
can draw it with table cells coloured by `bgcolor` or CSS, with sized
`<div>`/`<span>` boxes, or with the block characters U+2588 (full),
U+2580 (upper half) and U+2584 (lower half) in text or `<pre>`. Image
scanners never see such a code. This module reads the module grid back from
the markup without a layout engine and returns it as a bitmap (`Grid`),
which the worker scales up and hands to the QR cascade (`decoders.render`).

Supported layouts:
- tables: one `<td>`/`<th>` per module (with `colspan`), coloured by the
  `bgcolor` attribute, an inline `background`/`background-color` style, or
  a class whose `.name { background... }` rule is in a `<style>` element;
- div grids: a container of rows whose children carry a colour and a width
  in px (a wider box is several modules); a single container whose
  coloured children wrap at the container's px width or at
  `grid-template-columns: repeat(N, ...)`; and absolutely positioned boxes
  with `left`/`top`/`width`/`height` in px;
- text blocks: lines of block characters and spaces, one character a
  column and two rows (a character cell is about twice as tall as wide).

NOTE: grids whose colours or positions come from selectors that need a
CSS engine (`:nth-child()`, `grid-area` in a stylesheet, box-shadow
pixel art) are not rebuilt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from bs4 import BeautifulSoup
from bs4.element import Tag

# A QR code version 1 has 21 modules per side; the largest, version 40,
# has 177. Micro QR codes (11 to 17) are too rare in mail to search for.
MIN_MODULES = 21
MAX_MODULES = 200

# Grids searched per document; hostile markup may hold thousands of tables.
MAX_GRIDS = 20
# Elements looked at as grid containers or cells, bounding the work.
MAX_ELEMENTS = 200_000

# Each rebuilt grid must have both colours in at least this share of its
# modules; a QR code is close to half dark.
MIN_COLOUR_SHARE = 0.2

FULL_BLOCK = "\u2588"
UPPER_HALF = "\u2580"
LOWER_HALF = "\u2584"
_BLOCKS = FULL_BLOCK + UPPER_HALF + LOWER_HALF
# Characters that draw a light module in block text.
_BLANKS = " \u00a0\u2003\u2002\u3000"
_LINE_BREAK = "\u2029"

_HEX = re.compile(r"^#([0-9a-f]{3,4}|[0-9a-f]{6}|[0-9a-f]{8})$")
_RGB = re.compile(r"^rgba?\(\s*([\d.]+%?)\s*[, ]\s*([\d.]+%?)\s*[, ]\s*([\d.]+%?)")
_BACKGROUND = re.compile(r"background(?:-color)?\s*:\s*([^;]+)", re.IGNORECASE)
_PX = {name: re.compile(rf"(?:^|[;\s]){name}\s*:\s*(-?[\d.]+)px", re.IGNORECASE)
       for name in ("width", "height", "left", "top")}
_REPEAT_COLUMNS = re.compile(r"grid-template-columns\s*:\s*repeat\(\s*(\d+)", re.IGNORECASE)
_CLASS_RULE = re.compile(r"((?:[\w-]*\.[\w-]+\s*,?\s*)+)\{([^{}]*)\}")
_CLASS_NAME = re.compile(r"\.([\w-]+)")

_NAMED_COLOURS = {
    "black": 0.0, "white": 1.0, "navy": 0.05, "darkblue": 0.05, "maroon": 0.1, "darkgreen": 0.2,
    "green": 0.3, "purple": 0.2, "darkred": 0.1, "blue": 0.07, "red": 0.21, "gray": 0.5, "grey": 0.5,
    "silver": 0.75, "lightgray": 0.83, "lightgrey": 0.83, "yellow": 0.93, "transparent": None,
}


@dataclass(frozen=True)
class Grid:
    """A rebuilt module grid: `rows` of booleans, True for a dark module, and how it was drawn."""

    rows: tuple[tuple[bool, ...], ...]
    hidden_as: str

    def to_pbm(self) -> bytes:
        """Encode as a binary PBM (Netpbm P4: 1 is black, rows padded to whole bytes)."""
        width, height = len(self.rows[0]), len(self.rows)
        body = bytearray()
        for row in self.rows:
            for start in range(0, width, 8):
                byte = 0
                for bit, dark in enumerate(row[start:start + 8]):
                    if dark:
                        byte |= 0x80 >> bit
                body.append(byte)
        return f"P4\n{width} {height}\n".encode("ascii") + bytes(body)


def find_html_grids(soup: BeautifulSoup) -> list[Grid]:
    """Return the module grids drawn with tables, div grids and block characters in a document."""
    class_colours = _class_colours(soup)
    grids: list[Grid] = []
    for table in soup.find_all("table", limit=MAX_ELEMENTS):
        grid = _table_grid(table, class_colours)
        if grid is not None:
            grids.append(grid)
        if len(grids) >= MAX_GRIDS:
            return grids

    grids.extend(_div_grids(soup, class_colours)[: MAX_GRIDS - len(grids)])
    if any(block in soup.get_text() for block in _BLOCKS):
        for text in _block_texts(soup):
            grids.extend(find_text_grids(text))
    # A `<pre>` is read alone and again within the body text.
    return list({grid.rows: grid for grid in grids}.values())[:MAX_GRIDS]


def find_text_grids(text: str) -> list[Grid]:
    """Return the module grids drawn with block characters in plain text."""
    if not any(block in text for block in _BLOCKS):
        return []

    grids: list[Grid] = []
    run: list[str] = []
    for line in [*text.splitlines(), ""]:
        stripped = line.rstrip()
        if stripped and all(char in _BLOCKS or char in _BLANKS for char in stripped):
            run.append(stripped)
            continue
        if len(run) >= MIN_MODULES // 2:
            grids.extend(_block_grids(run))
        run = []
        if len(grids) >= MAX_GRIDS:
            break
    return grids[:MAX_GRIDS]


def _block_grids(lines: list[str]) -> list[Grid]:
    # The common indentation is the quiet zone's left edge, not data.
    indent = min(len(line) - len(line.lstrip(_BLANKS)) for line in lines)
    lines = [line[indent:] for line in lines]
    width = max(len(line) for line in lines)
    if width > MAX_MODULES * 2:
        return []

    rows: list[tuple[bool, ...]] = []
    for line in lines:
        padded = line.ljust(width)
        upper = tuple(char in (FULL_BLOCK, UPPER_HALF) for char in padded)
        lower = tuple(char in (FULL_BLOCK, LOWER_HALF) for char in padded)
        rows.extend((upper, lower))

    grids = [Grid(tuple(rows), "text-blocks")]
    # Codes drawn with full blocks only use one line per module row, often
    # two characters per module; both readings are tried.
    if not any(char in line for line in lines for char in (UPPER_HALF, LOWER_HALF)):
        grids.append(Grid(tuple(rows[::2]), "text-blocks"))
    return [grid for grid in grids if _plausible(grid.rows)]


def _block_texts(soup: BeautifulSoup) -> list[str]:
    """Return the text of each `<pre>` and of the body with `<br>` and block ends as line breaks."""
    texts = [pre.get_text() for pre in soup.find_all("pre")]
    copy = BeautifulSoup(str(soup), "lxml")
    for element in copy.find_all(["br", "p", "div", "tr", "li"]):
        element.insert_after(_LINE_BREAK)
    # Outside <pre>, HTML shows a source line break as a space and drops
    # ordinary spaces at the start of a line; no-break spaces stay.
    lines = copy.get_text().replace("\n", " ").split(_LINE_BREAK)
    texts.append("\n".join(line.lstrip(" \t") for line in lines))
    return texts


def _table_grid(table: Tag, class_colours: dict[str, bool]) -> Grid | None:
    rows = [row for row in table.find_all("tr") if row.find_parent("table") is table]
    if not MIN_MODULES <= len(rows) <= MAX_MODULES:
        return None

    default = _colour_of(table, class_colours) or False
    matrix: list[tuple[bool, ...]] = []
    for row in rows:
        row_default = _colour_of(row, class_colours)
        cells: list[bool] = []
        for cell in row.find_all(("td", "th"), recursive=False):
            dark = _colour_of(cell, class_colours)
            if dark is None:
                dark = row_default if row_default is not None else default
            cells.extend([dark] * _span(cell))
            if len(cells) > MAX_MODULES:
                return None
        matrix.append(tuple(cells))
    return _square_grid(matrix, "html-grid")


def _div_grids(soup: BeautifulSoup, class_colours: dict[str, bool]) -> list[Grid]:
    grids: list[Grid] = []
    for container in soup.find_all(("div", "span", "td", "body", "section", "p"), limit=MAX_ELEMENTS):
        children = [child for child in container.children if isinstance(child, Tag)]
        if len(children) < MIN_MODULES:
            continue
        grid = (
            _row_grid(children, class_colours)
            or _wrapped_grid(container, children, class_colours)
            or _positioned_grid(children, class_colours)
        )
        if grid is not None:
            grids.append(grid)
            if len(grids) >= MAX_GRIDS:
                break
    return grids


def _row_grid(rows: list[Tag], class_colours: dict[str, bool]) -> Grid | None:
    """Read a container of row elements, each holding sized and coloured boxes."""
    if len(rows) > MAX_MODULES:
        return None
    row_boxes = [[child for child in row.children if isinstance(child, Tag)] for row in rows]
    widths = [_px(box, "width") for boxes in row_boxes for box in boxes]
    known = [width for width in widths if width and width > 0]
    if not known:
        return None
    unit = min(known)

    matrix: list[tuple[bool, ...]] = []
    for boxes in row_boxes:
        cells: list[bool] = []
        for box in boxes:
            dark = _colour_of(box, class_colours)
            width = _px(box, "width")
            if dark is None or not width:
                return None
            cells.extend([dark] * max(1, round(width / unit)))
            if len(cells) > MAX_MODULES:
                return None
        matrix.append(tuple(cells))
    return _square_grid(matrix, "html-grid")


def _wrapped_grid(container: Tag, boxes: list[Tag], class_colours: dict[str, bool]) -> Grid | None:
    """Read coloured boxes that wrap into rows at the container's width or column count."""
    style = _attribute(container, "style")
    repeat = _REPEAT_COLUMNS.search(style)
    if repeat:
        columns = int(repeat.group(1))
    else:
        container_width = _px(container, "width")
        box_width = _px(boxes[0], "width")
        if not container_width or not box_width:
            return None
        columns = int(container_width // box_width)
    if not MIN_MODULES <= columns <= MAX_MODULES or len(boxes) % columns:
        return None

    colours = [_colour_of(box, class_colours) for box in boxes]
    if any(colour is None for colour in colours):
        return None
    matrix = [tuple(colours[start:start + columns]) for start in range(0, len(colours), columns)]
    return _square_grid(matrix, "html-grid")  # type: ignore[arg-type]


def _positioned_grid(boxes: list[Tag], class_colours: dict[str, bool]) -> Grid | None:
    """Rasterise absolutely positioned dark boxes given in px."""
    rectangles = []
    for box in boxes:
        if _colour_of(box, class_colours) is not True:
            continue
        left, top = _px(box, "left"), _px(box, "top")
        width, height = _px(box, "width"), _px(box, "height")
        if None in (left, top, width, height) or not width or not height:
            continue
        rectangles.append((left, top, width, height))
    if len(rectangles) < MIN_MODULES:
        return None

    unit = min(min(rect[2], rect[3]) for rect in rectangles)
    origin_x = min(rect[0] for rect in rectangles)
    origin_y = min(rect[1] for rect in rectangles)
    columns = round((max(rect[0] + rect[2] for rect in rectangles) - origin_x) / unit)
    rows = round((max(rect[1] + rect[3] for rect in rectangles) - origin_y) / unit)
    if not (MIN_MODULES <= columns <= MAX_MODULES and MIN_MODULES <= rows <= MAX_MODULES):
        return None

    matrix = [[False] * columns for _ in range(rows)]
    for left, top, width, height in rectangles:
        first_column, first_row = round((left - origin_x) / unit), round((top - origin_y) / unit)
        for row in range(first_row, min(rows, first_row + max(1, round(height / unit)))):
            for column in range(first_column, min(columns, first_column + max(1, round(width / unit)))):
                matrix[row][column] = True
    return _square_grid([tuple(row) for row in matrix], "html-grid")


def _square_grid(matrix: list[tuple[bool, ...]], hidden_as: str) -> Grid | None:
    if not matrix:
        return None
    width = max(len(row) for row in matrix)
    if not MIN_MODULES <= width <= MAX_MODULES:
        return None
    # Rows shorter than the longest (a missing trailing cell) are padded light.
    rows = tuple(row + (False,) * (width - len(row)) for row in matrix)
    if not _plausible(rows):
        return None
    return Grid(rows, hidden_as)


def _plausible(rows: tuple[tuple[bool, ...], ...]) -> bool:
    if len(rows) < MIN_MODULES or not rows or len(rows[0]) < MIN_MODULES:
        return False
    total = len(rows) * len(rows[0])
    dark = sum(sum(row) for row in rows)
    return MIN_COLOUR_SHARE <= dark / total <= 1 - MIN_COLOUR_SHARE


def _class_colours(soup: BeautifulSoup) -> dict[str, bool]:
    """Map class names to dark (True) or light (False) from `.name { background: ... }` rules."""
    colours: dict[str, bool] = {}
    for style in soup.find_all("style"):
        for selectors, body in _CLASS_RULE.findall(style.get_text()[:200_000]):
            dark = _background_dark(body)
            if dark is None:
                continue
            for name in _CLASS_NAME.findall(selectors):
                colours[name] = dark
    return colours


def _colour_of(tag: Tag, class_colours: dict[str, bool]) -> bool | None:
    """Tell whether `tag` paints a dark (True) or light (False) background, or None when it sets none."""
    dark = _background_dark(_attribute(tag, "style"))
    if dark is not None:
        return dark
    bgcolor = _attribute(tag, "bgcolor")
    if bgcolor:
        dark = _is_dark(bgcolor)
        if dark is not None:
            return dark
    for name in _attribute(tag, "class").split():
        if name in class_colours:
            return class_colours[name]
    return None


def _background_dark(css: str) -> bool | None:
    found = None
    for match in _BACKGROUND.finditer(css):
        # The last declaration wins, as in CSS; a `background` shorthand
        # may list an image or position before the colour.
        for word in reversed(match.group(1).replace("!important", "").split()):
            dark = _is_dark(word)
            if dark is not None:
                found = dark
                break
    return found


def _is_dark(value: str) -> bool | None:
    luminance = _luminance(value.strip().lower().rstrip(";"))
    return None if luminance is None else luminance < 0.5


def _luminance(value: str) -> float | None:
    """Return the relative luminance (0 black to 1 white) of a CSS or HTML colour, or None."""
    match = _HEX.match(value)
    if match:
        digits = match.group(1)
        if len(digits) in (3, 4):
            digits = "".join(char * 2 for char in digits[:3])
        red, green, blue = (int(digits[index:index + 2], 16) / 255 for index in (0, 2, 4))
        return 0.2126 * red + 0.7152 * green + 0.0722 * blue

    match = _RGB.match(value)
    if match:
        channels = []
        for text in match.groups():
            number = float(text.rstrip("%"))
            channels.append(number / 100 if text.endswith("%") else number / 255)
        red, green, blue = channels
        return 0.2126 * red + 0.7152 * green + 0.0722 * blue

    # HTML's legacy colour parsing reads bgcolor="000000" without the "#".
    if re.fullmatch(r"[0-9a-f]{6}", value):
        return _luminance("#" + value)
    return _NAMED_COLOURS.get(value)


def _span(cell: Tag) -> int:
    try:
        return max(1, min(MAX_MODULES, int(_attribute(cell, "colspan") or 1)))
    except ValueError:
        return 1


def _px(tag: Tag, name: str) -> float | None:
    match = _PX[name].search(_attribute(tag, "style"))
    if match:
        return float(match.group(1))
    if name in ("width", "height"):
        value = _attribute(tag, name).removesuffix("px")
        try:
            return float(value) if value else None
        except ValueError:
            return None
    return None


def _attribute(tag: Tag, name: str) -> str:
    value = tag.get(name)
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(value)
    return value.strip()


# Split layouts searched per document, and images per layout.
MAX_SPLIT_LAYOUTS = 5
MAX_SPLIT_IMAGES = 16


def find_split_layouts(soup: BeautifulSoup) -> list[list[list[str]]]:
    """Return image grids that may be one picture cut into pieces: rows of `src` values.

    Two layouts count: a table whose cells each hold one image and no text,
    and an element whose children are only images and `<br>` line breaks.
    Only `data:` and `cid:` sources are kept, since nothing is fetched.
    """
    layouts: list[list[list[str]]] = []
    for table in soup.find_all("table", limit=MAX_ELEMENTS):
        layout = _table_images(table)
        if layout:
            layouts.append(layout)
    for container in soup.find_all(("div", "p", "td", "span", "center", "body"), limit=MAX_ELEMENTS):
        layout = _inline_images(container)
        if layout:
            layouts.append(layout)
        if len(layouts) >= MAX_SPLIT_LAYOUTS:
            break
    return layouts[:MAX_SPLIT_LAYOUTS]


def _image_source(tag: Tag) -> str | None:
    source = _attribute(tag, "src")
    return source if source[:5].lower() == "data:" or source[:4].lower() == "cid:" else None


def _table_images(table: Tag) -> list[list[str]] | None:
    rows: list[list[str]] = []
    for row in table.find_all("tr"):
        if row.find_parent("table") is not table:
            continue
        sources: list[str] = []
        for cell in row.find_all(("td", "th"), recursive=False):
            images = cell.find_all("img")
            if not images and not cell.get_text(strip=True):
                continue
            if len(images) != 1 or cell.get_text(strip=True):
                return None
            source = _image_source(images[0])
            if source is None:
                return None
            sources.append(source)
        if sources:
            rows.append(sources)
    return _usable_layout(rows)


def _inline_images(container: Tag) -> list[list[str]] | None:
    rows: list[list[str]] = [[]]
    for child in container.children:
        if isinstance(child, Tag):
            if child.name == "br":
                rows.append([])
                continue
            if child.name != "img":
                return None
            source = _image_source(child)
            if source is None:
                return None
            rows[-1].append(source)
        elif str(child).strip():
            return None
    return _usable_layout([row for row in rows if row])


def _usable_layout(rows: list[list[str]]) -> list[list[str]] | None:
    count = sum(len(row) for row in rows)
    if count < 2 or count > MAX_SPLIT_IMAGES:
        return None
    return rows


def pack_split(rows: list[list[bytes]]) -> bytes:
    """Pack the images of a split layout into one task payload: a JSON header line, then the bytes."""
    header = json.dumps([[len(image) for image in row] for row in rows]).encode("ascii")
    return header + b"\n" + b"".join(image for row in rows for image in row)


def unpack_split(data: bytes) -> list[list[bytes]]:
    """Reverse `pack_split`; raise ValueError on a malformed payload."""
    header, _, body = data.partition(b"\n")
    sizes = json.loads(header)
    rows: list[list[bytes]] = []
    offset = 0
    for row in sizes:
        images = []
        for size in row:
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise ValueError("split payload shorter than its header")
            images.append(body[offset:offset + size])
            offset += size
        rows.append(images)
    return rows
