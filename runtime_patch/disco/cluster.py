"""More than one host: where a disco session's workers run, and the node processes of the other hosts.

    cluster = Cluster(hosts=("10.0.0.1", "10.0.0.2"), port=29600)   # the first host: this one
    sess = start_session(4, "nccl", cluster=cluster)                 # 2 workers on each host

A cluster of one host (the default) is a plain ProcessSession. With more, the session is TVM's
`SocketSession`: the controller (this process) listens on hosts[0]:port and runs the workers of
node 0, the workers 0..k-1 (k = workers per host); every other host runs a node process,
`python -m runtime_patch.disco.node --host <hosts[0]> --port <port> --workers <k>`, which connects
to it and runs k workers (node i holds workers i*k..i*k+k-1; node ids follow the order in which
the nodes connect). Each host's workers use its own devices 0..k-1. With `launch="local"` the
controller starts those node processes itself, on this machine (every host must be this
machine: a loopback test of the multi-host path); with `launch="manual"` you start them.

cpu_shm is shared memory, so it works only where every host is this machine; NCCL (TVM's nccl.cc:
the controller makes the unique id and the session hands it to every worker) works across hosts.
"""

from __future__ import annotations

import atexit
import dataclasses
import ipaddress
import logging
import socket
import subprocess
import sys
import time
import weakref

log = logging.getLogger("runtime_patch.disco")

NODE_ENTRYPOINT = "runtime_patch.disco.node"
LAUNCHES = ("local", "manual")

__all__ = ["Cluster", "ClusterError", "LocalNodes", "NODE_ENTRYPOINT", "free_port", "is_this_machine", "node_command"]


class ClusterError(ValueError):
    """A cluster setting that cannot work; the message is one line that names the fix."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The hosts of a disco session. `hosts`: the first is the controller's (this process's)
    address, which it listens on and the other hosts' nodes connect to; `port`: that port (0: a
    free one, picked at start; only with launch="local"); `workers_per_host`: workers on each host
    (None: the session's workers split evenly over the hosts); `launch`: who starts the node
    processes of hosts[1:] ("local": this process, on this machine; "manual": you);
    `connect_timeout_s`: how long the controller waits for every node to connect."""

    hosts: tuple[str, ...] = ("localhost",)
    port: int = 0
    workers_per_host: int | None = None
    launch: str = "manual"
    connect_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        hosts = (self.hosts,) if isinstance(self.hosts, str) else tuple(self.hosts or ())
        if not hosts or not all(isinstance(h, str) and h.strip() for h in hosts):
            raise ClusterError(f"cluster.hosts must be a non-empty list of host names or addresses, got {self.hosts!r}")
        object.__setattr__(self, "hosts", tuple(h.strip() for h in hosts))
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            raise ClusterError(f"cluster.port must be a TCP port 1..65535 (0: a free one), got {self.port!r}")
        if self.workers_per_host is not None and (not _is_int(self.workers_per_host) or self.workers_per_host < 1):
            raise ClusterError(f"cluster.workers_per_host must be a positive integer or null (tp x pp split evenly "
                               f"over the hosts), got {self.workers_per_host!r}")
        if self.launch not in LAUNCHES:
            raise ClusterError(f"unknown cluster.launch {self.launch!r}; choose local (this process starts the nodes, "
                               "on this machine) or manual (you start `python -m runtime_patch.disco.node` on each host)")
        if isinstance(self.connect_timeout_s, bool) or not isinstance(self.connect_timeout_s, (int, float)) \
                or not self.connect_timeout_s > 0:
            raise ClusterError(f"cluster.connect_timeout_s must be a positive number of seconds, got "
                               f"{self.connect_timeout_s!r}")
        if self.multi_host and self.port == 0 and self.launch != "local":
            raise ClusterError("cluster.port=0 (a free port picked at start) needs cluster.launch=local: the nodes you "
                               "start by hand must be told the port; set cluster.port")

    @property
    def multi_host(self) -> bool:
        return len(self.hosts) > 1

    def workers_on_each_host(self, num_workers: int) -> int:
        """The workers each host runs for a session of `num_workers` (tp x pp); ClusterError where
        they do not fill the hosts exactly."""
        n = len(self.hosts)
        if self.workers_per_host is None:
            if num_workers % n:
                raise ClusterError(f"tp x pp = {num_workers} workers do not split evenly over the cluster's {n} hosts; "
                                   f"choose tp x pp a multiple of {n}")
            return num_workers // n
        if num_workers != n * self.workers_per_host:
            raise ClusterError(f"tp x pp = {num_workers} but the cluster has {n} hosts x {self.workers_per_host} "
                               f"workers = {n * self.workers_per_host}; choose tp x pp = {n * self.workers_per_host} "
                               "or change cluster.workers_per_host")
        return self.workers_per_host

    def check_ccl(self, ccl: str) -> None:
        """cpu_shm (shared memory) only where every host is this machine."""
        if ccl == "cpu_shm" and self.multi_host:
            remote = [h for h in self.hosts if not is_this_machine(h)]
            if remote:
                raise ClusterError(f"cpu_shm works within one machine and {_not_this_one(remote)}; "
                                   "use device=cuda (NCCL) across hosts, or cluster=loopback / cluster=local on the CPU")

    def check_launch(self) -> None:
        """launch=local starts the nodes here: every host must be this machine."""
        if self.launch == "local" and self.multi_host:
            remote = [h for h in self.hosts[1:] if not is_this_machine(h)]
            if remote:
                raise ClusterError(f"cluster.launch=local starts the node processes on this machine, but "
                                   f"{_not_this_one(remote)}; use cluster.launch=manual and start "
                                   f"`python -m {NODE_ENTRYPOINT}` on each other host")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hosts": list(self.hosts)}


