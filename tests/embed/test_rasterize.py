"""Rendering and decoding: sizes meet the token budget, every bad input becomes an error
item with a clear reason, and a hung or crashed renderer never stalls the caller."""

from __future__ import annotations

import io
import os

import numpy as np
import pypdfium2 as pdfium
import pytest
from PIL import Image

from pipeline.embed.renderer import Renderer
from pipeline.embed.rasterize import (
    DocInfo,
    ErrorItem,
    PageItem,
    RenderSpec,
    iter_document,
    model_grid_size,
    pdf_scale,
    smart_resize,
)

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
SPEC = RenderSpec(max_visual_tokens=768)


def read(name: str) -> bytes:
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


def items(data: bytes, spec: RenderSpec = SPEC, skip=frozenset()):
    out = list(iter_document(data, spec, skip))
    pages = [i for i in out if isinstance(i, PageItem)]
    errors = [i for i in out if isinstance(i, ErrorItem)]
    info = [i for i in out if isinstance(i, DocInfo)]
    return info, pages, errors


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_pdf(pages: int = 2, size=(850, 1100)) -> bytes:
    imgs = [Image.new("RGB", size, (255, 255, 255 - 40 * i)) for i in range(pages)]
    return encode(imgs[0], "PDF", save_all=True, append_images=imgs[1:], resolution=100.0)


ZERO_PAGE_PDF = (  # well-formed, with an xref table, and an empty page tree
    b"%PDF-1.4\n1 0 obj\n<</Type/Catalog/Pages 2 0 R>>\nendobj\n2 0 obj\n<</Type/Pages/Kids[]/Count 0>>\nendobj\n"
    b"xref\n0 3\n0000000000 65535 f \n0000000009 00000 n \n0000000054 00000 n \ntrailer\n<</Size 3/Root 1 0 R>>\n"
    b"startxref\n100\n%%EOF\n"
)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    rng = np.random.default_rng(0)
    for h, w in [(1100, 850), (1650, 1275), (28, 28), (10, 1000), (5000, 7000), *rng.integers(10, 4000, (200, 2))]:
        for tokens in (64, 768, 1280):
            kw = dict(factor=28, min_pixels=4 * 784, max_pixels=tokens * 784)
            assert smart_resize(int(h), int(w), **kw) == reference(int(h), int(w), **kw)


