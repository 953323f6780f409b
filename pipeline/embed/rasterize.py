"""Documents -> RGB page images on the model's grid, defensively.

* PDFs are rendered with pypdfium2 straight to the model's grid: the size that the scale
  meeting the visual-token budget (capped by dpi, total pixels and longest side: pdfium
  allocates the bitmap before it draws, with no size guard of its own) would give, rounded
  to multiples of 28, with no second resize (:func:`render_pdf_page`).
* Raster images are decoded with Pillow (EXIF orientation, every mode to RGB, alpha on
  white, 16-bit scaled, every TIFF frame a page) and only ever shrunk, exactly as the
  model's processor would (``smart_resize`` + bicubic), so an image within the budget
  reaches the model unchanged.
* pdfium is not thread-safe and can crash or hang on hostile input, and a hung C call
  cannot be interrupted from Python: :class:`pipeline.embed.renderer.Renderer` runs these
  functions in one child process per worker, with a timeout per page.

Every failure becomes an ``ErrorItem`` with a stage, a type and a readable message.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import re
import warnings
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)

PATCH_FACTOR = 28  # patch 14 x spatial merge 2
PDF_MAGIC = b"%PDF"


@dataclasses.dataclass(frozen=True)
class RenderSpec:
    max_visual_tokens: int = 768
    min_visual_tokens: int = 4
    max_dpi: float = 300.0
    max_longest_side_px: int = 8192
    max_image_pixels: int = 178_956_970  # Pillow's DecompressionBombError threshold (2x its warning)
    max_pages_per_doc: int = 0  # 0: no limit

    def __post_init__(self):
        if self.max_visual_tokens < self.min_visual_tokens:
            raise ValueError(f"--max-visual-tokens must be >= {self.min_visual_tokens}, got {self.max_visual_tokens}")
        if self.max_dpi <= 0 or self.max_longest_side_px <= 0:
            raise ValueError("--max-dpi and --max-longest-side must be positive")

    @property
    def max_pixels(self) -> int:
        return self.max_visual_tokens * PATCH_FACTOR * PATCH_FACTOR

    @property
    def min_pixels(self) -> int:
        return self.min_visual_tokens * PATCH_FACTOR * PATCH_FACTOR


@dataclasses.dataclass
class PageItem:
    page_number: int
    image: np.ndarray  # (H, W, 3) uint8, H and W multiples of 28


@dataclasses.dataclass
class ErrorItem:
    page_number: int | None  # None: the whole document
    stage: str
    error_type: str
    message: str


@dataclasses.dataclass
class DocInfo:
    n_pages: int


class RenderError(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's ``smart_resize``, the same arithmetic (tests compare the two): the
    renderer child must not import transformers, whose module imports torchvision."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def model_grid_size(height: int, width: int, spec: RenderSpec) -> tuple[int, int]:
    """(H, W) the model's processor resizes an image to: multiples of 28 within the budget."""
    if height < 1 or width < 1:
        raise RenderError("EmptyPage", f"page is {width}x{height} pixels")
    if max(height, width) / min(height, width) > 200:
        raise RenderError("DegeneratePage", f"aspect ratio of {width}x{height} is over 200, which the model rejects")
    return smart_resize(height, width, factor=PATCH_FACTOR, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)


def pdf_scale(width_pt: float, height_pt: float, spec: RenderSpec) -> float:
    """Render scale (pixels per point) that meets the token budget, never above the caps."""
    if not (width_pt > 0 and height_pt > 0) or not math.isfinite(width_pt * height_pt):
        raise RenderError("EmptyPage", f"page size is {width_pt}x{height_pt} pt")
    budget = math.sqrt(spec.max_pixels / (width_pt * height_pt))
    dpi_cap = spec.max_dpi / 72.0
    side_cap = spec.max_longest_side_px / max(width_pt, height_pt)
    return min(budget, dpi_cap, side_cap)


def pdf_grid_size(width_pt: float, height_pt: float, spec: RenderSpec) -> tuple[int, int]:
    """(H, W) on the model's grid for a page of this size: the grid of the bitmap that
    :func:`pdf_scale` gives (pdfium's size at that scale: ``ceil(points x scale)``), so a
    page gets the same shape, hence the same number of visual tokens, as when it was
    rendered at that scale and then resized."""
    scale = pdf_scale(width_pt, height_pt, spec)
    return model_grid_size(math.ceil(height_pt * scale), math.ceil(width_pt * scale), spec)