def _not_this_one(hosts: list[str]) -> str:
    return f"{hosts[0]} is not this one" if len(hosts) == 1 else f"{', '.join(hosts)} are not this one"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_this_machine(host: str) -> bool:
    """Whether every address `host` resolves to belongs to this machine: a loopback address, or
    one that a socket can bind here (binding fails with EADDRNOTAVAIL for another host's)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    for family, _, _, _, address in infos:
        ip = address[0].split("%")[0]
        try:
            if ipaddress.ip_address(ip).is_loopback:
                continue
        except ValueError:
            return False
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address[0], 0, *address[2:]))
        except OSError:
            return False
    return bool(infos)


def free_port(host: str) -> int:
    """A TCP port free on `host` now (bound to port 0 and released: another process could take it
    before the controller binds it, which then fails saying so)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((socket.gethostbyname(host), 0))
        return s.getsockname()[1]


def node_command(host: str, port: int, workers: int, ccl: str, timeout_s: float) -> list[str]:
    """The command a node runs (python -m runtime_patch.disco.node ...)."""
    return ["python", "-m", NODE_ENTRYPOINT, "--host", host, "--port", str(port), "--workers", str(workers),
            "--ccl", ccl, "--timeout", f"{timeout_s:g}"]


class LocalNodes:
    """The node processes of hosts[1:] that this process started on this machine (launch="local").
    They retry connecting until the controller listens, up to their timeout."""

    def __init__(self, count: int, host: str, port: int, workers: int, ccl: str, timeout_s: float,
                 env: dict[str, str]):
        cmd = [sys.executable, *node_command(host, port, workers, ccl, timeout_s)[1:], "--once"]
        self.procs: list[subprocess.Popen] = []
        try:
            for _ in range(count):
                self.procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
        except BaseException:
            self.stop(grace_s=0.0)
            raise
        _live_nodes.add(self)

    def exited(self) -> dict[int, int]:
        """Exit codes of the node processes that have exited, by node (1, 2, ...: the order started)."""
        return {i + 1: p.returncode for i, p in enumerate(self.procs) if p.poll() is not None}

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self, grace_s: float) -> None:
        """Wait up to `grace_s` for the nodes to exit (a shut-down session tells them to), then kill
        the rest."""
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_live_nodes: weakref.WeakSet[LocalNodes] = weakref.WeakSet()


@atexit.register
def _stop_live_nodes() -> None:
    for nodes in list(_live_nodes):
        nodes.stop(grace_s=0.0)
