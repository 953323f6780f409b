"""The renderer's isolation: each document renders as if it were the first, the time limit
is per document, an abandoned document leaves no child behind, replies are tied to their
request, the child gets no credentials, and a memory limit ends as an error row."""

from __future__ import annotations

import os
import struct
import time

import numpy as np
import pytest

from pipeline.embed.rasterize import DocInfo, ErrorItem, PageItem, RenderSpec
from pipeline.embed.renderer import Renderer

CORPORA = "/work/shared/corpora"
SPEC = RenderSpec(max_visual_tokens=768)


def corpus_file(rel: str) -> bytes:
    path = os.path.join(CORPORA, rel)
    if not os.path.isfile(path):
        pytest.skip(f"{path} is absent")
    with open(path, "rb") as f:
        return f.read()


def pages(items) -> list[PageItem]:
    return [i for i in items if isinstance(i, PageItem)]


def gone(pid: int, wait_s: float = 10.0) -> bool:
    """The process no longer runs (exited, or a zombie waiting to be reaped)."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_pixels_do_not_depend_on_the_previous_document():
    """pdfium keeps process-wide font state: a non-embedded font ("Times-Italics") was drawn
    with other glyphs after V4-aes-clearmeta.pdf in the same renderer (942 pixels)."""
    target = corpus_file("qpdf/reuse-xref-stream.pdf")
    before = corpus_file("qpdf/V4-aes-clearmeta.pdf")
    fresh = Renderer(timeout_s=120)
    try:
        alone = pages(fresh.render(target, SPEC))
    finally:
        fresh.close()
    used = Renderer(timeout_s=120)
    try:
        assert len(pages(used.render(before, SPEC))) == 30
        after = pages(used.render(target, SPEC))
    finally:
        used.close()
    assert len(alone) == len(after) == 1
    assert alone[0].image.shape == after[0].image.shape
    assert int((alone[0].image != after[0].image).any(axis=-1).sum()) == 0


def test_each_document_renders_in_a_fresh_process():
    data = corpus_file("qpdf/reuse-xref-stream.pdf")
    r = Renderer(timeout_s=120)
    try:
        seen = []
        for _ in range(3):
            assert len(pages(r.render(data, SPEC))) == 1
            seen.append(r.last_pid)
        assert len(set(seen)) == 3 and os.getpid() not in seen
        assert all(gone(pid) for pid in seen)
    finally:
        r.close()


def heavy_pdf(n_pages: int, n_paths: int) -> bytes:
    """n_pages letter pages that each draw one shared form of n_paths long stroked curves:
    slow to render at any budget (1,000 curves: about 0.2 s a page at 4096 tokens here)."""
    rng = np.random.default_rng(0)
    body = "".join(f"{a} {b} m {c} {d} {e} {f} {g} {h} c S\n"
                   for a, b, c, d, e, f, g, h in rng.uniform(0, 600, (n_paths, 8)).round(1).tolist()).encode()
    objs = [b"<</Type/Catalog/Pages 2 0 R>>",
            b"<</Type/Pages/Kids[" + b" ".join(b"%d 0 R" % (5 + i) for i in range(n_pages)) + b"]/Count %d>>" % n_pages,
            b"<</Type/XObject/Subtype/Form/BBox[0 0 612 792]/Length %d>>stream\n" % len(body) + body + b"\nendstream",
            b"<</Length 11>>stream\nq /F0 Do Q\nendstream"]
    objs += [b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Resources<</XObject<</F0 3 0 R>>>>/Contents 4 0 R>>"
             ] * n_pages
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for k, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % k + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return bytes(out + b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref))


def test_timeout_is_per_document_not_per_page():
    """30 pages at about 0.2 s each: every page comes well within 2.5 s, the document does not.
    (Rendered straight to the grid, qpdf/V4-aes-clearmeta.pdf's pages, used here before,
    now take about 2 ms each: their cost was the resize.)"""
    data = heavy_pdf(30, 1000)
    spec = RenderSpec(max_visual_tokens=4096)
    r = Renderer(timeout_s=2.5)
    try:
        t0 = time.monotonic()
        out = list(r.render(data, spec))
        took = time.monotonic() - t0
        got = pages(out)
        assert 1 <= len(got) < 30
        assert isinstance(out[-1], ErrorItem) and out[-1].error_type == "RenderTimeout"
        assert out[-1].page_number == got[-1].page_number + 1 and "per document" in out[-1].message
        assert took < 2.5 + 5  # the deadline, plus killing the child
        r.timeout_s = 120
        assert len(pages(r.render(data, SPEC))) == 30  # a fresh child takes the next document
    finally:
        r.close()


def test_time_the_caller_spends_between_pages_does_not_count():
    """A consumer held back downstream (Ray backpressure) must not time a document out."""
    data = corpus_file("qpdf/V4-aes-clearmeta.pdf")
    r = Renderer(timeout_s=5)
    try:
        got = []
        for item in r.render(data, SPEC):  # about 1 s of rendering, 7.5 s of consumer time
            assert not isinstance(item, ErrorItem), item
            if isinstance(item, PageItem):
                got.append(item)
                time.sleep(0.25)
        assert len(got) == 30
    finally:
        r.close()


def test_abandoned_document_kills_its_child():
    data = corpus_file("qpdf/V4-aes-clearmeta.pdf")
    r = Renderer(timeout_s=120)
    try:
        gen = r.render(data, SPEC)
        assert isinstance(next(gen), DocInfo) and isinstance(next(gen), PageItem)
        pids = [r._proc.pid] + [p for p in [getattr(r, "last_pid", None)] if p]
        gen.close()  # the caller stops iterating mid-document
        assert all(gone(pid) for pid in pids), "a child is still rendering an abandoned document"
        assert len(pages(r.render(corpus_file("qpdf/reuse-xref-stream.pdf"), SPEC))) == 1
    finally:
        r.close()


def test_a_reply_to_another_request_is_never_taken_for_this_document():
    """An earlier request (id 999, 30 pages) still queued in the child: its replies arrive
    first and must be dropped, not returned as this 1-page document's pages."""
    import json

    from pipeline.embed.renderer import _REQ, _write_all

    earlier = corpus_file("qpdf/V4-aes-clearmeta.pdf")
    current = corpus_file("qpdf/reuse-xref-stream.pdf")
    r = Renderer(timeout_s=120)
    try:
        r._start()
        body = json.dumps({"spec": {"max_visual_tokens": 64}, "skip": []}).encode()
        _write_all(r._proc.stdin.fileno(), _REQ.pack(999, len(body), len(earlier)), body, earlier)
        out = list(r.render(current, SPEC))
        assert [i.n_pages for i in out if isinstance(i, DocInfo)] == [1]
        got = pages(out)
        assert len(got) == 1 and got[0].image.shape == (896, 672, 3)
        assert not [i for i in out if isinstance(i, ErrorItem)]
    finally:
        r.close()


