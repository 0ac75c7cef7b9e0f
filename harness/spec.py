"""A run's configuration, settled once from the Hydra config at the top of an entry point.

    spec = RunSpec.from_hydra(cfg)          # validates everything; ConfigError names the fix
    build = spec.build_for(quant="q4f16_1", tp=2)   # the BuildSpec of one sweep point
    source = spec.weights.source(spec.config, build.target)

Nothing below the entry points reads the Hydra config: sweeps, measurement and reports take a
RunSpec (or the Workload, Weights and BuildSpec it holds).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engine.compile import BuildSpec, default_cache_dir
from engine.compile import cache_folder as checked_cache_folder
from engine.config import KERNEL_OPTIONS, ConfigError, ModelConfig, from_hf_folder, preset
from engine.quantize import quant_spec
from engine.weights import TensorSource, check_checkpoint, open_source
from runtime_patch.disco import Cluster, ClusterError

WEIGHT_BACKENDS = ("auto", "numpy", "torch")


def positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one sweep point generates: `batch` prompts of `prompt_len` random tokens, each
    continued by `new_tokens`; `warmup` untimed runs, then `repeats` timed ones."""

    name: str
    batch: int
    prompt_len: int
    new_tokens: int
    warmup: int
    repeats: int

    @staticmethod
    def from_hydra(cfg, config: ModelConfig, **changes) -> "Workload":
        values = {k: cfg[k] for k in ("batch", "prompt_len", "new_tokens", "warmup", "repeats")}
        values.update(changes)
        w = Workload(str(cfg.get("name") or "custom"), **values)
        w.check(config)
        return w

    def check(self, config: ModelConfig) -> None:
        for key in ("batch", "prompt_len", "new_tokens", "repeats"):
            positive(f"workload.{key}", getattr(self, key))
        non_negative("workload.warmup", self.warmup)
        if self.max_total_len > config.max_position_embeddings:
            raise ConfigError(f"workload.prompt_len + workload.new_tokens = {self.max_total_len} exceeds "
                              f"{config.name}'s context of {config.max_position_embeddings} tokens; lower "
                              "workload.prompt_len or workload.new_tokens")

    @property
    def max_total_len(self) -> int:
        return self.prompt_len + self.new_tokens

    @property
    def prefill_chunk(self) -> int:
        return min(self.prompt_len, 2048)

    def replace(self, **changes) -> "Workload":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Weights:
    """A local HF checkpoint folder (`path`), or seeded random weights drawn with `backend`
    (auto: torch on the GPU for a cuda target where torch has CUDA, else numpy)."""

    path: str | None
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in WEIGHT_BACKENDS:
            raise ConfigError(f"unknown model.random_backend {self.backend!r}; choose one of: "
                              f"{', '.join(WEIGHT_BACKENDS)}")

    def resolved_backend(self, target: str) -> str:
        if self.backend != "auto":
            return self.backend
        if target == "cuda":
            try:
                import torch

                return "torch" if torch.cuda.is_available() else "numpy"
            except ImportError:
                pass
        return "numpy"

    def source(self, config: ModelConfig, target: str = "llvm") -> TensorSource:
        return open_source(config, self.path, seed=self.seed, backend=self.resolved_backend(target),
                           device="cuda:0" if target == "cuda" else "cpu")


def cuda_visible() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001  (a runtime without CUDA support)
        return False


def resolve_target(device_cfg) -> tuple[str, str]:
    """(engine target, cuda arch) from the `device` config group."""
    kind = device_cfg.get("kind")
    if kind not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {kind!r}; choose device=auto, device=cpu or device=cuda")
    has_gpu = cuda_visible()
    if kind == "auto":
        kind = "cuda" if has_gpu else "cpu"
    arch = device_cfg.get("cuda_arch")
    if kind == "cuda":
        if not has_gpu:  # every entry point runs what it builds: refuse before compiling
            raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu (to compile for a GPU node "
                              "without running: python -m bench.build_artifacts)")
        if arch is None:
            import tvm

            arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
        return "cuda", arch
    return "llvm", arch or "sm_90"


def model_config(model_cfg) -> ModelConfig:
    """The preset, or the checkpoint at model.path: its config.json and its tensors checked
    (engine.weights.check_checkpoint) before anything is compiled."""
    if model_cfg.get("path"):
        config = from_hf_folder(model_cfg.path)
        check_checkpoint(model_cfg.path, config)
        return config
    return preset(model_cfg.get("preset"))


CLUSTER_KEYS = ("hosts", "port", "workers_per_host", "launch", "connect_timeout_s")


def cluster_from_hydra(cluster_cfg, target: str = "llvm") -> Cluster:
    """The `cluster` config group (conf/cluster/: local, loopback, two_nodes) as a Cluster,
    checked: ConfigError (one line) for bad values, and for a cluster of several hosts that the
    target's CCL cannot span (cpu_shm: every host must be this machine)."""
    if cluster_cfg is None:
        return Cluster()
    unknown = sorted(set(cluster_cfg) - set(CLUSTER_KEYS))
    if unknown:
        raise ConfigError(f"unknown cluster setting(s) {unknown}; the keys are: {', '.join(CLUSTER_KEYS)}")
    values = {k: cluster_cfg[k] for k in CLUSTER_KEYS if k in cluster_cfg}
    if "hosts" in values and not isinstance(values["hosts"], str):
        values["hosts"] = tuple(values["hosts"] or ())
    try:
        cluster = Cluster(**values)
        if cluster.multi_host:
            cluster.check_launch()
            cluster.check_ccl("nccl" if target == "cuda" else "cpu_shm")
    except ClusterError as err:
        raise ConfigError(str(err)) from None
    return cluster