@pytest.mark.parametrize("tokens", [64, 256, 768])
def test_pdf_pages_meet_the_token_budget_without_oversized_bitmaps(tokens):
    spec = RenderSpec(max_visual_tokens=tokens)
    scale = pdf_scale(612, 792, spec)  # US letter
    assert 612 * 792 * scale * scale <= spec.max_pixels * 1.001  # the bitmap is never larger than needed
    info, pages, errors = items(make_pdf(2), spec)
    assert info[0].n_pages == 2 and not errors and [p.page_number for p in pages] == [1, 2]
    for p in pages:
        h, w, c = p.image.shape
        assert c == 3 and p.image.dtype == np.uint8 and h % 28 == 0 and w % 28 == 0
        assert (h // 28) * (w // 28) <= tokens
        assert (h // 28) * (w // 28) >= 0.85 * tokens  # and not needlessly smaller


def test_letter_page_at_default_budget():
    info, pages, _ = items(make_pdf(1, size=(612, 792)))
    h, w, _ = pages[0].image.shape
    assert (h // 28) * (w // 28) <= 768 and h > w


def test_render_caps_dpi_and_longest_side():
    spec = RenderSpec(max_visual_tokens=768, max_dpi=72)
    assert pdf_scale(100, 100, spec) == pytest.approx(1.0)  # a tiny page is not blown up past max_dpi
    spec = RenderSpec(max_visual_tokens=768, max_longest_side_px=500)
    assert pdf_scale(612, 792, spec) * 792 <= 500.0001


def test_skip_pages_renders_only_missing_ones():
    _, pages, _ = items(make_pdf(3), skip=frozenset({1, 3}))
    assert [p.page_number for p in pages] == [2]


def test_max_pages_per_doc_is_one_error_row():
    _, pages, errors = items(make_pdf(4), RenderSpec(max_pages_per_doc=2))
    assert [p.page_number for p in pages] == [1, 2]
    assert [(e.page_number, e.error_type) for e in errors] == [(3, "TooManyPages")]


@pytest.mark.parametrize(
    "name,data,error_type",
    [
        ("empty", b"", "EmptyFile"),
        ("garbage", b"this is not a document at all", "UnknownFormat"),
        ("truncated pdf", make_pdf(1)[:300], "CorruptDocument"),
        ("qpdf bad1", read("bad1.pdf"), "UnknownFormat"),
        ("encrypted", read("encrypted_hello_world_r2.pdf"), "EncryptedDocument"),
        ("zero pages", ZERO_PAGE_PDF, "EmptyDocument"),
        ("truncated png", encode(Image.new("RGB", (300, 300), "red"), "PNG")[:100], "UnreadableImage"),
    ],
)
def test_bad_documents_become_one_clear_error(name, data, error_type):
    info, pages, errors = items(data)
    assert not pages
    assert len(errors) == 1, errors
    err = errors[0]
    assert err.error_type == error_type and err.page_number is None and err.message


def test_error_rows_are_the_same_on_every_run():
    """A text file named .pdf is an unknown format, and no message carries a memory address."""
    runs = [items(b"hello, I am a text file named report.pdf")[2] for _ in range(2)]
    assert [(e.error_type, e.message) for e in runs[0]] == [(e.error_type, e.message) for e in runs[1]]
    assert runs[0][0].error_type == "UnknownFormat" and " at 0x" not in runs[0][0].message
    assert "hello, I am a te" in runs[0][0].message


def test_zero_size_page_is_a_page_error():
    info, pages, errors = items(read("cropped_no_overlap.pdf"))
    assert not pages and errors and errors[0].page_number == 1 and errors[0].error_type == "EmptyPage"


def test_oversized_image_is_rejected_before_decoding():
    data = encode(Image.new("1", (4000, 4000)), "PNG")
    _, pages, errors = items(data, RenderSpec(max_image_pixels=2 * 1000 * 1000))
    assert not pages and errors[0].error_type == "OversizedImage"
    assert "--max-image-pixels" in errors[0].message


def test_real_multipage_pdf():
    info, pages, errors = items(read("004-pdflatex-4-pages_pdflatex-4-pages.pdf"))
    assert info[0].n_pages == 4 and len(pages) == 4 and not errors
    assert pages[0].image.min() < 100  # text was drawn, not a blank bitmap


def test_image_modes_become_rgb_correctly():
    # RGBA: transparent pixels land on white, not black
    rgba = Image.new("RGBA", (56, 56), (255, 0, 0, 0))
    _, pages, _ = items(encode(rgba, "PNG"))
    assert pages[0].image.shape == (56, 56, 3) and (pages[0].image == 255).all()
    # 16-bit grayscale is scaled, not clipped: 65535 -> 255, 32768 -> 128
    arr = np.full((56, 56), 32768, dtype=np.uint16)
    arr[:, :28] = 65535
    _, pages, _ = items(encode(Image.fromarray(arr), "PNG"))
    assert pages[0].image[0, 0, 0] == 255 and abs(int(pages[0].image[0, 40, 0]) - 128) <= 1
    # EXIF orientation 6 (rotate 90): a 112x56 landscape image becomes portrait
    img = Image.new("RGB", (112, 56), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6
    _, pages, _ = items(encode(img, "JPEG", exif=exif))
    assert pages[0].image.shape[:2] == (112, 56)
    # palette with transparency, CMYK, 1-bit
    for img, fmt in [(Image.new("P", (56, 56)), "GIF"), (Image.new("CMYK", (56, 56)), "JPEG"),
                     (Image.new("1", (56, 56), 1), "BMP"), (Image.new("RGB", (56, 56), "green"), "WEBP")]:
        _, pages, errors = items(encode(img, fmt))
        assert not errors and pages[0].image.shape == (56, 56, 3), fmt


def test_multipage_tiff_frames_are_pages_and_gif_is_first_frame_only():
    frames = [Image.new("L", (84, 84), v) for v in (0, 128, 255)]
    info, pages, _ = items(encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]))
    assert info[0].n_pages == 3 and [int(p.image[0, 0, 0]) for p in pages] == [0, 128, 255]
    gif = encode(frames[0].convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames[1:]])
    info, pages, _ = items(gif)
    assert info[0].n_pages == 1 and len(pages) == 1


def test_image_within_budget_reaches_the_model_unchanged():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (280, 196, 3), dtype=np.uint8)
    _, pages, _ = items(encode(Image.fromarray(arr), "PNG"))
    assert np.array_equal(pages[0].image, arr)


