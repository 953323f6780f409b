"""How every job ends: one clear line on stderr and a non-zero exit code, never a raw traceback.

``sys.exit(cli.guarded(main))`` in each job's ``__main__`` block: an exception that ``main``
did not turn into an exit code itself is reported as ``error: Type: message`` (the first
line of the innermost cause, with Ray's task wrappers removed), exit code 1; its full
traceback goes to a log file named on that line, and to stderr with ``--debug`` (or
``PIPELINE_DEBUG=1``). Ctrl-C exits 130. Imports neither torch nor Ray.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import traceback
from typing import Callable, Sequence

MAX_LINE = 600


def innermost(exc: BaseException) -> BaseException:
    """The exception that really happened: Ray's ``RayTaskError`` (``.cause``) and Ray Data's
    ``UserCodeException`` (``__cause__``) wrappers are removed."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if type(exc).__name__ in ("UserCodeException", "RayTaskError") and isinstance(exc.__cause__, BaseException):
            exc = exc.__cause__
            continue
        break
    return exc


_WRAPPERS = ("UserCodeException", "RayTaskError")
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Interrupt))(?:\([^)]*\))?: (.+)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most MAX_LINE characters. When Ray hands back
    only a wrapper (the cause survives as text, not as an object), the last exception line
    of that text that is not a wrapper is used."""
    inner = innermost(exc)
    name = type(inner).__name__
    if name == "ActorDiedError" and "creation task" in str(inner):
        # an actor's constructor raised (e.g. the model actor's checkpoint did not load): its
        # own error is in the text, below Ray's line about the actor
        found = None
        for line in _ANSI.sub("", str(inner)).splitlines():
            m = _EXC_LINE.match(line.strip())
            if m and not m.group(1).startswith(_WRAPPERS) and m.group(1) != "ActorDiedError":
                found = m
        if found:
            actor = re.search(r"ray::(\S+?)\.__init__\(\)", str(inner))
            where = f" ({actor.group(1)} could not start)" if actor else ""
            text = f"{found.group(1)}{where}: {found.group(2).strip()}"
            return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."
    if name.startswith(_WRAPPERS):
        found = None
        for line in _ANSI.sub("", str(exc)).splitlines():
            m = _EXC_LINE.match(line.strip())
            if m and not m.group(1).startswith(_WRAPPERS):
                found = m
        if found:
            text = f"{found.group(1)}: {found.group(2).strip()}"
            return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."
    lines = [ln.strip() for ln in _ANSI.sub("", str(inner)).strip().splitlines() if ln.strip()]
    text = f"{name}: {lines[0]}" if lines else name
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


def debugging() -> bool:
    """Whether ``--debug`` or ``PIPELINE_DEBUG=1`` asked for tracebacks."""
    return os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")


def _knows_debug(main: Callable) -> bool:
    """Whether the job's own parser defines --debug (then it is passed on)."""
    module = sys.modules.get(getattr(main, "__module__", ""), None)
    build = getattr(module, "build_parser", None)
    if build is None:
        return False
    try:
        return "--debug" in build()._option_string_actions
    except Exception:  # noqa: BLE001 - a parser that cannot be built is the job's to report
        return False


def guarded(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
            prog: str | None = None) -> int:
    """Run ``main(argv)``; any exception it lets out ends as one line and exit code 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or debugging()
    if debug:  # the jobs' own one-line refusals re-raise, so the traceback is printed below
        os.environ["PIPELINE_DEBUG"] = "1"
    prog = prog or os.path.basename(sys.argv[0] or "job")
    try:
        # --debug is this wrapper's, taken by every job (a job whose parser did not know it
        # refused it, while the error line advised it, 2026-12-06)
        return main(args if _knows_debug(main) else [a for a in args if a != "--debug"])
    except KeyboardInterrupt:
        print(f"[{prog}] interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the point: nothing escapes as a raw traceback
        text = "".join(traceback.format_exception(exc))
        if debug:
            sys.stderr.write(text)
            where = ""
        else:
            try:
                fd, path = tempfile.mkstemp(prefix=f"{prog.replace('.', '_')}-", suffix=".traceback.log")
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                where = f" (traceback in {path}; --debug prints it)"
            except OSError:
                where = " (--debug prints the traceback)"
        print(f"error: {one_line(exc)}{where}", file=sys.stderr, flush=True)
        return 1