def render_pdf_page(page, width: int, height: int) -> np.ndarray:
    """Render a pypdfium2 page straight to (height, width, 3) RGB uint8: the model's grid.

    pdfium maps the page onto the whole bitmap (``FPDF_RenderPageBitmap`` with that size:
    one scale per axis), drawing into a numpy array it was handed as the bitmap's buffer
    (24-bit, ``FPDF_REVERSE_BYTE_ORDER``: RGB, which is what the model takes). So there is
    no second resize and no copy: no BGR->RGB conversion, no PIL image, no bicubic pass.
    Forms (``init_forms``) and annotations are drawn as ``PdfPage.render`` draws them.

    Against the former path (render at :func:`pdf_scale`, then a bicubic resize of that
    bitmap to the same grid): the same shape, so the same visual tokens; the content maps to
    the same place (both stretch the page onto the grid, by under 3.5% per axis; no shift
    between the two); the pixels differ by resampling only: the page is rasterized once at
    the final size instead of rasterized and then interpolated. Measured at 768 tokens
    (``benchmarks/bench_render.py``; 2026-12-03), after vs before, abs difference of 0-255
    values: 10 vector-text pages of py-pdf-samples mean 3.2, p99 59, max 230 (glyph edges,
    where the two place an edge up to a pixel apart); 8 scanned pages (noisy 200 dpi
    JPEG) mean 8.4, p99 106, max 166 (the noise, which pdfium averages down and the old
    bicubic pass did not). Against a reference (the page rendered at 4x the grid per axis,
    box-averaged down) the new pixels are the closer ones: mean abs error 3.1 vs 3.9
    (text) and 1.8 vs 8.0 (scanned). The cost is pypdfium2's own (``benchmarks/RESULTS.md``)."""
    import ctypes

    import pypdfium2.raw as pdfium_c

    out = np.empty((height, width, 3), dtype=np.uint8)
    stride = width * 3  # a multiple of 4 (width is a multiple of 28), as pdfium wants
    buf = (ctypes.c_ubyte * out.nbytes).from_buffer(out)
    bitmap = pdfium_c.FPDFBitmap_CreateEx(width, height, pdfium_c.FPDFBitmap_BGR, buf, stride)
    if not bitmap:
        raise MemoryError(f"pdfium could not create a {width}x{height} bitmap")
    try:
        pdfium_c.FPDFBitmap_FillRect(bitmap, 0, 0, width, height, 0xFFFFFFFF)
        flags = pdfium_c.FPDF_ANNOT | pdfium_c.FPDF_REVERSE_BYTE_ORDER
        pdfium_c.FPDF_RenderPageBitmap(bitmap, page.raw, 0, 0, width, height, 0, flags)
        if getattr(page, "formenv", None):
            pdfium_c.FPDF_FFLDraw(page.formenv, bitmap, page.raw, 0, 0, width, height, 0, flags)
    finally:
        pdfium_c.FPDFBitmap_Destroy(bitmap)
        del buf
    return out


