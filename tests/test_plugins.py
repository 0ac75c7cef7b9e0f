"""The one builder of the native plugins (runtime_patch.native.build): cached and relocatable builds,
the nccl and CUDA plugins where their toolchains are, and errors that name the fix."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from runtime_patch import functions
from runtime_patch.native import toolchain
from runtime_patch.native.build import CUDA_PLUGINS, PLUGINS, build, plugin_path
from runtime_patch.native.toolchain import PluginBuildError


def test_build_is_cached_and_relocatable():
    path = build("cpu_shm")
    assert path == plugin_path("cpu_shm") and path.is_file()
    assert build("cpu_shm") == path  # no rebuild
    readelf = shutil.which("readelf")
    if readelf:
        dynamic = subprocess.run([readelf, "-d", str(path)], capture_output=True, text=True).stdout
        assert "RPATH" not in dynamic and "RUNPATH" not in dynamic  # resolves TVM's libraries by soname


def _nccl_toolchain_missing() -> str | None:
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/include/cuda_runtime.h").is_file():
        return "nvcc / the CUDA toolkit is not installed"
    try:
        toolchain.nccl_dirs()
        toolchain.cuda_home()
    except PluginBuildError as e:
        return str(e)
    return None


def test_nccl_plugin_compiles(tmp_path, monkeypatch):
    missing = _nccl_toolchain_missing()
    if missing:
        pytest.skip(f"cannot build the nccl plugin here: {missing}")
    monkeypatch.setenv("LAB_PLUGIN_DIR", str(tmp_path))
    path = build("nccl")
    assert path.parent == tmp_path and path.is_file()
    blob = path.read_bytes()
    for fn in ("init_ccl", "init_ccl_per_worker", "allreduce", "allgather", "broadcast_from_worker0"):
        assert f"runtime.disco.nccl.{fn}".encode() in blob
    for fn in (n for n, plugin in functions.PLUGIN.items() if plugin == "nccl"):  # nccl_overlap.cc
        assert fn.encode() in blob
    assert {p.name for p in tmp_path.iterdir()} == {path.name, path.with_suffix(".json").name}  # no temp left


def test_cublas_plugin_missing_cublas_names_the_fix(monkeypatch):
    monkeypatch.delenv("CUBLAS_HOME", raising=False)
    real = toolchain.package_dir
    monkeypatch.setattr(toolchain, "package_dir", lambda name: None if name.startswith("nvidia") else real(name))
    monkeypatch.setattr(toolchain, "_cuda_home_or_none", lambda: None)
    with pytest.raises(PluginBuildError, match="pip install nvidia-cublas.*prefill_gemm=tir"):
        toolchain.cublas_dirs()


@pytest.mark.parametrize("name", sorted(CUDA_PLUGINS))
def test_cuda_plugin_compiles_where_cublas_and_nvcc_are(tmp_path, monkeypatch, name):
    """The CUDA plugins: kernels by nvcc for sm_80 and sm_90a (the prefill GEMM's warpgroup MMA needs
    the arch-specific target) + compute_90 PTX, linked against cuBLAS, and every function the
    registry says the plugin provides."""
    symbols = [n.encode() for n, plugin in functions.PLUGIN.items() if plugin == name]
    assert symbols
    try:
        toolchain.cublas_dirs(), toolchain.nvcc()
    except PluginBuildError as e:
        pytest.skip(f"cannot build the {name} plugin here: {e}")
    monkeypatch.setenv("LAB_PLUGIN_DIR", str(tmp_path))
    blob = build(name).read_bytes()
    assert all(symbol in blob for symbol in symbols) and b"sm_80" in blob and b"sm_90a" in blob


def test_every_library_function_has_a_plugin_and_a_cpu_version():
    from runtime_patch import cpu_functions, pipeline_p2p

    native = {n for n, plugin in functions.PLUGIN.items() if plugin != functions.PYTHON}
    assert {functions.PLUGIN[n] for n in native} <= set(PLUGINS)
    assert set(cpu_functions.IMPLEMENTATIONS) == native
    # the Python ones (the pipeline stages' transfers) serve every target
    assert set(pipeline_p2p.IMPLEMENTATIONS) == set(functions.PLUGIN) - native
    assert all(name.startswith(functions.PREFIX) for name in functions.PLUGIN)
    with pytest.raises(KeyError, match="declare them in runtime_patch.functions"):
        functions.register("llvm", ["lab.no.such_function"])
