"""CPU cost of rendering a PDF page to the model's grid, in ms of one core per page.

    PYTHONPATH=$PWD python benchmarks/bench_render.py [--tokens 768] [--repeats 3] [--json out.json]

Two kinds of page, measured apart:

* **text**: vector-text PDFs (LaTeX, LibreOffice, Google Docs) from /work/shared/corpora/
  py-pdf-samples, or, when that is absent, letter pages of text made here with pdfium;
* **scanned**: image-only letter pages, a photo-like noisy 200 dpi RGB image per page saved
  by Pillow as a PDF (one JPEG per page), as a scanner would give.

Paths, each over the same pages at the same output size (the model's grid):

* ``raw``: plain pypdfium2 (open, ``page.render(scale=s)`` with ``s`` giving the grid's pixel
  count, ``to_numpy``): the floor;
* ``before`` / ``after``: ``iter_document`` of pipeline/embed/rasterize.py at the base commit
  (render, then PIL bicubic resize to the grid) and in this tree, in this process;
* ``renderer``: this tree's :class:`pipeline.embed.renderer.Renderer` as the job runs it (a
  forked process per document): the CPU the per-document processes report plus this
  process's own (reading the pipe), zygote start-up excluded. A per-document process reports
  its own CPU (``getrusage(RUSAGE_SELF)``) before it exits, so this leaves out the zygote's
  fork and the process's exit;
* ``renderer_whole`` (Linux, from the same passes): this process's CPU plus the zygote's own
  and that of the per-document processes it reaped (``/proc/<zygote>/stat``: utime, stime,
  cutime, cstime, i.e. ``RUSAGE_SELF`` + ``RUSAGE_CHILDREN`` of the zygote), so fork and exit
  are in. Clock-tick resolution (1/``CLK_TCK`` s per pass), hence also given over all rounds
  together (``cpu_ms_per_page_all_rounds``).

Time is CPU time (``time.process_time``: user + system of this process), so a loaded machine
inflates it less than wall time; the paths run interleaved, ``--repeats`` rounds, and each
figure is the median (and the minimum) of its passes.
Also prints how far ``after``'s pixels are from ``before``'s (same shapes), and how far each
is from a reference: the page rendered at 4x the grid per axis, box-averaged down to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.embed import rasterize  # noqa: E402
from pipeline.embed.rasterize import PageItem, RenderSpec  # noqa: E402

BASE_COMMIT = "4582b08"
SAMPLES = "/work/shared/corpora/py-pdf-samples"
TEXT_FILES = ["004-pdflatex-4-pages_pdflatex-4-pages.pdf", "026-latex-multicolumn_multicolumn.pdf",
              "011-google-doc-document_google-doc-document.pdf",
              "002-trivial-libre-office-writer_002-trivial-libre-office-writer.pdf",
              "021-pdfa_crazyones-pdfa.pdf"]


def text_documents() -> list[bytes]:
    docs = []
    for name in TEXT_FILES:
        path = os.path.join(SAMPLES, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                docs.append(f.read())
    return docs or [generated_text_pdf(4)]


def generated_text_pdf(n_pages: int) -> bytes:
    """Letter pages of 10 pt Helvetica, 60 lines each, made with pdfium's own API."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as c

    pdf = pdfium.PdfDocument.new()
    for p in range(n_pages):
        page = c.FPDFPage_New(pdf, p, 612, 792)
        for line in range(60):
            obj = c.FPDFPageObj_NewTextObj(pdf, b"Helvetica", 10.0)
            text = f"Page {p + 1} line {line + 1}: the quick brown fox jumps over the lazy dog 0123456789."
            buf = (text + "\0").encode("utf-16-le")
            c.FPDFText_SetText(obj, (c.c_ushort * (len(buf) // 2)).from_buffer_copy(buf))
            c.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 50, 750 - 12 * line)
            c.FPDFPage_InsertObject(page, obj)
        c.FPDFPage_GenerateContent(page)
        c.FPDF_ClosePage(page)
    out = io.BytesIO()
    pdf.save(out)
    return out.getvalue()


def scanned_pdf(n_pages: int = 4, dpi: int = 200, seed: int = 0) -> bytes:
    """Image-only letter pages: smooth shading, dark 'text' bars and sensor noise, as JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = int(8.5 * dpi), int(11 * dpi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pages = []
    for i in range(n_pages):
        base = 225 + 20 * np.sin(xx / (97 + 13 * i)) * np.cos(yy / 131)
        img = np.repeat(base[..., None], 3, axis=2)
        for row in range(120, h - 120, 44):
            img[row:row + 18, 150:w - 150 - int(rng.integers(0, w // 3))] *= 0.25
        img += rng.normal(0, 12, img.shape)
        pages.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"))
    buf = io.BytesIO()
    pages[0].save(buf, format="PDF", save_all=True, append_images=pages[1:], resolution=float(dpi), quality=85)
    return buf.getvalue()


def load_before(tmp: str):
    src = subprocess.run(["git", "-C", ROOT, "show", f"{BASE_COMMIT}:pipeline/embed/rasterize.py"],
                         check=True, capture_output=True).stdout
    path = os.path.join(tmp, "rasterize_before.py")
    with open(path, "wb") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("rasterize_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def raw_pass(docs: list[bytes], spec: RenderSpec) -> int:
    import pypdfium2 as pdfium

    n = 0
    for data in docs:
        pdf = pdfium.PdfDocument(data)
        for i in range(len(pdf)):
            page = pdf[i]
            w, h = page.get_size()
            th, tw = rasterize.pdf_grid_size(w, h, spec)
            bitmap = page.render(scale=math.sqrt(th * tw / (w * h)), rev_byteorder=True)
            bitmap.to_numpy()
            bitmap.close()
            page.close()
            n += 1
        pdf.close()
    return n


def module_pass(module, docs: list[bytes], spec) -> int:
    return sum(isinstance(item, module.PageItem) for data in docs for item in module.iter_document(data, spec))


def zygote_cpu_s(renderer) -> tuple[int, float] | None:
    """(zygote pid, CPU seconds of the zygote and of the children it reaped) from /proc, or
    None where /proc is not there."""
    proc = getattr(renderer, "_proc", None)
    if proc is None:
        return None
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])  # stat fields 14-17
    return proc.pid, (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def wait_reaped(pid: int | None, timeout_s: float = 2.0) -> None:
    """Wait until the zygote has reaped the last per-document process (its DONE reply comes
    before it exits), so that process's CPU is in the zygote's cutime/cstime."""
    end = time.monotonic() + timeout_s
    while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
        time.sleep(0.0005)


def renderer_pass(renderer, docs: list[bytes], spec: RenderSpec) -> tuple[int, float, float | None]:
    """Pages; CPU seconds of the per-document processes' own reports plus this process's;
    and (``renderer_whole``) this process's plus the zygote's own and its reaped children's,
    None when /proc cannot tell."""
    wait_reaped(renderer.last_pid)
    z0 = zygote_cpu_s(renderer)
    cpu0, child0 = time.process_time(), renderer.cpu_s
    n = sum(isinstance(item, PageItem) for data in docs for item in renderer.render(data, spec))
    mine = time.process_time() - cpu0
    wait_reaped(renderer.last_pid)
    z1 = zygote_cpu_s(renderer)
    whole = mine + (z1[1] - z0[1]) if z0 and z1 and z0[0] == z1[0] else None
    return n, mine + (renderer.cpu_s - child0), whole


def measure(fn) -> tuple[float, int, float, float | None]:
    """(CPU ms per page, pages, wall ms per page, CPU ms of the whole renderer path or None) of one pass."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    pages, cpu_s, whole = (out, time.process_time() - c0, None) if isinstance(out, int) else out
    return cpu_s * 1000 / pages, pages, (time.perf_counter() - w0) * 1000 / pages, \
        None if whole is None else whole * 1000


def supersampled(data: bytes, shapes: list) -> list[np.ndarray]:
    """Reference pixels: each page rendered at 4x the grid per axis, then 4x4 box-averaged."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    out = []
    for i, (h, w, _) in enumerate(shapes):
        big = rasterize.render_pdf_page(pdf[i], 4 * w, 4 * h).astype(np.float32)
        out.append(big.reshape(h, 4, w, 4, 3).mean(axis=(1, 3)))
    pdf.close()
    return out


def pixel_difference(before, docs: list[bytes], spec) -> dict:
    """after vs before (abs, 0-255), and each against the supersampled reference (mean abs)."""
    diffs, err_before, err_after = [], [], []
    for data in docs:
        old = [i.image for i in before.iter_document(data, before.RenderSpec(**vars(spec)))
               if isinstance(i, before.PageItem)]
        new = [i.image for i in rasterize.iter_document(data, spec) if isinstance(i, PageItem)]
        assert [a.shape for a in old] == [b.shape for b in new], "shapes differ"
        diffs += [np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel() for a, b in zip(old, new)]
        ref = supersampled(data, [a.shape for a in new])
        err_before += [np.abs(a - r).ravel() for a, r in zip(old, ref)]
        err_after += [np.abs(b - r).ravel() for b, r in zip(new, ref)]
    d = np.concatenate(diffs)
    return {"mean": round(float(d.mean()), 2), "p99": int(np.percentile(d, 99)), "max": int(d.max()),
            "before_vs_reference_mean": round(float(np.concatenate(err_before).mean()), 2),
            "after_vs_reference_mean": round(float(np.concatenate(err_after).mean()), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    from pipeline.embed.renderer import Renderer

    spec = RenderSpec(max_visual_tokens=args.tokens)
    kinds = {"text": text_documents(), "scanned": [scanned_pdf(4, seed=s) for s in range(2)]}
    results = {"tokens": args.tokens, "repeats": args.repeats, "kinds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        before = load_before(tmp)
        before_spec = before.RenderSpec(max_visual_tokens=args.tokens)
        renderer = Renderer(timeout_s=600)
        try:
            list(renderer.render(kinds["scanned"][0], spec))  # the zygote's start-up is not per page
            for kind, docs in kinds.items():
                paths = {"raw": lambda: raw_pass(docs, spec),
                         "before": lambda: module_pass(before, docs, before_spec),
                         "after": lambda: module_pass(rasterize, docs, spec),
                         "renderer": lambda: renderer_pass(renderer, docs, spec)}
                for fn in paths.values():
                    fn()  # warm caches and imports
                runs = {name: [] for name in paths}
                for _ in range(args.repeats):  # the paths interleaved, so a burst of load hits all of them
                    for name, fn in paths.items():
                        runs[name].append(measure(fn))
                row = {name: {"cpu_ms_per_page": round(statistics.median(r[0] for r in rs), 2),
                              "cpu_ms_per_page_min": round(min(r[0] for r in rs), 2),
                              "wall_ms_per_page": round(statistics.median(r[2] for r in rs), 2),
                              "pages": rs[0][1]} for name, rs in runs.items()}
                whole = [r for r in runs["renderer"] if r[3] is not None]
                if len(whole) == len(runs["renderer"]):  # fork and exit included (see the docstring)
                    row["renderer_whole"] = {
                        "cpu_ms_per_page": round(statistics.median(r[3] / r[1] for r in whole), 2),
                        "cpu_ms_per_page_min": round(min(r[3] / r[1] for r in whole), 2),
                        "cpu_ms_per_page_all_rounds": round(sum(r[3] for r in whole) / sum(r[1] for r in whole), 2),
                        "wall_ms_per_page": row["renderer"]["wall_ms_per_page"], "pages": whole[0][1],
                        "clock_tick_s": 1 / os.sysconf("SC_CLK_TCK")}
                row["after_vs_raw"] = round(row["after"]["cpu_ms_per_page"] / row["raw"]["cpu_ms_per_page"], 3)
                row["renderer_vs_raw"] = round(row["renderer"]["cpu_ms_per_page"] / row["raw"]["cpu_ms_per_page"], 3)
                row["before_vs_raw"] = round(row["before"]["cpu_ms_per_page"] / row["raw"]["cpu_ms_per_page"], 3)
                row["pixels_after_vs_before"] = pixel_difference(before, docs, spec)
                results["kinds"][kind] = row
        finally:
            renderer.close()
    print(f"{'pages':8} {'path':14} {'CPU ms/page':>12} {'(min)':>7} {'wall ms/page':>13} {'x raw':>6}")
    for kind, row in results["kinds"].items():
        for name in ("raw", "before", "after", "renderer", "renderer_whole"):
            if name not in row:
                continue
            r = row[name]
            ratio = r["cpu_ms_per_page"] / row["raw"]["cpu_ms_per_page"]
            print(f"{kind:8} {name:14} {r['cpu_ms_per_page']:12.2f} {r['cpu_ms_per_page_min']:7.2f} "
                  f"{r['wall_ms_per_page']:13.2f} {ratio:6.2f}  "
                  f"({r['pages']} pages)")
        print(f"{kind:8} pixels after vs before: {row['pixels_after_vs_before']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
