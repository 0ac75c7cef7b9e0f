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
