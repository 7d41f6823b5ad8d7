"""setup.py says what it is about to compile and for how long, before compiling (pip is silent meanwhile)."""

import ast
import os

SETUP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


def setup_functions() -> dict:
    """setup.py's imports, constants and functions, without running setup()."""
    tree = ast.parse(open(SETUP).read())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))
            or (isinstance(n, ast.Assign) and not isinstance(n.value, ast.Call))
            or (isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) in ("ROOT", "STATUS_FILE"))]
    ns: dict = {"__file__": SETUP}
    exec(compile(ast.Module(body=keep, type_ignores=[]), SETUP, "exec"), ns)
    return ns


def test_compile_notice(monkeypatch):
    ns = setup_functions()
    monkeypatch.setenv("SPA_CUDA_ARCHS", "8.0;9.0;10.0+PTX")
    monkeypatch.setenv("MAX_JOBS", "4")
    cpu = ns["_compile_notice"](("cpu",))
    assert cpu.startswith("compiling the C++ CPU kernels: about 1-2 min with MAX_JOBS=4")
    both = ns["_compile_notice"](("cpu", "cuda"))
    assert "the C++ CPU kernels and the CUDA kernels for 3 arch(s) (8.0;9.0;10.0+PTX" in both
    assert "about 7-14 min" in both and "SPA_SKIP_CUDA_BUILD=1" in both


def test_notice_is_printed_before_each_compile():
    src = open(SETUP).read()
    build = src[src.index("def build_extension"):src.index("def _built_only")]
    assert build.index("_log(_compile_notice(parts))") < build.index("super().build_extension(ext)")
    assert build.index("_compile_notice((\"cpu\",))") < build.index("super().build_extension(fallback)")