def test_child_environment_has_no_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTREAL")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    data = corpus_file("qpdf/reuse-xref-stream.pdf")
    r = Renderer(timeout_s=120)
    try:
        assert len(pages(r.render(data, SPEC))) == 1
        with open(f"/proc/{r._proc.pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert b"AWS_SECRET_ACCESS_KEY" not in env and b"AWS_ACCESS_KEY_ID" not in env
        assert env.get(b"LC_ALL") == b"C.UTF-8" and b"PATH" in env
    finally:
        r.close()


def test_replies_are_not_pickles():
    """The parent never unpickles what the child sends: the module does not even import pickle."""
    import pipeline.embed.renderer as renderer

    assert not hasattr(renderer, "pickle")
    assert isinstance(renderer._REP, struct.Struct)


def test_memory_limit_becomes_an_error_row_and_the_next_document_renders():
    data = corpus_file("qpdf/reuse-xref-stream.pdf")
    r = Renderer(timeout_s=120)
    try:
        assert len(pages(r.render(data, SPEC))) == 1
        with open(f"/proc/{r._proc.pid}/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        r.memory_limit_bytes = vm + (400 << 20)  # 400 MiB above what the child starts with
        # ~23000x30000 pixels: a 2.7 GB bitmap, far over the limit (a decompression bomb's shape)
        bomb = RenderSpec(max_visual_tokens=1_000_000, max_dpi=5000, max_longest_side_px=30000)
        out = list(r.render(data, bomb))
        errors = [i for i in out if isinstance(i, ErrorItem)]
        assert not pages(out) and errors, out
        assert errors[0].error_type in ("MemoryError", "PdfiumError", "RendererCrashed"), errors
        got = pages(r.render(data, SPEC))  # same renderer, same limit
        assert len(got) == 1 and got[0].image.std() > 0
    finally:
        r.close()


def test_default_memory_limit_is_set_and_configurable(monkeypatch):
    assert Renderer().memory_limit_bytes == 8 << 30
    monkeypatch.setenv("PIPELINE_RENDER_MEMORY_LIMIT_BYTES", str(3 << 30))
    assert Renderer().memory_limit_bytes == 3 << 30
    assert Renderer(memory_limit_bytes=0).memory_limit_bytes == 0


def test_renderers_run_below_the_worker_cpu_priority(monkeypatch):
    """Renderers share a GPU node's cores with the GPU actor: they run at nice +10 (the
    per-document processes inherit it from the zygote), so the actor's host work comes first;
    PIPELINE_RENDER_NICENESS=0 keeps the worker's priority; out-of-range values are refused."""
    data = corpus_file("qpdf/reuse-xref-stream.pdf")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for env, want in ((None, min(19, base + 10)), ("0", base), ("3", min(19, base + 3))):
        if env is None:
            monkeypatch.delenv("PIPELINE_RENDER_NICENESS", raising=False)
        else:
            monkeypatch.setenv("PIPELINE_RENDER_NICENESS", env)
        r = Renderer(timeout_s=120)
        try:
            assert len(pages(r.render(data, SPEC))) == 1
            assert os.getpriority(os.PRIO_PROCESS, r._proc.pid) == want, env
        finally:
            r.close()
    for bad in ("25", "-1", "high"):
        monkeypatch.setenv("PIPELINE_RENDER_NICENESS", bad)
        with pytest.raises(ValueError, match="PIPELINE_RENDER_NICENESS.*0-19"):
            Renderer()
