"""The start-up check behind the model actor's "no compiled bytecode" warning."""

import importlib.util
import py_compile

from pipeline.cluster import bytecode_warning, modules_without_bytecode


def test_a_package_without_bytecode_that_cannot_be_written_is_found(tmp_path, monkeypatch):
    pkg = tmp_path / "vdr_heavy_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    # PYTHONDONTWRITEBYTECODE and no .pyc: every process compiles it
    assert modules_without_bytecode(("vdr_heavy_pkg", "no_such_module_xyz"), dont_write=True) == ["vdr_heavy_pkg"]
    text = bytecode_warning(("vdr_heavy_pkg",), dont_write=True)
    assert "vdr_heavy_pkg" in text and "compileall" in text and str(tmp_path) in text
    # a writable folder without the flag: the first import writes the bytecode
    assert modules_without_bytecode(("vdr_heavy_pkg",), dont_write=False) == []
    # compiled once (what pip does at install): nothing to say, even with the flag
    origin = str(pkg / "__init__.py")
    py_compile.compile(origin, cfile=importlib.util.cache_from_source(origin))
    assert modules_without_bytecode(("vdr_heavy_pkg",), dont_write=True) == []
    assert bytecode_warning(("vdr_heavy_pkg",), dont_write=True) is None

