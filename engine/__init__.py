"""Compile, load and run a Llama on TVM (no Hydra, no results folders): usable as a library."""

from runtime_patch import runtime_only as _runtime_only

_runtime_only.prepare()  # before anything imports tvm (a no-op unless TVM_USE_RUNTIME_LIB=1)
