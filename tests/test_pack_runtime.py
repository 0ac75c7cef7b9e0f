"""tools.pack_runtime: the runtime-only bundle for a GPU node, assembled from wheels (fakes with
the real wheels' file layout here; the download itself is pip's)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from tools import pack_runtime

ROOT = Path(__file__).resolve().parents[1]


def _wheel(folder: Path, name: str, files: dict[str, str]) -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_bundle_leaves_out_the_compiler_and_packs_cupti(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "apache_tvm-0.27.0-py3-none-manylinux_2_28_x86_64.whl", {
        "tvm/__init__.py": "", "tvm/lib/libtvm_runtime.so": "rt", "tvm/lib/libtvm_compiler.so": "big",
        "tvm/3rdparty/x.h": "", "tvm/web/x.js": "", "tvm/include/tvm/runtime/a.h": "",
        "tvm/__pycache__/x.pyc": ""})
    _wheel(wheels, "cupti_python-13.4.0-cp312-cp312-manylinux_2_28_x86_64.whl", {
        "cupti/__init__.py": "", "cupti/cuda_driver_api_params/a.py": "x" * 1000,
        "cupti/cuda_runtime_api_params_12.py": "y"})
    _wheel(wheels, "hydra_core-1.3.2-py3-none-any.whl", {"hydra/__init__.py": ""})
    out = tmp_path / ".devkit"
    out.mkdir()
    (out / "stale").write_text("from an earlier bundle")
    assert pack_runtime.main(["--wheels", str(wheels), "--out", str(out)]) == 0
    site = out / "site"
    assert (site / "tvm/lib/libtvm_runtime.so").is_file() and (site / "tvm/include/tvm/runtime/a.h").is_file()
    assert not (site / "tvm/lib/libtvm_compiler.so").exists() and not (site / "tvm/3rdparty").exists()
    assert not (site / "tvm/web").exists() and not list(site.rglob("__pycache__"))
    assert (site / "hydra/__init__.py").is_file() and not (out / "stale").exists()
    assert not (site / "cupti/cuda_driver_api_params").exists()
    with tarfile.open(out / "cupti_params.tar.xz") as tar:
        assert {"cupti/cuda_driver_api_params/a.py", "cupti/cuda_runtime_api_params_12.py"} <= set(tar.getnames())
    env = (out / "env.sh").read_text()
    assert "TVM_USE_RUNTIME_LIB=1" in env and "NCCL_NVLS_ENABLE=0" in env and '"$PWD/.devkit/site' not in env
    assert "$PWD/.devkit/site" in env
    # env.sh unpacks CUPTI's modules on the node, once
    subprocess.run(["bash", "-c", "source .devkit/env.sh && test -f .devkit/site/cupti/cuda_driver_api_params/a.py"],
                   cwd=tmp_path, check=True)


def test_download_asks_pip_for_the_nodes_python_and_the_installed_tvm():
    import importlib.metadata

    cmd = pack_runtime.download_command(pack_runtime.requirements(cupti=True), "3.12", Path("/tmp/w"))
    assert cmd[:3] == [sys.executable, "-m", "pip"] and "--python-version" in cmd and "3.12" in cmd
    assert f"apache-tvm=={importlib.metadata.version('apache-tvm')}" in cmd and "cupti-python" in cmd
    assert "manylinux_2_28_x86_64" in cmd


def test_no_wheels_is_one_line_and_exit_2(tmp_path, capsys):
    assert pack_runtime.main(["--wheels", str(tmp_path)]) == 2
    assert "no *.whl" in capsys.readouterr().err
