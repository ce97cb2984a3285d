"""`backends/` and `runtime/` install as hrmspec.backends and hrmspec.runtime, editable and as a wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import hrmspec.backends
import hrmspec.runtime

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import hrmspec, hrmspec.backends.reference.table, hrmspec.backends.common.contract;"
    "import hrmspec.runtime.execution.compiled, hrmspec.spec;"
    "from hrmspec.spec import shipped_specs_dir;"
    "print(hrmspec.__file__); print(hrmspec.runtime.__file__); print(hrmspec.backends.__file__);"
    "print(sorted(p.name for p in shipped_specs_dir().glob('*.yaml')))"
)


def test_source_layout_maps_to_subpackages():
    # in a checkout (editable install or PYTHONPATH), the folders are the subpackages
    assert Path(hrmspec.runtime.__file__).resolve().parent == ROOT / "runtime"
    assert Path(hrmspec.backends.__file__).resolve().parent == ROOT / "backends"


def test_wheel_contains_and_imports_subpackages(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        check=True, timeout=300, capture_output=True,
    )
    wheel = next(tmp_path.glob("hrmspec-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hrmspec/runtime/execution/compiled.py" in names
    assert "hrmspec/backends/reference/table.py" in names and "hrmspec/backends/common/contract.py" in names
    assert "hrmspec/specs/hrm-text-1b.yaml" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, timeout=300, capture_output=True,
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(line.startswith(str(target)) for line in lines[:3]), lines
    assert "hrm-text-1b.yaml" in lines[3]
