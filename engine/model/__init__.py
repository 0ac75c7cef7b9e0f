"""The Llama the lab compiles (`llama`), the kernel each of its products uses (`kernels`), its KV
cache (`kv_cache`), and where it reaches into TVM beyond the public API (`tvm_fixes`)."""

from .llama import LlamaForCausalLM  # noqa: F401