def to_model_grid(img, spec: RenderSpec) -> np.ndarray:
    """RGB PIL image -> (H, W, 3) uint8 on the model's grid (bicubic, as the processor)."""
    from PIL import Image

    th, tw = model_grid_size(img.height, img.width, spec)
    if (img.height, img.width) != (th, tw):
        img = img.resize((tw, th), resample=Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def to_rgb(img):
    """Any Pillow mode -> RGB: EXIF orientation applied, alpha composited on white,
    16-bit and float images scaled (Pillow clips them on ``convert``)."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            if mode == "I" and lo >= 0 and hi <= 65535:
                arr = arr / 257.0 if hi > 255 else arr
            else:
                arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def stable_message(exc: BaseException | str) -> str:
    """An error text that is the same on every run: object reprs lose their memory address.

    >>> stable_message("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>")
    'cannot identify image file <_io.BytesIO object>'
    """
    return _ADDRESS.sub("", str(exc))


def sniff_kind(data: bytes) -> str:
    if not data:
        raise RenderError("EmptyFile", "the file is empty (0 bytes)")
    if PDF_MAGIC in data[:1024]:
        return "pdf"
    return "image"


def iter_pdf_pages(data: bytes, spec: RenderSpec, skip: frozenset = frozenset()) -> Iterator:
    """Yield DocInfo, then a PageItem or ErrorItem per page (``skip``: page numbers already done)."""
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        text = str(exc)
        # pdfium's last-error code is process-global and not reset by a later success, so
        # the message alone can be stale: an encryption dictionary in the file decides.
        if b"/Encrypt" in data:
            raise RenderError("EncryptedDocument", f"the PDF is encrypted and needs a password: {text}") from None
        if "Success" in text or "password" in text.lower():  # parsed, but no page tree: zero pages
            raise RenderError("EmptyDocument", f"the PDF has no pages (or no readable page tree): {text}") from None
        raise RenderError("CorruptDocument", f"pdfium could not open the PDF: {text}") from None
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no XFA support": forms still render without it
                pdf.init_forms()
        except Exception:  # forms are optional decoration; the page still renders
            pass
        n = len(pdf)
        if n <= 0:
            raise RenderError("EmptyDocument", "the PDF has no pages")
        yield DocInfo(n)
        last = n if not spec.max_pages_per_doc else min(n, spec.max_pages_per_doc)
        for number in range(1, n + 1):
            if number in skip:
                continue
            if number > last:
                yield ErrorItem(number, "render", "TooManyPages",
                                f"pages {number}..{n} are beyond --max-pages-per-doc {spec.max_pages_per_doc}")
                return
            page = None
            try:
                page = pdf[number - 1]
                w, h = page.get_size()
                height, width = pdf_grid_size(w, h, spec)
                yield PageItem(number, render_pdf_page(page, width, height))
            except RenderError as exc:
                yield ErrorItem(number, "render", exc.error_type, str(exc))
            except (pdfium.PdfiumError, ValueError, OSError, MemoryError) as exc:
                yield ErrorItem(number, "render", type(exc).__name__, f"page {number}: {exc}")
            finally:
                if page is not None:
                    page.close()
    finally:
        pdf.close()


def iter_image_pages(data: bytes, spec: RenderSpec, skip: frozenset = frozenset()) -> Iterator:
    """Yield DocInfo, then a PageItem or ErrorItem per frame (multi-page TIFF; GIF/WebP: first frame)."""
    from PIL import Image

    cap = spec.max_image_pixels // 2
    Image.MAX_IMAGE_PIXELS = cap  # Pillow warns above this and raises above twice this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RenderError("OversizedImage", f"image is over the cap of {cap} pixels (--max-image-pixels "
                          f"{spec.max_image_pixels} / 2): {exc}") from None
    except Image.UnidentifiedImageError:
        # Neither a PDF nor any image format Pillow knows (a text file named .pdf, say). The
        # message names the first bytes, never Pillow's "<_io.BytesIO object at 0x...>".
        raise RenderError("UnknownFormat", f"neither a PDF nor an image format (the file starts with "
                          f"{data[:16]!r})") from None
    except Exception as exc:  # Pillow raises many types for bad input
        raise RenderError("UnreadableImage", f"not a readable PDF or image: {type(exc).__name__}: "
                          f"{stable_message(exc)}") from None
    if img.width * img.height > cap:
        raise RenderError("OversizedImage", f"{img.width}x{img.height} pixels is over the cap of {cap} "
                          f"(--max-image-pixels {spec.max_image_pixels} / 2)")
    n = getattr(img, "n_frames", 1) if fmt in ("TIFF", "MPO") else 1
    if n == 1:
        # A single image that fails to decode is a document error, not a page error.
        try:
            img.load()
            page = to_model_grid(to_rgb(img), spec)
        except RenderError:
            raise
        except Exception as exc:
            raise RenderError("UnreadableImage", f"{fmt} image could not be decoded: {type(exc).__name__}: "
                              f"{stable_message(exc)}") from None
        yield DocInfo(1)
        if 1 not in skip:
            yield PageItem(1, page)
        return
    yield DocInfo(n)
    for number in range(1, n + 1):
        if number in skip:
            continue
        try:
            img.seek(number - 1)
            img.load()
            yield PageItem(number, to_model_grid(to_rgb(img), spec))
        except RenderError as exc:
            yield ErrorItem(number, "decode", exc.error_type, str(exc))
        except Exception as exc:
            yield ErrorItem(number, "decode", type(exc).__name__, f"frame {number}: {exc}")


def iter_document(data: bytes, spec: RenderSpec, skip: frozenset = frozenset()) -> Iterator:
    """DocInfo, then pages/errors; a document that cannot be opened yields one ErrorItem."""
    try:
        kind = sniff_kind(data)
        if kind == "pdf":
            yield from iter_pdf_pages(data, spec, skip)
        else:
            yield from iter_image_pages(data, spec, skip)
    except RenderError as exc:
        yield ErrorItem(None, "open", exc.error_type, str(exc))