def cache_folder(value) -> Path:
    """The compile cache of `cache_dir` (default $LAB_CACHE_DIR), checked (engine.compile.cache_folder)."""
    return checked_cache_folder(Path(str(value)).expanduser() if value else default_cache_dir())


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything an entry point's run is made of, checked. `build` is the BuildSpec of the
    configured point (quant, tp from the config where it has one value); sweeps derive theirs
    with `build_for`."""

    experiment: str
    config: ModelConfig
    weights: Weights
    build: BuildSpec
    workload: Workload | None
    cache_dir: Path
    seed: int = 0
    measure_bandwidth: bool = True
    breakdown: bool = True  # trace one more repeat per point (GPU: CUPTI) for the time breakdown
    cluster: Cluster = Cluster()  # the hosts a tp x pp > 1 session runs on (one: this machine)
    # The build options as the config gave them ("auto" where it left them), which every point's
    # BuildSpec settles anew: auto resolves by the point (e.g. the paged KV cache where pp > 1).
    requested: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def from_hydra(cfg, experiment: str, quant: str | None = None, tp: int = 1, **build_options) -> "RunSpec":
        """`quant`: where the config has no single `quant` (quant_compare); `tp`: the point's tp
        where the config's is a list; `build_options`: BuildSpec fields the experiment sets."""
        config = model_config(cfg.model)
        weights = Weights(cfg.model.get("path"), int(cfg.model.get("seed", 0)),
                          str(cfg.model.get("random_backend", "auto")))
        target, arch = resolve_target(cfg.device)
        cluster = cluster_from_hydra(cfg.get("cluster"), target)
        quant = quant or cfg.quant.name
        device = cfg.device
        kernels = {name: device.get(name) or "auto" for name in KERNEL_OPTIONS}
        if cluster.multi_host and target == "cuda":
            if kernels["allreduce"] == "library":
                raise ConfigError("device.allreduce=library (the one-shot allreduce over CUDA IPC) works within one "
                                  "machine; use device.allreduce=tir (NCCL) with a cluster of several hosts")
            kernels["allreduce"] = "tir"
        cuda_graph = device.get("cuda_graph", True)
        if not isinstance(cuda_graph, bool):
            raise ConfigError(f"device.cuda_graph must be true or false, got {cuda_graph!r}")
        requested = {**kernels, "kv_cache": device.get("kv_cache") or "auto", "cuda_graph": cuda_graph,
                     "lm_head": cfg.get("lm_head") or "auto"}
        build = BuildSpec(config, quant_spec(quant).name, positive("tp", tp), target, arch, **requested,
                          **build_options)
        workload = Workload.from_hydra(cfg.workload, config) if cfg.get("workload") is not None else None
        return RunSpec(experiment, config, weights, build, workload, cache_folder(cfg.get("cache_dir")),
                       int(cfg.get("seed", 0)), bool(cfg.get("measure_bandwidth", True)),
                       bool(cfg.get("breakdown", True)), cluster, tuple(requested.items()))

    @property
    def target(self) -> str:
        return self.build.target

    def check_devices(self, devices: int) -> None:
        """Refuse a run that needs more devices than this machine has (or CPU workers than sane);
        with a cluster of several hosts, `devices` (tp x pp) must fill its hosts, and each host
        (taken to be like this one) needs its share of the GPUs."""
        if self.cluster.multi_host:
            from engine.session import check_cluster

            per_host = check_cluster(self.cluster, devices)
            if self.target == "cuda":
                from engine.session import visible_cuda_devices

                found = visible_cuda_devices()
                if per_host > found:
                    raise ConfigError(f"{per_host} GPUs are needed on each of the cluster's {len(self.cluster.hosts)} "
                                      f"hosts but {found} are visible here; use tp x pp <= "
                                      f"{found * len(self.cluster.hosts)}")
                return
        if self.target == "cuda":
            from engine.session import visible_cuda_devices

            found = visible_cuda_devices()
            if devices > found:
                raise ConfigError(f"{devices} GPUs are needed but {found} are visible; use tp values <= {found}")
        else:
            from engine.disco import MAX_CPU_WORKERS

            if devices > MAX_CPU_WORKERS:
                raise ConfigError(f"{devices} devices on the CPU would start {devices} worker processes; "
                                  f"at most {MAX_CPU_WORKERS}")

    def build_for(self, **changes) -> BuildSpec:
        """The BuildSpec of a point: this run's with `changes` (quant, tp, pp, microbatch_decode,
        ...), its `auto` options settled for the point."""
        return dataclasses.replace(self.build, **{**dict(self.requested), **changes})

    def source(self) -> TensorSource:
        return self.weights.source(self.config, self.target)

    def to_dict(self) -> dict:
        return {"experiment": self.experiment, "model": self.config.to_dict(),
                "weights": dataclasses.asdict(self.weights), "build": self.build.to_dict(),
                "workload": dataclasses.asdict(self.workload) if self.workload else None,
                "cache_dir": str(self.cache_dir), "seed": self.seed, "cluster": self.cluster.to_dict()}
