"""From a Hydra config to engine objects, and the error handling every entry point shares."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from engine.compile import Artifact, BuildSpec, compile_model, default_cache_dir
from engine.config import KERNEL_OPTIONS, ConfigError, ModelConfig, from_hf_folder, preset
from engine.weights import TensorSource, open_source

log = logging.getLogger("experiments")


def quiet_tvm() -> None:
    for name in ("tvm", "tvm.relax", "tvm.s_tir", "tvm.ffi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TVM_LOG_DEBUG", "0")


def cuda_visible() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001  (a runtime without CUDA support)
        return False


def resolve_target(device_cfg) -> tuple[str, str]:
    """(engine target, cuda arch) from the `device` config group."""
    kind = device_cfg.kind
    if kind not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {kind!r}; choose device=auto, device=cpu or device=cuda")
    has_gpu = cuda_visible()
    if kind == "auto":
        kind = "cuda" if has_gpu else "cpu"
    arch = device_cfg.get("cuda_arch")
    if kind == "cuda":
        if arch is None:
            if not has_gpu:
                raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu "
                                  "(or set device.cuda_arch=sm_90 to only build for a GPU)")
            import tvm

            arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
        return "cuda", arch
    return "llvm", arch or "sm_90"


def model_config(model_cfg) -> ModelConfig:
    if model_cfg.get("path"):
        return from_hf_folder(model_cfg.path)
    return preset(model_cfg.preset)


def weights_source(model_cfg, config: ModelConfig, target: str = "llvm") -> TensorSource:
    """The checkpoint at model.path, or seeded random weights: drawn with torch on the GPU for a
    cuda target when torch has CUDA (model.random_backend=auto), else with numpy."""
    backend = model_cfg.get("random_backend", "auto")
    if backend == "auto":
        backend = "numpy"
        if target == "cuda":
            try:
                import torch

                backend = "torch" if torch.cuda.is_available() else "numpy"
            except ImportError:
                pass
    return open_source(config, model_cfg.get("path"), seed=int(model_cfg.get("seed", 0)), backend=backend,
                       device="cuda:0" if target == "cuda" else "cpu")


def cache_dir(cfg) -> Path:
    return Path(cfg.cache_dir) if cfg.get("cache_dir") else default_cache_dir()


def build_spec(config: ModelConfig, quant: str, tp: int, target: str, arch: str, cfg,
               microbatch_decode: bool = False) -> BuildSpec:
    device = cfg.get("device") or {}
    return BuildSpec(config, quant, tp, target, arch, lm_head=cfg.get("lm_head") or "replicated",
                     **{name: device.get(name) or "auto" for name in KERNEL_OPTIONS},
                     microbatch_decode=microbatch_decode)


def build(config: ModelConfig, quant: str, tp: int, target: str, arch: str, cfg) -> Artifact:
    return compile_model(build_spec(config, quant, tp, target, arch, cfg), cache_dir(cfg))


def open_session(artifact: Artifact, source: TensorSource):
    """A VM session for tp == 1, a disco session over one worker per device for tp > 1."""
    if artifact.metadata["tp"] == 1:
        from engine.session import VMSession

        return VMSession(artifact, source)
    from engine.disco import DiscoSession

    return DiscoSession(artifact, source)


def positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _exit_now_after_nccl(code: int) -> None:
    """Results are written and sessions closed: after an nccl session, leave without interpreter
    teardown, which was seen to hang there (see runtime_patch.ccl.nccl_was_used)."""
    from runtime_patch import ccl

    if ccl.nccl_was_used():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def guarded(task: Callable) -> Callable:
    """Wrap a Hydra task `task(cfg, run_dir) -> exit code`. A failure before the task wrote its
    results leaves a results.json with status "error" (never one claiming success); user-facing
    errors become one line on stderr and exit status 2, with no traceback."""

    @functools.wraps(task)
    def run(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from .results import RunDir

        quiet_tvm()
        run_dir = RunDir(HydraConfig.get().runtime.output_dir)
        try:
            code = task(cfg, run_dir)
        except Exception as err:
            if not run_dir.path("results.json").exists():
                run_dir.write_failure(OmegaConf.to_container(cfg, resolve=True), str(err))
            if not isinstance(err, ConfigError):
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        _exit_now_after_nccl(code or 0)
        if code:
            sys.exit(code)

    return run
