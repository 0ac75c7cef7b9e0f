"""Compile a model for a target into a cached artifact folder.

An artifact folder holds `model.so` (the Relax VM executable with its kernels) and
`metadata.json` (model config, quantization, tp, target, parameter names/shapes/dtypes). Its
name ends in a hash of everything that changes the output: model config, quantization, tp,
target, TVM version and the engine sources that shape the compiled module (COMPILED_SOURCES). Folders are written to a temporary name and
renamed into place, so a cache entry is either complete or absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .config import AUTO_TIR, KERNEL_OPTIONS, KERNEL_SOURCES, ConfigError, ModelConfig
from .quantize import QuantSpec, quant_spec
from .sharding import ShardPlan

log = logging.getLogger(__name__)

TARGETS = ("llvm", "cuda")
ENGINE_DIR = Path(__file__).resolve().parent
# The engine sources that shape a compiled artifact (the cache key hashes them); the loaders and
# the generate loop are not among them, so changing those keeps the cache.
COMPILED_SOURCES = ("config.py", "quantize.py", "sharding.py", "model.py", "compile.py")


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    config: ModelConfig
    quant: str = "q0f16"
    tp: int = 1
    target: str = "llvm"  # llvm | cuda
    cuda_arch: str = "sm_90"
    cuda_graph: bool = True
    lm_head: str = "replicated"  # | "vocab_parallel" (engine.sharding)
    # Kernel sources (engine.config.KERNEL_OPTIONS): "library" (runtime_patch: cuBLAS and CUDA
    # kernels on cuda, NumPy on llvm) or "tir" (TVM's); "auto" is library on cuda, tir on llvm
    # (decode_gemv: tir everywhere).
    prefill_gemm: str = "auto"
    prefill_attention: str = "auto"
    decode_attention: str = "auto"
    decode_gemv: str = "auto"
    # Also export `batch_decode_pair` (engine.model): the two-micro-batch decode of full_overlap.
    microbatch_decode: bool = False

    def __post_init__(self) -> None:
        quant_spec(self.quant)
        self.plan  # validates the layout
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; choose one of: {', '.join(TARGETS)}")
        for name in KERNEL_OPTIONS:
            if getattr(self, name) == "auto":
                object.__setattr__(self, name, "library" if self.target == "cuda" and name not in AUTO_TIR else "tir")
            if getattr(self, name) not in KERNEL_SOURCES:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose one of: auto, "
                                  f"{', '.join(KERNEL_SOURCES)}")
        if not isinstance(self.microbatch_decode, bool):
            raise ConfigError(f"microbatch_decode must be true or false, got {self.microbatch_decode!r}")
        if not self.cuda_arch.startswith("sm_") or not self.cuda_arch[3:].isdigit():
            raise ConfigError(f"cuda_arch must look like 'sm_90', got {self.cuda_arch!r}")

    @property
    def kernels(self) -> dict[str, str]:
        """Where each heavy kernel comes from: {option: "tir" | "library"} (KERNEL_OPTIONS)."""
        return {name: getattr(self, name) for name in KERNEL_OPTIONS}

    @property
    def quant_spec(self) -> QuantSpec:
        return quant_spec(self.quant)

    @property
    def plan(self) -> ShardPlan:
        return ShardPlan(self.config, self.tp, self.lm_head)

    def tvm_target(self):
        import tvm

        if self.target == "llvm":
            return tvm.target.Target({"kind": "llvm"})
        return tvm.target.Target({"kind": "cuda", "arch": self.cuda_arch, "max_shared_memory_per_block": 49152,
                                  "max_threads_per_block": 1024, "thread_warp_size": 32,
                                  "registers_per_block": 65536})

    def key(self) -> str:
        import tvm

        source = hashlib.sha256()
        for name in COMPILED_SOURCES:
            source.update(name.encode() + (ENGINE_DIR / name).read_bytes())
        payload = json.dumps({
            "config": self.config.to_dict(), "quant": self.quant, "tp": self.tp, "target": self.target,
            "cuda_arch": self.cuda_arch if self.target == "cuda" else None,
            "cuda_graph": self.cuda_graph if self.target == "cuda" else None, "lm_head": self.plan.lm_head_layout,
            **self.kernels, "microbatch_decode": self.microbatch_decode, "tvm": tvm.__version__,
            "tvm_ffi": importlib.metadata.version("apache-tvm-ffi"), "engine": source.hexdigest(),
        }, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def folder_name(self) -> str:
        head = "-vocabpar" if self.plan.vocab_parallel else ""
        return f"{self.config.name}-{self.quant}-tp{self.tp}{head}-{self.target}-{self.key()}"


@dataclasses.dataclass(frozen=True)
class Artifact:
    path: Path
    metadata: dict

    @property
    def library(self) -> Path:
        return self.path / "model.so"

    @property
    def param_names(self) -> list[str]:
        return [p["name"] for p in self.metadata["params"]]

    @staticmethod
    def load(path: str | Path) -> "Artifact":
        path = Path(path)
        meta_file = path / "metadata.json"
        if not meta_file.is_file() or not (path / "model.so").is_file():
            raise ConfigError(f"{str(path)!r} is not a compiled artifact folder (needs model.so and metadata.json)")
        return Artifact(path, json.loads(meta_file.read_text()))

    def build_spec(self) -> BuildSpec:
        m = self.metadata
        return BuildSpec(ModelConfig(**m["config"]), m["quant"], m["tp"], m["target"], m["cuda_arch"], m["cuda_graph"],
                         m.get("lm_head", "replicated"), **{name: m.get(name, "tir") for name in KERNEL_OPTIONS},
                         microbatch_decode=m.get("microbatch_decode", False))


def default_cache_dir() -> Path:
    return Path(os.environ.get("LAB_CACHE_DIR", Path.home() / ".cache" / "tvm-tp-lab"))


def _pipeline(spec: BuildSpec, target):
    """Relax pipeline: TVM's default, plus dlight GPU schedules and CUDA graphs on cuda."""
    import tvm
    from tvm import relax

    if spec.target == "llvm":
        return relax.get_default_pipeline(target)
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    tensorize_crashes = importlib.metadata.version("apache-tvm-ffi").startswith("0.1.15")

    @tvm.transform.module_pass(opt_level=0)
    def no_tensorize(mod, _ctx):
        # apache-tvm-ffi 0.1.15.x segfaults in dlight's tensor-core matmul (docs/ARCHITECTURE.md);
        # with that version installed, fall back to SIMT matmuls rather than crash.
        if tensorize_crashes:
            log.warning("apache-tvm-ffi 0.1.15 installed: prefill matmuls without tensor cores "
                        "(pip install apache-tvm-ffi==0.1.14.post1 to get them back)")
            for gv, func in list(mod.functions.items()):
                if isinstance(func, tvm.tirx.PrimFunc):
                    mod[gv] = func.with_attr("dlight.do_not_tensorize", True)
        return mod

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cuda.library_dispatch_passes(target)
                + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                   relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(), no_tensorize,
                   dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                           dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
                + cuda.dataflow_lower_passes(target)
                + cuda.finalize_passes(target)
            )
            return seq(mod)

    return pipeline