def test_large_image_is_shrunk_exactly_as_the_processor_would():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(2)
    arr = rng.integers(0, 255, (1500, 1000, 3), dtype=np.uint8)
    spec = RenderSpec(max_visual_tokens=64)
    _, pages, _ = items(encode(Image.fromarray(arr), "PNG"), spec)
    assert model_grid_size(1500, 1000, spec) == pages[0].image.shape[:2]
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 4 * 784, "longest_edge": 64 * 784})
    ours = proc(images=[Image.fromarray(pages[0].image)], return_tensors="np")
    theirs = proc(images=[Image.fromarray(arr)], return_tensors="np")
    assert np.array_equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    assert np.abs(ours["pixel_values"] - theirs["pixel_values"]).max() == 0.0


def test_pdf_page_is_rendered_straight_to_the_grid():
    """A scanned page (an image over the whole page) reaches the grid as its area average:
    no second, bicubic resize of a bitmap already near the grid's size (which kept most of
    the noise: mean error 9.5 of 255 here, against 3.1 now); colours stay RGB."""
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (776, 600, 3), dtype=np.uint8)
    arr[:, :200] = (200, 30, 10)  # a red band: BGR/RGB order
    spec = RenderSpec(max_visual_tokens=64)
    data = encode(Image.fromarray(arr), "PDF", resolution=600 / 8.5)
    _, pages, errors = items(data, spec)
    assert not errors
    img = pages[0].image
    h, w, _ = img.shape
    assert (h, w) == model_grid_size(792, 612, spec) == (252, 196) and img.flags.c_contiguous
    pdf = pdfium.PdfDocument(data)  # the page's image as stored (a JPEG), decoded
    stored = next(pdf[0].get_objects()).get_bitmap(render=False).to_pil().convert("RGB")
    pdf.close()
    truth = np.asarray(stored.resize((w, h), Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(img - truth).mean() < 5.0
    assert np.abs(img[:, 5:60].astype(int) - (200, 30, 10)).max() <= 2


def test_renderer_reports_the_cpu_time_of_each_document():
    """The per-document process's own CPU time comes back with its results (the preflight's
    CPU ms per page; the Ray task's own process time does not include it)."""
    r = Renderer(timeout_s=60)
    try:
        assert r.cpu_s == 0.0
        list(r.render(make_pdf(2), SPEC))
        first = r.cpu_s
        list(r.render(make_pdf(2), SPEC))
        assert 0 < first < r.cpu_s < 10 * first + 1
    finally:
        r.close()


def test_renderer_process_renders_and_is_reused():
    r = Renderer(timeout_s=60)
    try:
        out = list(r.render(make_pdf(2), SPEC))
        pid = r._proc.pid
        out2 = list(r.render(make_pdf(1), SPEC))
        assert r._proc.pid == pid
        assert sum(isinstance(i, PageItem) for i in out) == 2 and sum(isinstance(i, PageItem) for i in out2) == 1
    finally:
        r.close()


def test_renderer_timeout_becomes_error_and_renderer_recovers():
    r = Renderer(timeout_s=0.001)  # shorter than the child's start-up: a guaranteed "hang"
    try:
        out = list(r.render(make_pdf(1), SPEC))
        assert len(out) == 1 and out[0].error_type == "RenderTimeout" and "--render-timeout-s" in out[0].message
        r.timeout_s = 60
        out = list(r.render(make_pdf(1), SPEC))
        assert sum(isinstance(i, PageItem) for i in out) == 1
    finally:
        r.close()


def test_renderer_crash_becomes_error_naming_the_page():
    r = Renderer(timeout_s=60)
    try:
        gen = r.render(make_pdf(3), SPEC)
        first = [next(gen), next(gen)]  # DocInfo, page 1
        assert isinstance(first[1], PageItem)
        r._proc.kill()  # what a segfault in pdfium looks like from here
        rest = list(gen)
        crashes = [i for i in rest if isinstance(i, ErrorItem)]
        assert crashes and crashes[-1].error_type == "RendererCrashed"
        assert list(r.render(make_pdf(1), SPEC))  # a fresh child takes the next document
    finally:
        r.close()


def test_real_broken_corpora_never_crash(shared_corpora):
    """Every file of the shared corpora ends as pages or errors (first page only, for time)."""
    import glob

    files = sorted(glob.glob(os.path.join(shared_corpora, "*", "*")))[::5]
    r = Renderer(timeout_s=30)
    spec = RenderSpec(max_visual_tokens=64, max_pages_per_doc=1)
    try:
        for f in files:
            with open(f, "rb") as fh:
                out = list(r.render(fh.read(), spec))
            assert any(isinstance(i, (PageItem, ErrorItem)) for i in out), f
    finally:
        r.close()
