"""A small sample corpus generated on the spot (no downloads): text PDFs and images, plus
a few broken files, so the demo shows both page rows and error rows."""

from __future__ import annotations

import io
import os


def _page(lines: list[str], size=(850, 1100), color=(255, 255, 255)):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(img)
    y = 60
    for line in lines:
        draw.text((60, y), line, fill=(0, 0, 0))
        y += 28
    draw.rectangle((60, y + 20, size[0] - 60, y + 220), outline=(30, 60, 200), width=4)
    return img


def make_sample_corpus(folder: str, with_broken: bool = True) -> list[str]:
    """Write the sample corpus; returns the files written (relative paths)."""
    os.makedirs(os.path.join(folder, "reports", "2023"), exist_ok=True)
    os.makedirs(os.path.join(folder, "scans"), exist_ok=True)
    written = []

    pages = [_page([f"Annual report 2023 - page {i}", "Revenue grew 12% to 4.2 billion.",
                    "Operating margin: 18%.", f"Section {i}: outlook and risks."]) for i in range(1, 4)]
    path = os.path.join(folder, "reports", "2023", "annual.pdf")
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=100.0)
    written.append("reports/2023/annual.pdf")

    path = os.path.join(folder, "reports", "invoice.pdf")
    _page(["INVOICE 0042", "Total due: 1,250.00 EUR", "Due date: 2026-12-01"]).save(path, resolution=100.0)
    written.append("reports/invoice.pdf")

    _page(["Scanned letter", "Dear customer,"], size=(1240, 1754)).save(os.path.join(folder, "scans", "letter.png"))
    written.append("scans/letter.png")
    _page(["Receipt", "Coffee 3.50"], size=(600, 900)).save(os.path.join(folder, "scans", "receipt.jpg"), quality=90)
    written.append("scans/receipt.jpg")
    frames = [_page([f"Fax page {i}"], size=(800, 1000)).convert("L") for i in (1, 2)]
    frames[0].save(os.path.join(folder, "scans", "fax.tiff"), save_all=True, append_images=frames[1:])
    written.append("scans/fax.tiff")

    if with_broken:
        with open(os.path.join(folder, "reports", "truncated.pdf"), "wb") as f:
            buf = io.BytesIO()
            _page(["truncated"]).save(buf, format="PDF")
            f.write(buf.getvalue()[:200])
        written.append("reports/truncated.pdf")
        open(os.path.join(folder, "scans", "empty.png"), "wb").close()
        written.append("scans/empty.png")
    return written


# Queries about the sample corpus and their judgements (2: the page answers it, 1: related),
# naming pages by the page_ids the embedding job gives the files above. With the demo's tiny
# random model the ranking is arbitrary: they exist to show the plumbing end to end.
SAMPLE_QUERIES = {
    "q-revenue": "How much did revenue grow in 2023?",
    "q-invoice": "What is the total due on invoice 0042?",
    "q-fax": "fax pages",
    "q-receipt": "How much was the coffee?",
    "q-letter": "letter to a customer",
}
SAMPLE_QRELS = [
    ("q-revenue", "reports/2023/annual.pdf#1", 2),
    ("q-revenue", "reports/2023/annual.pdf#2", 1),
    ("q-revenue", "reports/2023/annual.pdf#3", 1),
    ("q-invoice", "reports/invoice.pdf#1", 2),
    ("q-fax", "scans/fax.tiff#1", 2),
    ("q-fax", "scans/fax.tiff#2", 2),
    ("q-receipt", "scans/receipt.jpg#1", 2),
    ("q-letter", "scans/letter.png#1", 2),
]


def write_sample_queries(path: str) -> str:
    """``SAMPLE_QUERIES`` as a queries file (.jsonl: query_id, text)."""
    import json

    with open(path, "w", encoding="utf-8") as f:
        for qid, text in SAMPLE_QUERIES.items():
            f.write(json.dumps({"query_id": qid, "text": text}) + "\n")
    return path


def write_sample_qrels(path: str) -> str:
    """``SAMPLE_QRELS`` as TREC qrels (``qid 0 page_id rel``)."""
    from pipeline.schema import trec_id

    with open(path, "w", encoding="utf-8") as f:
        for qid, page, rel in SAMPLE_QRELS:
            f.write(f"{qid} 0 {trec_id(page)} {rel}\n")
    return path
