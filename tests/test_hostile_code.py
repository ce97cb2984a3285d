"""Nothing from disk runs as code: bytecode planted in the kernel cache, a kernel file swapped or
replaced by a symlink after it was checked, a `json.py` in the directory `hrmspec check` runs in.
Each attack's payload writes a marker file; the marker must never appear, and the kernels must
still compute what the reference computes. Also: a kernel cache under a regular file, and
`check --draws` below 1, are one-line errors with exit 2.
"""

import importlib.util
import py_compile
import sys

import pytest
import torch

pytest.importorskip("triton")

import hrmspec  # noqa: E402
import hrmspec.check  # noqa: E402
from hrmspec.backends.common import source_cache  # noqa: E402
from hrmspec.backends.triton import RowKernel, cache  # noqa: E402
from hrmspec.backends.triton.aot import compile_in_fresh_process  # noqa: E402
from hrmspec.backends.triton.printer import render_module  # noqa: E402
from hrmspec.cli import main  # noqa: E402
from hrmspec.graph import build_graph  # noqa: E402
from hrmspec.graph.fusion import fuse_model  # noqa: E402
from hrmspec.ir import evaluate, rms_norm  # noqa: E402
from hrmspec.ir.kernel import kernel_name  # noqa: E402

pytestmark = pytest.mark.gpu  # the Triton kernels run on the kernel device (the interpreter without a GPU)


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    """A fresh, empty cache for each test, so every kernel is loaded for the first time."""
    path = tmp_path / "kernels"
    monkeypatch.setenv("HRMSPEC_CACHE", str(path))
    return path


@pytest.fixture
def marker(tmp_path):
    """The file a payload writes when it runs."""
    return tmp_path / "payload-ran"


def _payload(marker) -> str:
    return f"\nopen({str(marker)!r}, 'w').write('ran')\n"


