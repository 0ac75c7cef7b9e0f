"""Compile a model for a target into a cached artifact folder.

An artifact folder holds `model.so` (the Relax VM executable with its kernels) and
`metadata.json`: the BuildSpec it was built from (`spec`, BuildSpec.to_dict), the library
functions it calls (`functions`, runtime_patch.functions), parameter names/shapes/dtypes, and how
it was built. Its name ends in a hash of everything that changes the output: the spec, the TVM
and tvm-ffi versions and the sources that shape the compiled module (COMPILED_SOURCES). Folders
are written to a temporary name and renamed into place, so a cache entry is either complete or
absent.
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

from runtime_patch import functions, settings

from .config import AUTO_LIBRARY_GEMV_BITS, KERNEL_OPTIONS, KERNEL_SOURCES, KV_CACHES, ConfigError, ModelConfig
from .quantize import QuantSpec, quant_spec
from .sharding import ShardPlan

log = logging.getLogger(__name__)

TARGETS = ("llvm", "cuda")
ENGINE_DIR = Path(__file__).resolve().parent
# The sources that shape a compiled artifact (the cache key hashes them): the engine's model
# definition and the names of the library functions it calls; the loaders and the generate loop
# are not among them, so changing those keeps the cache.
COMPILED_SOURCES = (*(ENGINE_DIR / n for n in ("config.py", "quantize.py", "sharding.py", "compile.py")),
                    *sorted((ENGINE_DIR / "model").glob("*.py")), Path(functions.__file__))


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    config: ModelConfig
    quant: str = "q0f16"
    tp: int = 1
    target: str = "llvm"  # llvm | cuda
    cuda_arch: str = "sm_90"
    cuda_graph: bool = True
    # The LM head's layout at tp > 1 (engine.sharding): replicated | vocab_parallel | auto (resolved_lm_head)
    lm_head: str = "auto"
    # Kernel sources (engine.config.KERNEL_OPTIONS): "library" (runtime_patch: cuBLAS and CUDA
    # kernels on cuda, NumPy on llvm) or "tir" (TVM's); "auto" is library on cuda, tir on llvm
    # (decode_gemv: library on cuda for the widths in AUTO_LIBRARY_GEMV_BITS only).
    prefill_gemm: str = "auto"
    prefill_attention: str = "auto"
    decode_attention: str = "auto"
    decode_gemv: str = "auto"
    decode_norm: str = "auto"
    allreduce: str = "auto"
    # engine.config.KV_CACHES: TVM's paged KV cache, or the project's static one (one-graph decode)
    kv_cache: str = "auto"
    # Also export `batch_decode_pair` (engine.model): the two-micro-batch decode of full_overlap.
    microbatch_decode: bool = False
    # The CUDA decode attention splits a sequence's keys as for a batch of 1 whatever the batch, so a
    # sequence's sums do not depend on what else is in the batch (a scheduler that splits the batch
    # then yields the same tokens bit for bit; slower at large batches).
    batch_invariant: bool = False
    # Pipeline parallelism: the layers split over `pp` stages (engine.sharding.stage_layers), each
    # its own compiled module; this spec is stage `stage`'s (compile_pipeline builds them all).
    pp: int = 1
    stage: int = 0

    def __post_init__(self) -> None:
        for name in ("pp", "stage"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.lm_head == "auto":
            object.__setattr__(self, "lm_head", self.resolved_lm_head(self.config, self.tp, self.pp, self.target))
        self.plan.check_quant(quant_spec(self.quant))  # validates the layout, and quantized shards
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; choose one of: {', '.join(TARGETS)}")
        if self.pp > 1:
            self._settle_pipeline_options()
        for name in KERNEL_OPTIONS:
            if getattr(self, name) == "auto":
                object.__setattr__(self, name, self._auto_source(name))
            if getattr(self, name) not in KERNEL_SOURCES:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose one of: auto, "
                                  f"{', '.join(KERNEL_SOURCES)}")
        if self.quant_spec.bits not in functions.GEMV_BY_BITS:  # nothing for the option to choose: one artifact
            object.__setattr__(self, "decode_gemv", "tir")
        object.__setattr__(self, "kv_cache", self.resolved_kv_cache(self.kv_cache, self.target))
        if self.kv_cache not in KV_CACHES:
            raise ConfigError(f"unknown kv_cache {self.kv_cache!r}; choose one of: auto, {', '.join(KV_CACHES)}")
        for name in ("microbatch_decode", "batch_invariant", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.microbatch_decode and self.kv_cache != "paged":
            raise ConfigError("microbatch_decode (batch_decode_pair, full_overlap's decode) exists on the paged KV "
                              "cache only; build with kv_cache=paged")
        if not self.cuda_arch.startswith("sm_") or not self.cuda_arch[3:].isdigit():
            raise ConfigError(f"cuda_arch must look like 'sm_90', got {self.cuda_arch!r}")

    def _auto_source(self, option: str) -> str:
        """What `auto` means for a kernel option: the library's kernels on cuda (the batch-1 GEMV
        only for the weight widths where it is faster than TVM's), TVM's on llvm."""
        if self.target != "cuda":
            return "tir"
        if option == "decode_gemv":
            return "library" if self.quant_spec.bits in AUTO_LIBRARY_GEMV_BITS else "tir"
        return "library"

    def _settle_pipeline_options(self) -> None:
        """With pipeline stages the allreduce within a stage is TVM's CCL (in-group; the one-shot
        maps every worker's memory): `allreduce=library` is refused. The KV cache is settled as
        without stages (`auto`: the static cache on cuda, each stage's step in a CUDA graph with the
        NCCL calls of its transfers, runtime_patch.pipeline_p2p: fixed buffers, fixed peers); on
        TVM's paged cache no graph is made. Measured on 2 x H200, Llama-3-8B pp=2 b1: 214.0
        tokens/s on the static cache, 180.4 on the paged one (docs/BENCHMARKS.md)."""
        if self.allreduce == "auto":
            object.__setattr__(self, "allreduce", "tir")
        elif self.allreduce != "tir":
            raise ConfigError(f"pp={self.pp} runs with allreduce=tir (got {self.allreduce}); drop the allreduce setting "
                              "or use pp=1")
        if self.microbatch_decode:
            raise ConfigError(f"pp={self.pp}: full_overlap's micro-batched decode (microbatch_decode) is for tp "
                              "only; use pp=1")
        if self.resolved_kv_cache(self.kv_cache, self.target) == "paged":
            object.__setattr__(self, "cuda_graph", False)

    @property
    def stages(self) -> list["BuildSpec"]:
        """The spec of every pipeline stage (this one's for pp=1)."""
        return [dataclasses.replace(self, stage=s) for s in range(self.pp)]

    @staticmethod
    def resolved_lm_head(config: ModelConfig, tp: int, pp: int, target: str) -> str:
        """`auto`: vocabulary-parallel on cuda at tp > 1 without pipeline stages where the head is
        not tied and the vocabulary divides by tp (each rank reads 1/tp of the head; an allgather
        of the logits follows: Llama-3-8B at tp=2 on 2 x H200 decoded 365.1 tokens/s against 350.2
        replicated, docs/BENCHMARKS.md); replicated otherwise (and on llvm, where the CPU tests
        choose each layout themselves)."""
        if target == "cuda" and tp > 1 and pp == 1 and not config.tie_word_embeddings and config.vocab_size % tp == 0:
            return "vocab_parallel"
        return "replicated"

    @staticmethod
    def resolved_kv_cache(kv_cache: str, target: str) -> str:
        """`auto`: the static cache on cuda (one-graph decode step), TVM's paged cache on llvm."""
        return ("static" if target == "cuda" else "paged") if kv_cache == "auto" else kv_cache

    @property
    def kernels(self) -> dict[str, str]:
        """Where each heavy kernel comes from: {option: "tir" | "library"} (KERNEL_OPTIONS)."""
        return {name: getattr(self, name) for name in KERNEL_OPTIONS}

    @property
    def quant_spec(self) -> QuantSpec:
        return quant_spec(self.quant)

    @property
    def plan(self) -> ShardPlan:
        return ShardPlan(self.config, self.tp, self.lm_head, self.pp, self.stage)

    def tvm_target(self):
        import tvm

        if self.target == "llvm":
            return tvm.target.Target({"kind": "llvm"})
        return tvm.target.Target({"kind": "cuda", "arch": self.cuda_arch, "max_shared_memory_per_block": 49152,
                                  "max_threads_per_block": 1024, "thread_warp_size": 32,
                                  "registers_per_block": 65536})

    def to_dict(self) -> dict:
        """Every field, plain JSON (the model config as a dict); `from_dict` reads it back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["config"] = self.config.to_dict()
        d["lm_head"] = self.plan.lm_head_layout
        return d

    @staticmethod
    def from_dict(d: dict) -> "BuildSpec":
        known = {f.name for f in dataclasses.fields(BuildSpec)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"a build spec with unknown fields {unknown} (an artifact of another version of the lab)")
        return BuildSpec(**{**d, "config": ModelConfig(**d["config"])})

    def key(self) -> str:
        import tvm

        source = hashlib.sha256()
        for path in COMPILED_SOURCES:
            source.update(path.name.encode() + path.read_bytes())
        payload = json.dumps({"spec": self.to_dict(), "tvm": tvm.__version__,
                              "tvm_ffi": importlib.metadata.version("apache-tvm-ffi"),
                              "sources": source.hexdigest()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def folder_name(self) -> str:
        head = "-vocabpar" if self.plan.vocab_parallel else ""
        stage = f"-pp{self.pp}s{self.stage}" if self.pp > 1 else ""
        return f"{self.config.name}-{self.quant}-tp{self.tp}{stage}{head}-{self.target}-{self.key()}"


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
    def load(path: str | Path, verify: bool = False) -> "Artifact":
        """The artifact folder at `path`, checked: metadata.json readable and well formed, and
        every file it records (model.so, kernels) present with its recorded size; with `verify`,
        also its recorded SHA-256 (what compile_model does before reusing a cache entry). A
        damaged folder raises ConfigError naming the file, never reaches the loader (a truncated
        model.so is a bus error there)."""
        path = Path(path)
        meta_file = path / "metadata.json"
        if not meta_file.is_file() or not (path / "model.so").is_file():
            raise ConfigError(f"{str(path)!r} is not a compiled artifact folder (needs model.so and metadata.json)")
        try:
            metadata = json.loads(meta_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = f"{err.msg} at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else str(err)
            raise ConfigError(f"{meta_file} is not valid JSON ({reason}): a damaged artifact") from None
        problem = _metadata_problem(metadata)
        if problem:
            raise ConfigError(f"{meta_file}: {problem}: a damaged artifact")
        artifact = Artifact(path, metadata)
        artifact.check_files(verify)
        return artifact

    def check_files(self, checksums: bool = False) -> None:
        """Raise ConfigError if a file recorded in metadata.json ("files") is missing or has
        another size (or, with `checksums`, another SHA-256). Artifacts of older builds record
        none: nothing to check."""
        for name, record in sorted(self.metadata.get("files", {}).items()):
            file = self.path / name
            try:
                size = file.stat().st_size
            except OSError:
                raise ConfigError(f"{file} is missing: a damaged artifact") from None
            if size != record["bytes"]:
                raise ConfigError(f"{file} has {size} bytes, metadata.json records {record['bytes']}: a damaged "
                                  "(truncated?) artifact")
            if checksums and _sha256(file) != record["sha256"]:
                raise ConfigError(f"{file} does not match the SHA-256 metadata.json records: a damaged artifact")

    def param_bytes(self, prefix: str) -> int:
        """Bytes of the parameters whose names start with `prefix` (e.g. "model.embed_tokens")."""
        import numpy as np

        return sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
                   for p in self.metadata["params"] if p["name"].startswith(prefix))

    @property
    def spec(self) -> BuildSpec:
        return BuildSpec.from_dict(self.metadata["spec"])

    @property
    def functions(self) -> list[str]:
        """The library functions (runtime_patch.functions) the compiled model calls."""
        return list(self.metadata.get("functions", []))


def _metadata_problem(metadata) -> str | None:
    """What makes a parsed metadata.json unusable, or None."""
    if not isinstance(metadata, dict):
        return "not a JSON object"
    if not isinstance(metadata.get("spec"), dict) or not isinstance(metadata["spec"].get("config"), dict):
        return "no build spec"
    params = metadata.get("params")
    if not isinstance(params, list) or not all(isinstance(p, dict) and {"name", "shape", "dtype"} <= set(p)
                                               for p in params):
        return "no parameter list"
    files = metadata.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(r, dict) and isinstance(r.get("bytes"), int)
                                              and isinstance(r.get("sha256"), str) for r in files.values()):
        return "a malformed file list"
    return None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_records(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `folder` (metadata.json aside)."""
    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "metadata.json"}


