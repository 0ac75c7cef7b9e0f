"""The engine's one door into `runtime_patch`: prepare TVM's runtime for an artifact's target."""

from __future__ import annotations

from .config import ConfigError


def check_target(spec) -> None:
    if spec.target != "cuda":
        return
    from runtime_patch import bootstrap

    bootstrap.ensure_cuda_compiler(spec.cuda_arch)
    try:
        bootstrap.check_cuda_arch(spec.cuda_arch)
    except bootstrap.RuntimeMismatch as err:
        raise ConfigError(str(err)) from None


def start_disco(num_workers: int, ccl: str, device_ids: list[int], spec):
    """A disco ProcessSession with `ccl` initialised in the controller and every worker."""
    from runtime_patch import ccl as ccl_plugins

    try:
        return ccl_plugins.start_session(num_workers, ccl, device_ids)
    except ccl_plugins.CCLBuildError as err:
        raise ConfigError(str(err)) from None