def _assert_rms_norm_is_right(kernel: RowKernel, device) -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 40, generator=gen), torch.randn(40, generator=gen)
    got = kernel({"x": x.to(device), "w": w.to(device)})["y"].cpu()
    want = evaluate(kernel.program, {"x": x.double(), "w": w.double()})["y"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _rms_norm_source() -> tuple[str, str]:
    p = rms_norm()
    name = kernel_name(p, "fwd")
    return name, render_module(p, name)


# -- bytecode and swapped files -------------------------------------------------------------------------
def test_a_pyc_planted_in_the_cache_never_runs(kernel_cache, marker, kernel_device, tmp_path):
    name, source = _rms_norm_source()
    path = cache.write_source(name, source)  # the cache holds the kernel, as after an earlier run
    evil = tmp_path / "evil.py"
    evil.write_text(path.read_text() + _payload(marker))
    pyc = importlib.util.cache_from_source(str(path))  # <cache>/__pycache__/<name>.cpython-3xx.pyc
    py_compile.compile(str(evil), cfile=pyc, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)

    # the plant is live: Python's importer runs it in place of the checked .py
    spec = importlib.util.spec_from_file_location("planted_kernel_probe", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert marker.exists()
    marker.unlink()

    kernel = RowKernel(rms_norm())
    assert kernel.path == path
    _assert_rms_norm_is_right(kernel, kernel_device)
    assert not marker.exists()


def test_no_bytecode_is_written_to_the_cache(kernel_cache, kernel_device, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as in a plain python, without PYTHONDONTWRITEBYTECODE
    kernel = RowKernel(rms_norm())
    _assert_rms_norm_is_right(kernel, kernel_device)
    assert not (kernel_cache / "__pycache__").exists()
    assert sorted(p.name for p in kernel_cache.iterdir()) == [kernel.path.name]


def test_a_kernel_file_changed_after_its_check_is_not_what_runs(marker, kernel_device, monkeypatch):
    """The file is swapped between the byte-for-byte check and the load (a race, made certain here): the
    module and the source Triton reads are the checked text, not the file."""
    real = source_cache.write_source

    def write_then_swap(name, source, suffix, key):
        path = real(name, source, suffix, key)
        text = path.read_text().replace("t8 = w * t7\n", "t8 = w * t7 * 2.0\n")  # same lines, wrong result
        assert text != path.read_text()
        path.write_text(text + _payload(marker))
        return path

    monkeypatch.setattr(cache, "_write", write_then_swap)
    kernel = RowKernel(rms_norm())
    assert "* 2.0" in kernel.path.read_text()
    _assert_rms_norm_is_right(kernel, kernel_device)
    assert not marker.exists()


def test_a_symlink_in_place_of_a_kernel_file_is_replaced_not_followed(kernel_cache, tmp_path, kernel_device):
    name, source = _rms_norm_source()
    path = cache.write_source(name, source)
    expected = path.read_text()
    # a link to a file outside the cache: it is neither written through nor read through, even when the
    # target holds exactly the expected text
    for target_text in ("precious data\n", expected):
        target = tmp_path / "outside.txt"
        target.write_text(target_text)
        path.unlink()
        path.symlink_to(target)
        assert cache.write_source(name, source) == path
        assert not path.is_symlink() and path.read_text() == expected
        assert target.read_text() == target_text
    _assert_rms_norm_is_right(RowKernel(rms_norm()), kernel_device)


def test_a_file_not_written_by_this_process_is_never_loaded(kernel_cache):
    name, source = _rms_norm_source()
    path = cache.write_source(name, source)
    stranger = path.with_name("hrm_planted_0123456789abcdef.py")
    stranger.write_text(path.read_text())
    with pytest.raises(ValueError, match="not written by write_source"):
        cache.load_module(stranger)


@pytest.mark.needs_cc
def test_the_c_compiler_reads_the_checked_text_not_the_file(monkeypatch):
    from hrmspec.backends.cstyle.host import HostRowKernel

    real = source_cache.write_source

    def write_then_swap(name, source, suffix, key):
        path = real(name, source, suffix, key)
        path.write_text('#error "the cache file was compiled, not the checked text"\n')
        return path

    monkeypatch.setattr(source_cache, "write_source", write_then_swap)
    kernel = HostRowKernel(rms_norm())
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 24, generator=gen), torch.randn(24, generator=gen)
    got = kernel({"x": x, "w": w})["y"]
    want = evaluate(kernel.program, {"x": x.double(), "w": w.double()})["y"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# -- the working directory of a subprocess ----------------------------------------------------------------
@pytest.fixture
def hostile_cwd(tmp_path, marker, monkeypatch):
    """A working directory holding a json.py (every Python subprocess of hrmspec imports json)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "json.py").write_text(_payload(marker))
    monkeypatch.chdir(cwd)
    return cwd


def test_a_compile_subprocess_does_not_import_from_the_working_directory(hostile_cwd, marker):
    assert compile_in_fresh_process("hrmspec.backends.triton.aot", []) == []
    assert not marker.exists()


@pytest.fixture
def spec_file(tmp_path, tiny_text):
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_text)
    return path


@pytest.mark.skipif(not hrmspec.check.ptxas_available(), reason="no ptxas in this triton build: check compiles nothing")
def test_check_with_a_json_py_in_the_working_directory(spec_file, hostile_cwd, marker, capsys):
    assert main(["check", str(spec_file), "--draws", "1", "--arch", "80"]) == 0
    out = capsys.readouterr().out
    assert "kernels ok" in out and "sm_80" in out
    assert not marker.exists()


# -- one-line errors --------------------------------------------------------------------------------------
def _run(argv: list[str]) -> int:
    """The CLI's exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("under", ["a-file", "a-file/kernels"])
def test_a_kernel_cache_under_a_file_is_a_one_line_error(spec_file, tmp_path, monkeypatch, capsys, under):
    (tmp_path / "a-file").write_text("not a folder\n")
    setting = str(tmp_path / under)
    monkeypatch.setenv("HRMSPEC_CACHE", setting)
    assert _run(["check", str(spec_file), "--no-compile", "--draws", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "HRMSPEC_CACHE" in err and setting in err and "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "not a folder\n"


@pytest.mark.parametrize("draws", ["0", "-5", "two"])
def test_check_refuses_draws_below_one(spec_file, capsys, draws):
    assert _run(["check", str(spec_file), "--no-compile", "--draws", draws]) == 2
    out, err = capsys.readouterr()
    assert "kernels ok" not in out
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--draws" in errors[0] and "Traceback" not in err, err


def test_check_numerics_refuses_zero_draws(spec_file):
    # no draw would test nothing and report an error of 0, a pass
    kernel = fuse_model(build_graph(hrmspec.load_spec(spec_file))).kernels[0]
    with pytest.raises(ValueError, match="draws"):
        hrmspec.check.check_numerics(kernel, draws=0)
