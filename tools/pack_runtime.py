"""Pack what a GPU node without a compiler (or without registry access) needs to run the lab's
compiled artifacts: a runtime-only apache-tvm, apache-tvm-ffi, hydra-core and omegaconf (and with
--cupti the CUPTI binding the timeline profiler uses), as wheels for the node's Python, unpacked
into one folder with an env.sh to source there.

    python -m tools.pack_runtime                       # -> .devkit/ for CPython 3.12, x86_64
    python -m tools.pack_runtime --python 3.11 --cupti --out /tmp/kit

On the node, from the repository root (carry .devkit/, the compiled artifacts and build/plugins):

    source .devkit/env.sh && LAB_CACHE_DIR=$PWD/artifacts python -m experiments.tensor_parallel device=cuda ...

TVM's compiler library (libtvm_compiler.so, ~260 MB) is left out: compile where the full TVM is
installed, run the artifacts with the runtime only (TVM_USE_RUNTIME_LIB=1, set by env.sh). The
versions of apache-tvm and apache-tvm-ffi are the ones installed here, so that artifacts and
plugins built here load there. The node needs numpy, and torch for random weights on the GPU;
matplotlib, tqdm, psutil, safetensors and tokenizers where it runs the experiments' reports.
NVLink multicast stays off (env.sh sets NCCL_NVLS_ENABLE=0 and its PyTorch/NVSHMEM twins).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
# Files of the apache-tvm wheel a runtime-only node never uses.
TVM_EXCLUDED = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty/", "tvm/web/")
# CUPTI's API-parameter modules (~24 MB): packed with xz (~3 MB), unpacked by env.sh, so that the
# kit fits what a device call carries.
CUPTI_PACKED = ("cupti/cuda_runtime_api_params", "cupti/cuda_driver_api_params")

ENV_SH = """\
# Source from the repository root on the GPU node: the lab with a runtime-only TVM.
export PYTHONPATH="$PWD:$PWD/{kit}/site${{PYTHONPATH:+:$PYTHONPATH}}"
export TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PATH="/usr/local/cuda/bin:$PATH"
if [ -f "{kit}/cupti_params.tar.xz" ] && [ ! -d "{kit}/site/cupti/cuda_driver_api_params" ]; then
  tar xJf "{kit}/cupti_params.tar.xz" -C "{kit}/site"
fi
true
"""


def requirements(cupti: bool) -> list[str]:
    """What the node lacks, pinned where the lab's builds depend on the version."""
    reqs = [f"apache-tvm=={importlib.metadata.version('apache-tvm')}",
            f"apache-tvm-ffi=={importlib.metadata.version('apache-tvm-ffi')}",
            "hydra-core==1.3.2", "omegaconf==2.3.0"]
    return reqs + (["cupti-python", "pyelftools"] if cupti else [])


def download_command(reqs: list[str], python: str, dest: Path) -> list[str]:
    """pip download of binary wheels for CPython `python` on x86_64 Linux, without dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + reqs


def download(reqs: list[str], python: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(download_command(reqs, python, dest), check=True)
    # omegaconf needs antlr4 4.9.*, published as a source archive only: build its pure-Python wheel.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest),
                    "antlr4-python3-runtime==4.9.3"], check=True)


def _excluded(name: str) -> bool:
    return any(name == e or (e.endswith("/") and name.startswith(e)) for e in TVM_EXCLUDED)


def assemble(wheels: list[Path], out: Path) -> Path:
    """Unpack `wheels` into out/site (the TVM compiler and its sources left out), pack CUPTI's
    large parameter modules into out/cupti_params.tar.xz, write out/env.sh; replaces `out`
    atomically (built in a sibling folder, then renamed). Returns `out`."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        site = tmp / "site"
        site.mkdir()
        for wheel in sorted(wheels):
            with zipfile.ZipFile(wheel) as archive:
                for info in archive.infolist():
                    if not (wheel.name.startswith("apache_tvm-") and _excluded(info.filename)):
                        archive.extract(info, site)
        for cache in site.rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
        packed = [site / name for name in CUPTI_PACKED if (site / name).exists()]
        packed += [p for p in (site / "cupti").glob("cuda_runtime_api_params*") if p not in packed] \
            if (site / "cupti").is_dir() else []
        if packed:
            with tarfile.open(tmp / "cupti_params.tar.xz", "w:xz") as tar:
                for path in packed:
                    tar.add(path, arcname=str(path.relative_to(site)))
            for path in packed:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        (tmp / "env.sh").write_text(ENV_SH.format(kit=out.name))
        (tmp / "WHEELS").write_text("".join(f"{w.name}\n" for w in sorted(wheels)))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.pack_runtime", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(".devkit"), help="the folder to write (default .devkit)")
    ap.add_argument("--python", default="3.12", help="the node's CPython version (default 3.12)")
    ap.add_argument("--cupti", action="store_true", help="add cupti-python (kernel timelines, ~10 MB packed)")
    ap.add_argument("--wheels", type=Path, help="use the wheels in this folder instead of downloading")
    args = ap.parse_args(argv)
    if args.wheels:
        wheels = sorted(args.wheels.glob("*.whl"))
        if not wheels:
            print(f"error: no *.whl in {args.wheels}", file=sys.stderr)
            return 2
        out = assemble(wheels, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                download(requirements(args.cupti), args.python, Path(tmp))
            except subprocess.CalledProcessError as err:
                print(f"error: pip could not download the wheels ({err}); is a package registry reachable? "
                      "or pass --wheels DIR", file=sys.stderr)
                return 1
            out = assemble(sorted(Path(tmp).glob("*.whl")), args.out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB; on the node: source {out.name}/env.sh (from the repository root)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
