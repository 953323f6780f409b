"""The start-up check behind the model actor's "no compiled bytecode" warning."""

import importlib.util
import py_compile

from pipeline.cluster import bytecode_warning, modules_without_bytecode


def test_a_package_without_bytecode_that_cannot_be_written_is_found(tmp_path, monkeypatch):
    pkg = tmp_path / "vdr_heavy_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "sub" / "heavy.py").write_text("Y = 2\n")
    files = {"vdr_heavy_pkg": ("__init__.py", "sub/heavy.py", "not_there.py"), "no_such_module_xyz": ("__init__.py",)}
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    # PYTHONDONTWRITEBYTECODE and no .pyc: every process compiles it
    assert modules_without_bytecode(files, dont_write=True) == ["vdr_heavy_pkg"]
    text = bytecode_warning(files, dont_write=True)
    assert "vdr_heavy_pkg has no compiled bytecode" in text and "compileall" in text and str(tmp_path) in text
    # a writable folder without the flag: the first import writes the bytecode
    assert modules_without_bytecode(files, dont_write=False) == []
    # the package's __init__ compiled but not the rest: still found (the H200 host's transformers)
    init = str(pkg / "__init__.py")
    py_compile.compile(init, cfile=importlib.util.cache_from_source(init))
    assert modules_without_bytecode(files, dont_write=True) == ["vdr_heavy_pkg"]
    # all compiled (what pip does at install): nothing to say, even with the flag
    heavy = str(pkg / "sub" / "heavy.py")
    py_compile.compile(heavy, cfile=importlib.util.cache_from_source(heavy))
    assert modules_without_bytecode(files, dont_write=True) == []
    assert bytecode_warning(files, dont_write=True) is None

