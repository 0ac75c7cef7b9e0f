"""NVML (nvidia-ml-py), opened in one place: the GPUs a result names, the memory a run used, and
the profiler's sampler all go through `Nvml.open()`.

    nv = Nvml.open()          # None without nvidia-ml-py, a driver or a GPU
    if nv is not None:
        with nv:
            nv.module.nvmlDeviceGetMemoryInfo(nv.handles[0])
"""

from __future__ import annotations


class Nvml:
    """An initialised NVML and a handle per visible GPU; `close()` (or leaving `with`) shuts it down."""

    def __init__(self, module, handles: list):
        self.module, self.handles = module, handles

    @staticmethod
    def open() -> "Nvml | None":
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001  (nvidia-ml-py absent, or no driver)
            return None
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001
            handles = []
        if not handles:
            _shutdown(pynvml)
            return None
        return Nvml(pynvml, handles)

    def read(self, fn_name: str, *args):
        """`pynvml.<fn_name>(*args)`, None where the card does not report it."""
        try:
            return getattr(self.module, fn_name)(*args)
        except Exception:  # noqa: BLE001
            return None

    @staticmethod
    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else value

    def close(self) -> None:
        _shutdown(self.module)

    def __enter__(self) -> "Nvml":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shutdown(module) -> None:
    try:
        module.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass
