"""Every hiding place of a QR code: found through the structure stage and the worker tasks, with
look-alikes that must yield no payload."""

from __future__ import annotations

import base64
import io
import zipfile

import pymupdf
import pytest
import segno
from decoder_inputs import leaf, message, multipart, qr_png
from PIL import Image

from quishguard.decoders import TASKS
from quishguard.decoders.generators import DEFAULT_QR_GENERATORS, generator_payload, parse_generator
from quishguard.decoders.grids import find_html_grids, find_text_grids
from quishguard.decoders.structure import analyse_structure
from quishguard.model import DecodeTask, ScanLimits

LIMITS = ScanLimits(qr_generators=DEFAULT_QR_GENERATORS)
URL = "https://hidden.example.test/login?id=7"


def matrix(payload: str = URL) -> list[list[bool]]:
    return [[bool(dark) for dark in row] for row in segno.make(payload, micro=False).matrix]


def table_markup(style: str = "bgcolor") -> str:
    rows = []
    for row in matrix():
        cells = []
        for dark in row:
            colour = "#000000" if dark else "#ffffff"
            if style == "bgcolor":
                cells.append(f'<td bgcolor="{colour}" width="4" height="4"></td>')
            elif style == "class":
                cells.append(f'<td class="{"k" if dark else "w"}"></td>')
            else:
                cells.append(f'<td style="width:4px;height:4px;background-color:{colour}"></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    css = "<style>td.k{background:#111} .w{background-color:white}</style>" if style == "class" else ""
    return f'{css}<table cellpadding="0" cellspacing="0">{"".join(rows)}</table>'


def div_rows_markup() -> str:
    rows = []
    for row in matrix():
        boxes = "".join(
            f'<span style="display:inline-block;width:3px;height:3px;background:{"black" if dark else "#fff"}"></span>'
            for dark in row)
        rows.append(f'<div style="height:3px;line-height:0">{boxes}</div>')
    return "<div>" + "".join(rows) + "</div>"


def div_wrapped_markup() -> str:
    grid = matrix()
    boxes = "".join(f'<div style="width:5px;height:5px;background:{"#000" if dark else "#fff"}"></div>'
                    for row in grid for dark in row)
    return f'<div style="display:grid;grid-template-columns:repeat({len(grid)}, 5px)">{boxes}</div>'


def div_positioned_markup() -> str:
    boxes = []
    for y, row in enumerate(matrix()):
        for x, dark in enumerate(row):
            if dark:
                boxes.append(f'<div style="position:absolute;left:{x * 4}px;top:{y * 4}px;width:4px;height:4px;'
                             'background:#000"></div>')
    return '<div style="position:relative">' + "".join(boxes) + "</div>"


def half_block_text(payload: str = URL) -> str:
    buffer = io.StringIO()
    segno.make(payload, micro=False).terminal(out=buffer, compact=True)
    return buffer.getvalue()


def full_block_text(payload: str = URL, blank: str = " ") -> str:
    lines = ["".join("\u2588\u2588" if dark else blank * 2 for dark in row) for row in matrix(payload)]
    return "\n".join(lines)


def svg_markup(payload: str = URL) -> str:
    buffer = io.BytesIO()
    segno.make(payload, micro=False).save(buffer, kind="svg", scale=3)
    return buffer.getvalue().decode("utf-8").split("?>", 1)[1]


def rect_svg_markup(payload: str = URL) -> str:
    rects = "".join(f'<rect x="{x}" y="{y}" width="1" height="1" fill="#000"/>'
                    for y, row in enumerate(matrix(payload)) for x, dark in enumerate(row) if dark)
    return f'<svg viewBox="-4 -4 {len(matrix()) + 8} {len(matrix()) + 8}" width="200" height="200">{rects}</svg>'


def png_tiles(columns: int, rows: int) -> list[list[bytes]]:
    image = Image.open(io.BytesIO(qr_png(URL, scale=6))).convert("L")
    width, height = image.size
    tiles = []
    for row in range(rows):
        line = []
        for column in range(columns):
            box = (column * width // columns, row * height // rows,
                   (column + 1) * width // columns, (row + 1) * height // rows)
            buffer = io.BytesIO()
            image.crop(box).save(buffer, "PNG")
            line.append(buffer.getvalue())
        tiles.append(line)
    return tiles


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def split_table_markup(columns: int, rows: int) -> str:
    body = "".join("<tr>" + "".join(f'<td><img src="{data_uri(tile)}"></td>' for tile in line) + "</tr>"
                   for line in png_tiles(columns, rows))
    return f'<table cellspacing="0" cellpadding="0">{body}</table>'


def split_inline_markup() -> str:
    lines = png_tiles(1, 2)
    return f'<p><img src="{data_uri(lines[0][0])}"><br><img src="{data_uri(lines[1][0])}"></p>'


def css_markup() -> str:
    return f'<div style="width:200px;height:200px;background-image:url(\'{data_uri(qr_png(URL))}\')"></div>'


def style_markup() -> str:
    return f'<style>.hero {{ background: #fff url({data_uri(qr_png(URL))}) no-repeat; }}</style><div class="hero"></div>'


def srcset_markup() -> str:
    return f'<img srcset="{data_uri(qr_png(URL))} 2x" alt="">'


def zip_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def decode_message(raw: bytes) -> list[tuple[str, str]]:
    """Run the structure stage and every task in this process; return (payload, hidden_as) pairs."""
    facts, tasks = analyse_structure(raw, LIMITS)
    found = [(code.payload, code.hidden_as) for code in facts.qr_codes]
    for task in tasks:
        found.extend((code.payload, code.hidden_as) for code in TASKS[task.kind](task, LIMITS).qr_codes)
    return found


def html_message(markup: str) -> bytes:
    return message(leaf("text/html", f"<html><body><p>Scan to sign in</p>{markup}</body></html>", charset="utf-8"))


@pytest.mark.parametrize(
    ("case", "markup", "hidden_as"),
    [
        ("table bgcolor", table_markup("bgcolor"), "html-grid"),
        ("table inline style", table_markup("style"), "html-grid"),
        ("table style classes", table_markup("class"), "html-grid"),
        ("div rows", div_rows_markup(), "html-grid"),
        ("div css grid", div_wrapped_markup(), "html-grid"),
        ("div absolute", div_positioned_markup(), "html-grid"),
        ("pre half blocks", f"<pre>{half_block_text()}</pre>", "text-blocks"),
        ("br full blocks", full_block_text(blank="&nbsp;").replace("\n", "<br>\n"), "text-blocks"),
        ("inline svg path", svg_markup(), "svg"),
        ("inline svg rects", rect_svg_markup(), "svg"),
        ("split side by side", split_table_markup(2, 1), "split"),
        ("split four tiles", split_table_markup(2, 2), "split"),
        ("split stacked inline", split_inline_markup(), "split"),
        ("css inline background", css_markup(), "css-background"),
        ("css style element", style_markup(), "css-background"),
        ("img srcset", srcset_markup(), "data-uri"),
        ("generator qrserver", '<img src="https://api.qrserver.com/v1/create-qr-code/?size=150x150&data='
                               'https%3A%2F%2Fhidden.example.test%2Flogin%3Fid%3D7">', "generator-url"),
        ("generator google chart", '<img src="https://chart.googleapis.com/chart?cht=qr&chs=200x200&chl='
                                   'https://hidden.example.test/login?id%3D7">', "generator-url"),
        ("generator quickchart", '<div style="background:url(https://quickchart.io/qr?text=https%3A%2F%2F'
                                 'hidden.example.test%2Flogin%3Fid%3D7)"></div>', "generator-url"),
    ],
)
def test_html_hiding_place_decoded(case, markup, hidden_as):
    found = decode_message(html_message(markup))

    assert (URL, hidden_as) in found


@pytest.mark.parametrize(
    ("case", "markup"),
    [
        ("checkerboard table", "<table>" + "".join(
            "<tr>" + "".join(f'<td bgcolor="{"#000" if (x + y) % 2 else "#fff"}"></td>' for x in range(29)) + "</tr>"
            for y in range(29)) + "</table>"),
        ("layout table", "<table>" + "<tr><td>Name</td><td>Amount</td></tr>" * 30 + "</table>"),
        ("block bar chart", "<pre>" + "\n".join("\u2588" * width for width in range(1, 30)) + "</pre>"),
        ("newsletter images", '<table><tr><td><img src="cid:logo"></td><td><img src="cid:banner"></td></tr></table>'),
        ("chart not qr", '<img src="https://chart.googleapis.com/chart?cht=p3&chl=Hello|World">'),
        ("remote image", '<img src="https://cdn.example.test/qr.png?data=https://x.test">'),
    ],
)
def test_html_lookalike_no_payload(case, markup):
    assert decode_message(html_message(markup)) == []


def test_text_plain_blocks_decoded():
    raw = message(leaf("text/plain", f"Scan with your phone:\n\n{half_block_text()}\nThanks", charset="utf-8"))

    assert decode_message(raw) == [(URL, "text-blocks")]


def test_grid_css_engine_gap():
    # Colours given by :nth-child() need a CSS engine; this gap is known and documented.
    cells = "".join("<td></td>" for _ in range(25))
    markup = ("<style>td:nth-child(2n){background:#000}</style><table>" + f"<tr>{cells}</tr>" * 25 + "</table>")

    assert find_html_grids(_soup(markup)) == []


def test_text_grids_need_whole_code():
    assert find_text_grids("\u2588\u2588\u2588 loading \u2588\u2588\u2588") == []


@pytest.mark.parametrize(
    ("filename", "content_type", "member", "hidden_as"),
    [
        ("scan.zip", "application/zip", "docs/scan.png", "archive"),
        ("invoice.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
         "word/media/image1.png", "office"),
        ("sheet.xlsx", "application/octet-stream", "xl/media/image1.png", "office"),
        ("slides.pptx", "application/octet-stream", "ppt/media/image2.png", "office"),
    ],
)
def test_archive_member_image_decoded(filename, content_type, member, hidden_as):
    raw = message(multipart("mixed", leaf("text/plain", "see attached"),
                            leaf(content_type, zip_of(member, qr_png(URL)), filename=filename)))

    assert decode_message(raw) == [(URL, hidden_as)]


def test_archive_nested_zip_pdf_decoded():
    pdf = pymupdf.open()
    page = pdf.new_page()
    page.insert_image(pymupdf.Rect(72, 72, 272, 272), stream=qr_png(URL))
    inner = zip_of("statement.pdf", pdf.tobytes())
    raw = message(multipart("mixed", leaf("text/plain", "x"),
                            leaf("application/zip", zip_of("inner.zip", inner), filename="outer.zip")))

    assert (URL, "pdf-image") in decode_message(raw)


def test_archive_bomb_ratio_limited():
    bomb = zip_of("fill.bin", b"\0" * 5_000_000)
    partial = TASKS["archive"](DecodeTask("archive", bomb, "message > part 2", "archive"), LIMITS)

    assert partial.qr_codes == []
    assert [problem.kind for problem in partial.problems] == ["limit"]
    assert "compressed more than" in partial.problems[0].reason


def test_archive_depth_limited():
    data = zip_of("qr.png", qr_png(URL))
    for level in range(4):
        data = zip_of(f"level{level}.zip", data)
    partial = TASKS["archive"](DecodeTask("archive", data, "message > part 2", "archive"), LIMITS)

    assert partial.qr_codes == []
    assert any("nested deeper" in problem.reason for problem in partial.problems)


def test_archive_garbage_incomplete():
    partial = TASKS["archive"](DecodeTask("archive", b"PK\x03\x04garbage", "message > part 2", "archive"), LIMITS)

    assert [problem.kind for problem in partial.problems] == ["incomplete"]


def test_svg_attachment_decoded():
    raw = message(multipart("mixed", leaf("text/plain", "fax"),
                            leaf("image/svg+xml", svg_markup(), filename="fax.svg")))

    assert (URL, "svg") in decode_message(raw)


def test_svg_external_image_not_loaded(tmp_path):
    # MuPDF must ignore every non-data: image reference, local files included.
    png = tmp_path / "qr.png"
    png.write_bytes(qr_png(URL))
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
           f'width="300" height="300"><image width="300" height="300" xlink:href="file://{png}"/>'
           f'<image width="300" height="300" href="{png}"/></svg>')
    partial = TASKS["svg"](DecodeTask("svg", svg.encode(), "message > part 2", "svg"), LIMITS)

    assert partial.qr_codes == []


def test_nested_message_grid_hidden_as():
    inner = html_message(table_markup())
    raw = message(multipart("mixed", leaf("text/plain", "fwd"), "Content-Type: message/rfc822\r\n\r\n"
                            + inner.decode("utf-8")))

    assert decode_message(raw) == [(URL, "nested-message")]


def test_pdf_launch_action_link():
    document = pymupdf.open()
    page = document.new_page()
    page.insert_link({"kind": pymupdf.LINK_LAUNCH, "from": pymupdf.Rect(10, 10, 100, 40), "file": "payload.exe"})
    partial = TASKS["pdf"](DecodeTask("pdf", document.tobytes(), "message > part 2", "attachment"), LIMITS)

    assert [(link.url, link.source) for link in partial.links] == [("payload.exe", "pdf-launch")]


def test_pdf_small_embedded_image_decoded():
    # Drawn at 0.4 inch, the code's modules blur in a 150 dpi render; the stored image keeps them.
    document = pymupdf.open()
    page = document.new_page()
    page.insert_image(pymupdf.Rect(72, 72, 101, 101), stream=qr_png(URL, scale=8))
    partial = TASKS["pdf"](DecodeTask("pdf", document.tobytes(), "message > part 2", "attachment"), LIMITS)

    assert URL in [code.payload for code in partial.qr_codes]


@pytest.mark.parametrize(
    ("url", "payload"),
    [
        ("https://api.qrserver.com/v1/create-qr-code/?data=WIFI%3AS%3AGuest%3B%3B", "WIFI:S:Guest;;"),
        ("https://www.chart.googleapis.com/chart?chl=x&cht=qr", "x"),
        ("//quickchart.io/qr?text=hello&size=200", "hello"),
        ("https://chart.googleapis.com/chart?cht=bvs&chl=x", None),
        ("https://api.qrserver.com.evil.test/v1/create-qr-code/?data=x", None),
        ("https://api.qrserver.com/v1/read-qr-code/?fileurl=x", None),
        ("ftp://api.qrserver.com/v1/create-qr-code/?data=x", None),
    ],
)
def test_generator_payload_cases(url, payload):
    assert generator_payload(url, DEFAULT_QR_GENERATORS) == payload


@pytest.mark.parametrize("entry", ["api.qrserver.com", "?data", "host/path?data&cht"])
def test_generator_entry_invalid(entry):
    with pytest.raises(ValueError, match="host/path"):
        parse_generator(entry)


def _soup(markup: str):
    from bs4 import BeautifulSoup

    return BeautifulSoup(markup, "lxml")
