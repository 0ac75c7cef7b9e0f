"""More than one host, on this one: two "hosts" on localhost (TVM's disco SocketSession, a node
process per further host, cpu_shm between them) give the tokens and logits of one process, at tp=2
and pp=2. A node that cannot connect, a controller nobody joins, a node that dies, and cpu_shm
asked to span another machine all fail with one clear line, in bounded time, leaving no process
behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from engine.compile import BuildSpec, compile_pipeline
from engine.config import ConfigError, from_hf_folder
from engine.weights import open_source
from harness.oracle import Reference, relative_error
from runtime_patch.disco import Cluster, ClusterError, is_this_machine, start_session
from runtime_patch.disco.cluster import free_port
from test_pipeline_parallel import _run as run_stages

ROOT = Path(__file__).resolve().parents[1]
OTHER_MACHINE = "192.0.2.7"  # TEST-NET-1 (RFC 5737): never an address of this machine
LOOPBACK = Cluster(hosts=("127.0.0.1", "127.0.0.1"), port=0, launch="local", connect_timeout_s=60)


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Every process a test starts (node processes, their workers) is gone when it ends; any left
    after a grace period is killed and fails the test."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + 15
    while True:
        left = [p for p in me.children(recursive=True) if p.pid not in before and _running(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    names = []
    for p in left:
        try:
            names.append(" ".join(p.cmdline()))
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not names, f"processes left behind: {names}"


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _run(folder, tp, pp, cache_dir, cluster=None):
    """Teacher-forced logits and a batch of two greedy generations at (tp, pp), on `cluster`
    (really spread over its hosts: TVM's SocketSession, with a node process)."""
    def on_the_hosts(session) -> None:
        assert session.sess.num_workers == tp * pp and session.sess.lab_nodes.pids()

    return run_stages(folder, "q0f32", tp, pp, cache_dir, cluster=cluster,
                      check_session=on_the_hosts if cluster is not None else None)


@pytest.fixture(scope="module")
def one_process(tiny_checkpoint, cache_dir):
    return _run(tiny_checkpoint, 1, 1, cache_dir)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_two_hosts_give_the_tokens_of_one_process(tiny_checkpoint, cache_dir, one_process, tp, pp):
    """tp=2 and pp=2: one worker on each "host"; tp=2 x pp=2: two (a stage on each)."""
    tokens, reference, generated = one_process
    _, logits, got = _run(tiny_checkpoint, tp, pp, cache_dir, LOOPBACK)
    assert got == generated
    assert relative_error(logits, reference) < 1e-5
    if (tp, pp) == (2, 1):  # and the oracle: transformers on the same checkpoint
        assert relative_error(logits, Reference(tiny_checkpoint).logits(tokens)) < 1e-4


def test_workers_must_fill_the_hosts(tiny_checkpoint, cache_dir):
    from engine.session import open_session

    config = from_hf_folder(tiny_checkpoint)
    stages = compile_pipeline(BuildSpec(config, "q0f32", 1), cache_dir)
    with pytest.raises(ConfigError, match="do not split evenly over the cluster's 2 hosts; choose tp x pp a multiple of 2"):
        open_session(stages, open_source(config, tiny_checkpoint), LOOPBACK)
    fixed = Cluster(hosts=("127.0.0.1", "127.0.0.1"), port=0, workers_per_host=2, launch="local")
    with pytest.raises(ClusterError, match=r"tp x pp = 2 but the cluster has 2 hosts x 2 workers = 4; choose tp x pp = 4"):
        fixed.workers_on_each_host(2)
    assert fixed.workers_on_each_host(4) == 2


def test_cpu_shm_is_refused_across_machines_before_anything_starts():
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    for hosts in [("127.0.0.1", OTHER_MACHINE), (OTHER_MACHINE, "127.0.0.1")]:
        cluster = Cluster(hosts=hosts, port=29999, launch="manual", connect_timeout_s=1)
        with pytest.raises(ClusterError) as err:
            start_session(2, "cpu_shm", cluster=cluster)
        assert str(err.value).count("\n") == 0
        assert f"cpu_shm works within one machine and {OTHER_MACHINE} is not this one; use device=cuda (NCCL) " \
               "across hosts" in str(err.value)
    assert {p.pid for p in me.children(recursive=True)} == before
    # the run's config refuses it too, before compiling (harness.spec)
    from omegaconf import OmegaConf

    from harness.spec import cluster_from_hydra

    cfg = OmegaConf.create({"hosts": ["127.0.0.1", OTHER_MACHINE], "port": 29600, "launch": "manual"})
    with pytest.raises(ConfigError, match="cpu_shm works within one machine"):
        cluster_from_hydra(cfg, "llvm")
    assert cluster_from_hydra(cfg, "cuda").hosts == ("127.0.0.1", OTHER_MACHINE)  # NCCL spans machines


@pytest.mark.parametrize("values,message", [
    ({"hosts": []}, "cluster.hosts must be a non-empty list"),
    ({"port": 70000}, "cluster.port must be a TCP port 1..65535"),
    ({"workers_per_host": 0}, "cluster.workers_per_host must be a positive integer or null"),
    ({"launch": "ssh"}, "unknown cluster.launch 'ssh'; choose local"),
    ({"connect_timeout_s": 0}, "cluster.connect_timeout_s must be a positive number"),
    ({"hosts": ["127.0.0.1", "127.0.0.1"], "port": 0, "launch": "manual"}, "cluster.port=0 .* needs cluster.launch=local"),
    ({"hosts": ["127.0.0.1", OTHER_MACHINE], "port": 29600, "launch": "local"},
     f"cluster.launch=local starts the node processes on this machine, but {OTHER_MACHINE} is not this one"),
])
def test_bad_cluster_settings_are_one_line_that_names_the_fix(values, message):
    from omegaconf import OmegaConf

    from harness.spec import cluster_from_hydra

    with pytest.raises(ConfigError, match=message) as err:
        cluster_from_hydra(OmegaConf.create(values), "cuda")
    assert "\n" not in str(err.value)


def test_this_machine_is_recognised():
    import socket

    assert is_this_machine("127.0.0.1") and is_this_machine("localhost")
    assert not is_this_machine(OTHER_MACHINE) and not is_this_machine("no-such-host.invalid")
    try:
        own = socket.gethostbyname(socket.gethostname())
    except OSError:  # a container whose name does not resolve
        return
    assert is_this_machine(socket.gethostname()) and is_this_machine(own)


def test_controller_gives_up_when_no_node_connects():
    port = free_port("127.0.0.1")
    cluster = Cluster(hosts=("127.0.0.1", "127.0.0.1"), port=port, launch="manual", connect_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        start_session(2, "cpu_shm", cluster=cluster)
    assert time.monotonic() - t0 < 30
    text = str(err.value)
    assert "not every node connected within 2 s" in text and "\n" not in text
    assert f"python -m runtime_patch.disco.node --host 127.0.0.1 --port {port} --workers 1 --ccl cpu_shm" in text


def test_busy_port_is_named():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cluster = Cluster(hosts=("127.0.0.1", "127.0.0.1"), port=port, launch="manual", connect_timeout_s=5)
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port} .*in use.*choose another cluster.port"):
            start_session(2, "cpu_shm", cluster=cluster)


def test_node_without_a_controller_exits_with_one_line():
    port = free_port("127.0.0.1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runtime_patch.disco.node", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", "1", "--ccl", "cpu_shm", "--timeout", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - t0 < 30
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: disco node: nothing listens at 127.0.0.1:{port} after 2 s"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_node_serves_one_session_after_another():
    """A sweep opens a session per point: a node started by hand serves them in turn on the same
    port (free again at once: the nodes close first), then exits when no further one comes."""
    port = free_port("127.0.0.1")
    node = subprocess.Popen([sys.executable, "-m", "runtime_patch.disco.node", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1", "--ccl", "cpu_shm", "--timeout", "4"], cwd=ROOT)
    try:
        for _ in range(2):
            sess = start_session(2, "cpu_shm", cluster=Cluster(("127.0.0.1", "127.0.0.1"), port, launch="manual",
                                                                connect_timeout_s=30))
            try:
                rank = sess.get_global_func("runtime.disco.worker_rank")()
                sess._sync_all()
                assert [rank.debug_get_from_remote(i) for i in range(2)] == [0, 1]
                x = sess.empty((1000,), "float32")
                sess.allreduce(x, x)
                sess._sync_all()
            finally:
                sess.shutdown()
        assert node.wait(timeout=60) == 0
    finally:
        node.kill()
        node.wait()


_NODE_DEATH_SCRIPT = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    from runtime_patch.disco import CCLError, Cluster, start_session
    from runtime_patch.disco.cluster import free_port

    report = {}
    def allreduce(sess):
        x = sess.empty((4096,), "float32")
        sess.allreduce(x, x)
        sess._sync_all()

    def calls(sess):  # no collective (so not cpu_shm's own checks): each call's DRef dies at once
        for _ in range(3):
            sess.get_global_func("runtime.disco.worker_rank")()
        sess._sync_all()

    def kill_and_expect_failure(sess, pid, key, step):
        step(sess)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        try:
            for _ in range(3):
                step(sess)
            report[key] = None
        except CCLError as e:
            report[key] = {"error": str(e), "seconds": time.monotonic() - t0}
        sess.shutdown()

    # A node the lab started (launch=local), killed.
    sess = start_session(2, "cpu_shm", cluster=Cluster(("127.0.0.1", "127.0.0.1"), 0, launch="local"))
    report["node_pid"] = sess.lab_nodes.pids()[0]
    kill_and_expect_failure(sess, report["node_pid"], "local", allreduce)
    del sess

    # A node started by hand (launch=manual): only its socket tells the controller it is gone.
    port = free_port("127.0.0.1")
    node = subprocess.Popen([sys.executable, "-m", "runtime_patch.disco.node", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "2", "--ccl", "cpu_shm", "--timeout", "60"])
    sess = start_session(4, "cpu_shm", cluster=Cluster(("127.0.0.1", "127.0.0.1"), port, launch="manual"))
    kill_and_expect_failure(sess, node.pid, "manual", calls)
    node.wait(timeout=10)
    del sess
    print("REPORT " + json.dumps(report), flush=True)
""")


def test_a_node_that_dies_is_a_ccl_error_not_an_abort(tmp_path):
    """TVM writes to a dead node's socket from C++ destructors, where EPIPE would end the
    controller: runtime_patch.disco keeps that from happening (a subprocess, in case it does)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _NODE_DEATH_SCRIPT], capture_output=True, text=True, timeout=240,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    for key in ("local", "manual"):
        assert report[key] and "broken" in report[key]["error"], report
        assert report[key]["seconds"] < 30


def test_every_experiment_runs_on_this_machine_by_default():
    from hydra import compose, initialize_config_dir

    from harness.spec import cluster_from_hydra

    names = sorted(p.stem for p in (ROOT / "conf").glob("*.yaml"))
    assert len(names) >= 7
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in names:
            cluster = cluster_from_hydra(compose(config_name=name).cluster)
            assert not cluster.multi_host, name
            loopback = cluster_from_hydra(compose(config_name=name, overrides=["cluster=loopback"]).cluster)
            assert loopback == Cluster(("127.0.0.1", "127.0.0.1"), 0, None, "local", 120)
            two = cluster_from_hydra(compose(config_name=name, overrides=["cluster=two_nodes"]).cluster, "cuda")
            assert two.multi_host and two.launch == "manual" and two.port > 0


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="tensor_parallel", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.nodes == 1 and launcher.gpus_per_node == 8


def test_experiment_on_a_cluster_the_cpu_cannot_span_is_refused(cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "experiments.baseline", f"hydra.run.dir={out}", "device=cpu",
                           "cluster=two_nodes"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LAB_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cpu_shm works within one machine")
    assert "Traceback" not in proc.stderr