def export(spec: BuildSpec):
    """The Relax IRModule and parameter list of one tp rank (no weights involved)."""
    from .model import LlamaForCausalLM

    model = LlamaForCausalLM(spec.config, spec.quant_spec, spec.tp, spec.tvm_target(), spec.lm_head, **spec.kernels,
                             microbatch_decode=spec.microbatch_decode)
    mod, params, _ = model.export_tvm(spec=model.export_spec(), allow_extern=True)
    return mod, params


def _build(mod, spec: BuildSpec, target, config: dict):
    import tvm

    from . import runtime_loader

    with runtime_loader.record_cuda_sources() as cuda_sources, \
            tvm.transform.PassContext(opt_level=3, config=config):
        executable = tvm.compile(mod, target, relax_pipeline=_pipeline(spec, target))
    return executable, cuda_sources


def compile_model(spec: BuildSpec, cache_dir: str | Path | None = None, force: bool = False) -> Artifact:
    """Compile (or reuse) the artifact for `spec`; returns the artifact folder."""
    import tvm

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    final = cache / spec.folder_name()
    if final.is_dir() and not force:
        try:
            return Artifact.load(final)
        except ConfigError:
            shutil.rmtree(final, ignore_errors=True)  # a damaged entry: rebuild it
    cache.mkdir(parents=True, exist_ok=True)
    log.info("compiling %s (%s, tp=%d, %s)", spec.config.name, spec.quant, spec.tp, spec.target)
    start = time.perf_counter()
    mod, params = export(spec)
    target = spec.tvm_target()
    config = {"relax.backend.use_cuda_graph": bool(spec.cuda_graph and spec.target == "cuda")}
    from . import runtime_loader

    try:
        executable, cuda_sources = _build(mod, spec, target, config)
    except tvm.error.InternalError as err:
        # TIR's common-subexpression elimination emits a use before its definition for some
        # small shapes (e.g. tiny at tp=2 on cuda) in this TVM; build those without it.
        if "used before definition" not in str(err):
            raise
        log.warning("TIR CSE failed (%s); rebuilding with tirx.disable_cse_tir", str(err).splitlines()[-1][:120])
        config["tirx.disable_cse_tir"] = True
        executable, cuda_sources = _build(export(spec)[0], spec, target, config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    try:
        executable.export_library(str(tmp / "model.so"))
        # Kernels are compiled when a CUDA library is loaded; with nvcc here, do it now, so that a
        # GPU node loads them from the artifact instead of compiling.
        precompiled = runtime_loader.precompile_cubins(cuda_sources.sources, spec.cuda_arch, tmp / "kernels") \
            if spec.target == "cuda" else 0
        metadata = {
            "config": spec.config.to_dict(), "quant": spec.quant, "tp": spec.tp, "target": spec.target,
            "cuda_arch": spec.cuda_arch, "cuda_graph": spec.cuda_graph, "lm_head": spec.plan.lm_head_layout,
            **spec.kernels, "microbatch_decode": spec.microbatch_decode, "key": spec.key(),
            "tvm_version": tvm.__version__, "compile_seconds": round(time.perf_counter() - start, 3),
            "precompiled_cubins": precompiled, "pass_config": config,
            "params": [{"name": n, "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)} for n, p in params],
        }
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2))
        if force and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():  # a concurrent build won the race
            return Artifact.load(final)
        raise
    log.info("compiled in %.1f s -> %s", time.perf_counter() - start, final)
    return Artifact.load(final)