def current_umask() -> int:
    """This process's umask, read without changing it where Linux says it (/proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _discard(folder: Path) -> None:
    """Move a damaged cache entry out of the way (atomically), then delete it."""
    aside = folder.with_name(f".{folder.name}.damaged.{os.getpid()}.{time.monotonic_ns()}")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:  # another process moved it first
        return
    except OSError:
        aside = folder
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _cached(final: Path, spec: BuildSpec) -> Artifact | None:
    """The cache entry at `final` if it is whole and of `spec` (checksums verified); a damaged
    one is named in a warning and removed (the caller rebuilds it)."""
    if not final.is_dir():
        if final.exists() or final.is_symlink():
            log.warning("cache entry %s is not a folder: replacing it", final)
            _discard(final)
        return None
    try:
        artifact = Artifact.load(final, verify=True)
        if artifact.metadata.get("key") != spec.key() or \
                artifact.metadata["spec"] != json.loads(json.dumps(spec.to_dict())):
            raise ConfigError(f"{final / 'metadata.json'} describes another build")
        return artifact
    except ConfigError as err:
        log.warning("rebuilding the damaged cache entry %s: %s", final.name, err)
    _discard(final)
    return None


def cache_folder(cache: Path) -> Path:
    """The compile cache `cache`: a folder, or one that can be made (a ConfigError naming the fix
    where it cannot). It may be read-only (a GPU node's artifacts): writing is checked where a
    build needs it."""
    if cache.exists() and not cache.is_dir():
        raise ConfigError(f"the compile cache {cache} is a file, not a folder; set cache_dir=DIR (or LAB_CACHE_DIR)")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the compile cache {cache} ({err.strerror or err}); set cache_dir=DIR "
                          "(or LAB_CACHE_DIR)") from None
    return cache


def default_cache_dir() -> Path:
    return settings.cache_dir()


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

    model = LlamaForCausalLM(spec)
    mod, params, _ = model.export_tvm(spec=model.export_spec(), allow_extern=True)
    for name in model.STATIC_ARGUMENT_FUNCTIONS:
        if name in [gv.name_hint for gv in mod.get_global_vars()]:
            # every argument is as fixed as the weights: the CUDA-graph rewrite captures what reads them
            mod[name] = mod[name].with_attr("num_input", 0)
    return mod, params


def library_functions(mod) -> list[str]:
    """The runtime_patch.functions names a Relax module calls (extern functions, KV-cache slots)."""
    from tvm import relax

    found: set[str] = set()

    def visit(expr) -> None:
        if isinstance(expr, relax.ExternFunc) and expr.global_symbol.startswith(functions.PREFIX):
            found.add(str(expr.global_symbol))

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sorted(found)


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

    cache = cache_folder(Path(cache_dir) if cache_dir else default_cache_dir())
    final = cache / spec.folder_name()
    if not force:
        found = _cached(final, spec)
        if found is not None:
            return found
    if settings.flag("TVM_USE_RUNTIME_LIB"):  # a runtime-only TVM (a GPU node's devkit): no compiler
        raise ConfigError(f"no compiled artifact {final.name} in {cache}, and this TVM is runtime-only "
                          "(TVM_USE_RUNTIME_LIB=1): build it where TVM's compiler is installed (python -m "
                          "bench.build_artifacts ...) and carry it here, or point cache_dir at the folder holding it")
    log.info("compiling %s (%s, tp=%d%s, %s)", spec.config.name, spec.quant, spec.tp,
             f", pp={spec.pp} stage {spec.stage}" if spec.pp > 1 else "", spec.target)
    start = time.perf_counter()
    mod, params = export(spec)
    called = library_functions(mod)
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
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the entry from a team sharing the cache
    except OSError as err:
        raise ConfigError(f"cannot write to the compile cache {cache} ({err.strerror or err}); set cache_dir=DIR "
                          "(or LAB_CACHE_DIR)") from None
    try:
        executable.export_library(str(tmp / "model.so"))
        # Kernels are compiled when a CUDA library is loaded; with nvcc here, do it now, so that a
        # GPU node loads them from the artifact instead of compiling.
        precompiled = runtime_loader.precompile_cubins(cuda_sources.sources, spec.cuda_arch, tmp / "kernels") \
            if spec.target == "cuda" else 0
        metadata = {
            "spec": spec.to_dict(), "key": spec.key(), "functions": called,
            "tvm_version": tvm.__version__, "compile_seconds": round(time.perf_counter() - start, 3),
            "precompiled_cubins": precompiled, "pass_config": config,
            "params": [{"name": n, "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)} for n, p in params],
        }
        # What load checks: sizes always, SHA-256 before the cache reuses the entry.
        metadata["files"] = _file_records(tmp)
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2))
        if force and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():  # a concurrent build won the race
            return Artifact.load(final, verify=True)
        raise
    log.info("compiled in %.1f s -> %s", time.perf_counter() - start, final)
    return Artifact.load(final)


def compile_pipeline(spec: BuildSpec, cache_dir: str | Path | None = None, force: bool = False) -> list[Artifact]:
    """The artifact of every pipeline stage of `spec` (one for pp=1), compiled or reused."""
    return [compile_model(stage, cache_dir, force) for stage in spec.stages]
