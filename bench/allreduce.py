"""The project's one-shot allreduce (`lab.ccl.allreduce`, runtime_patch/native/oneshot_allreduce.cu)
beside NCCL and PyTorch's symmetric-memory one-shot and two-shot, each captured in a CUDA graph of
back-to-back calls (what a decode step's 64 allreduces are), on the GPUs of one host.

    torchrun --nproc_per_node=2 -m bench.allreduce --out DIR      # or 4 ranks

Each rank loads the cuda_allreduce plugin (prebuilt: carry $LAB_PLUGIN_DIR), creates its IPC
region and opens every peer's (the create texts go round with all_gather_object). Before timing,
ours is checked on random data: within one rounding of the exact sum and bit-identical on every
rank (also reported: whether it equals, bit for bit, the float32 sum in rank order that the kernel
computes), at every size, for float16, bfloat16 and float32, for a tail that is not a multiple of
16 bytes, an unaligned tensor and in place; then inside a CUDA graph that interleaves calls of
different sizes and dtypes, replayed thousands of times, with new inputs written into the captured
buffers before each checked replay. `lab.ccl.allreduce_add_rms_norm` (the one-shot that also adds
the residual and computes the next RMSNorm, a block per row) is checked against its definition
(rows of 2048 to 8192 values, float16 / bfloat16 / float32, and in a replayed graph) and timed
beside the plain call.
Timing: per implementation and size (float16 8 KiB to 1 MiB, bfloat16 at 8 KiB), a graph of
--calls calls replayed --replays times after warm-up, each replay timed with CUDA events: raw
per-replay microseconds per call, median and p95. Rank 0 writes one JSON record into --out and
prints a table. NCCL's multicast (NVLS) stays off, as on the lab's box.

Exit status 0, or 1 where ours was wrong or could not run (the record says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from harness.results import git_info
from runtime_patch import settings

KIB = 1024
SIZES = [8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1024 * KIB]
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
IMPLEMENTATIONS = ("ours", "nccl", "symm_one_shot", "symm_two_shot")
# |ours - exact sum| <= TOLERANCE * sum over ranks of |x| + 2^-24: the output's one rounding (fp16 /
# bf16) or the float32 additions (float32), with room for 8 ranks; 2^-24 covers fp16 subnormals.
TOLERANCE = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -20}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m bench.allreduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON record (rank 0 writes it)")
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                    help="float16 message sizes in bytes, comma separated (default 8 KiB .. 1 MiB)")
    ap.add_argument("--max-bytes", type=int, default=1024 * KIB,
                    help="lab.ccl.ipc_create's max_bytes: ours is timed up to it (default 1 MiB)")
    ap.add_argument("--calls", type=int, default=64, help="calls captured back to back in one graph (default 64)")
    ap.add_argument("--replays", type=int, default=20, help="timed replays of each graph (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="replays before the timed ones (default 3)")
    ap.add_argument("--check-replays", type=int, default=50,
                    help="checked replays of the correctness graph, each with new inputs (default 50)")
    ap.add_argument("--stress-replays", type=int, default=2000,
                    help="unchecked replays of the correctness graph before its last check (default 2000)")
    return ap.parse_args(argv)


class Bench:
    """One rank's state: the process group, our functions, a generator per purpose."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int):
        import torch
        import torch.distributed as dist
        import tvm_ffi

        from runtime_patch import functions

        self.args, self.rank, self.world = args, rank, world
        self.torch, self.dist, self.tvm_ffi = torch, dist, tvm_ffi
        functions.register("cuda", [functions.ALLREDUCE, functions.ALLREDUCE_ADD_RMS_NORM, functions.IPC_CREATE,
                                    functions.IPC_OPEN, functions.IPC_STATUS])  # loads the cuda_allreduce plugin
        self.allreduce = tvm_ffi.get_global_func(functions.ALLREDUCE)
        self.allreduce_add_norm = tvm_ffi.get_global_func(functions.ALLREDUCE_ADD_RMS_NORM)
        text = str(tvm_ffi.get_global_func(functions.IPC_CREATE)(rank, world, args.max_bytes))
        texts = [None] * world
        dist.all_gather_object(texts, text)
        opened = bool(tvm_ffi.get_global_func(functions.IPC_OPEN)(";".join(texts)))
        self.opened = [None] * world
        dist.all_gather_object(self.opened, opened)
        self.status = str(tvm_ffi.get_global_func(functions.IPC_STATUS)())
        self.seed = 0

    # -- helpers ---------------------------------------------------------------------------------

    def random(self, numel: int, dtype, out=None):
        """Different random values on every rank and at every call."""
        torch = self.torch
        self.seed += 1
        g = torch.Generator(device="cuda").manual_seed(1_000_003 * self.seed + self.rank)
        values = torch.randn(numel, generator=g, device="cuda", dtype=torch.float32).to(dtype)
        if out is None:
            return values
        out.copy_(values)
        return out

    def ours(self, x, out) -> None:
        """lab.ccl.allreduce on torch's current stream (the capturing one inside a graph)."""
        with self.tvm_ffi.use_torch_stream():
            self.allreduce(self.tvm_ffi.from_dlpack(x), self.tvm_ffi.from_dlpack(out))

    def ours_add_norm(self, x, residual, weight, out, normed, eps: float = 1e-5) -> None:
        """lab.ccl.allreduce_add_rms_norm on torch's current stream."""
        f = self.tvm_ffi.from_dlpack
        with self.tvm_ffi.use_torch_stream():
            self.allreduce_add_norm(f(x), f(residual), f(weight), eps, f(out), f(normed))

    def add_norm_checks(self) -> list[dict]:
        """lab.ccl.allreduce_add_rms_norm (the one-shot with a block per row) against its definition
        computed with torch from every rank's inputs: output = dtype(dtype(sum in rank order) +
        residual) bit for bit, normed = dtype(dtype(output / sqrt(ms + eps)) * weight) within one
        rounding, both identical on every rank; eagerly, then in a CUDA graph replayed with new
        inputs; and the fused call's time beside the plain allreduce's (8 KiB, one row)."""
        import numpy as np

        torch = self.torch
        eps = 1e-5
        results = []

        def expected(x, residual, weight):
            total = self.gather(x)[0].float()
            for t in self.gather(x)[1:]:
                total = total + t.float()
            out = (total.to(x.dtype).float() + residual.float()).to(x.dtype)
            of = out.float()
            normed = (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
            return out, (normed.float() * weight.float()).to(x.dtype)

        def compare(case, x, residual, weight, out, normed):
            want_out, want_normed = expected(x, residual, weight)
            bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[x.dtype]
            outs, normeds = self.gather(out), self.gather(normed)
            err = float(((normed.float() - want_normed.float()).abs() / (want_normed.float().abs() + 1e-3)).max())
            r = {"case": case, "dtype": str(x.dtype).removeprefix("torch."), "rows": int(x.shape[0]),
                 "row": int(x.shape[1]), "output_bitwise": bool(torch.equal(out.view(bits), want_out.view(bits))),
                 "normed_max_rel_error": err,
                 "identical_across_ranks": all(bool(torch.equal(o.view(bits), outs[0].view(bits))) for o in outs)
                 and all(bool(torch.equal(o.view(bits), normeds[0].view(bits))) for o in normeds)}
            ok = r["output_bitwise"] and r["identical_across_ranks"] and err < (1e-2 if x.dtype == torch.bfloat16 else 2e-3)
            flags = [None] * self.world
            self.dist.all_gather_object(flags, ok)
            r["ok"] = all(flags)
            return r

        cases = [(torch.float16, 1, 4096), (torch.float16, 16, 4096), (torch.bfloat16, 1, 8192),
                 (torch.float32, 3, 2048), (torch.float16, 64, 8192)]
        for dtype, rows, row in cases:
            x = self.random(rows * row, dtype).view(rows, row)
            residual = self.random(rows * row, dtype).view(rows, row)
            weight = (1 + 0.1 * self.random(row, torch.float32)).to(dtype)
            self.dist.broadcast(weight, 0)  # the residual stream and the weights are the same on every rank
            self.dist.broadcast(residual, 0)
            out, normed = torch.empty_like(x), torch.empty_like(x)
            self.ours_add_norm(x, residual, weight, out, normed, eps)
            results.append(compare(f"{rows} x {row}", x, residual, weight, out, normed))
        # in a graph, with new inputs before each replay
        x = torch.empty(2, 4096, dtype=torch.float16, device="cuda")
        residual, out, normed = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        weight = torch.ones(4096, dtype=torch.float16, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.ours_add_norm(x, residual, weight, out, normed, eps)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(3):  # three calls of one block each: the epochs advance on the device
                self.ours_add_norm(x, residual, weight, out, normed, eps)
        torch.cuda.synchronize()
        graph_ok = True
        for _ in range(5):
            self.random(x.numel(), x.dtype, out=x.view(-1))
            self.random(residual.numel(), residual.dtype, out=residual.view(-1))
            self.dist.broadcast(residual, 0)
            graph.replay()
            torch.cuda.synchronize()
            graph_ok &= compare("graph 2 x 4096", x, residual, weight, out, normed)["ok"]
        results.append({"case": "graph 2 x 4096, 3 calls per replay, 5 replays", "ok": graph_ok})
        # time: fused against the plain one-shot, 8 KiB
        x = self.random(4096, torch.float16).view(1, 4096)
        residual, out, normed = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        weight = torch.ones(4096, dtype=torch.float16, device="cuda")
        fused = self.timed(lambda: self.ours_add_norm(x, residual, weight, out, normed, eps))
        plain = self.timed(lambda: self.ours(x, out))
        results.append({"case": "time 1 x 4096 fp16", "ok": True, "fused_median_us": float(np.median(fused)),
                        "plain_median_us": float(np.median(plain)), "raw_fused_us": fused, "raw_plain_us": plain})
        return results

    def gather(self, t):
        parts = [self.torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(parts, t.contiguous())
        return parts

    def check(self, case: str, x, out) -> dict:
        """`out` (ours, already computed from `x` on every rank) against the rank-order float32
        sum, the exact sum, and every other rank's `out`."""
        torch = self.torch
        inputs, outputs = self.gather(x), self.gather(out)
        reference = inputs[0].float()
        for t in inputs[1:]:
            reference = reference + t.float()
        reference = reference.to(x.dtype)
        stacked = torch.stack([t.double() for t in inputs])
        exact = stacked.sum(0)
        dtype = str(x.dtype).removeprefix("torch.")
        err = (out.double() - exact).abs()
        bound = TOLERANCE[dtype] * stacked.abs().sum(0) + 2.0 ** -24
        bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[x.dtype]
        result = {
            "case": case, "dtype": dtype, "numel": int(x.numel()), "bytes": int(x.numel() * x.element_size()),
            "bitwise_rank_order_reference": bool(torch.equal(out.view(bits), reference.view(bits))),
            "identical_across_ranks": all(bool(torch.equal(o.view(bits), outputs[0].view(bits))) for o in outputs),
            "within_rounding_of_exact": bool((err <= bound).all()),
            "max_abs_error_vs_exact": float(err.max()),
        }
        ok = result["identical_across_ranks"] and result["within_rounding_of_exact"]
        flags = [None] * self.world
        self.dist.all_gather_object(flags, ok)
        result["ok"] = all(flags)
        return result

    # -- correctness -----------------------------------------------------------------------------

    def correctness(self, sizes: list[int]) -> list[dict]:
        torch = self.torch
        results = []
        cases = [(f"fp16 {s} B", torch.float16, s // 2) for s in sizes if s <= self.args.max_bytes]
        cases += [("bf16 8 KiB", torch.bfloat16, 4096), ("fp32 8 KiB", torch.float32, 2048),
                  ("fp32 largest", torch.float32, max(4, self.args.max_bytes // 4)),
                  ("fp16 tail (4099 elements)", torch.float16, 4099), ("fp16 one element", torch.float16, 1)]
        for case, dtype, numel in cases:
            x = self.random(numel, dtype)
            out = torch.empty_like(x)
            self.ours(x, out)
            results.append(self.check(case, x, out))
        # an unaligned tensor (2 bytes past a 16-byte boundary) and in place
        buf = self.random(4097, torch.float16)
        x, out = buf[1:], torch.empty(4097, dtype=torch.float16, device="cuda")[1:]
        self.ours(x, out)
        results.append(self.check("fp16 8 KiB unaligned", x, out))
        x = self.random(4096, torch.float16)
        before = x.clone()
        self.ours(x, x)
        results.append(self.check("fp16 8 KiB in place", before, x))
        results += self.graph_correctness()
        return results

    def graph_correctness(self) -> list[dict]:
        """One graph interleaving sizes (so grids) and dtypes, replayed with new inputs each time."""
        torch = self.torch
        big = min(self.args.max_bytes, 1024 * KIB)
        specs = [("fp16 8 KiB", torch.float16, 4096), (f"fp16 {big} B", torch.float16, big // 2),
                 ("fp16 24 KiB", torch.float16, 12288), ("bf16 8 KiB", torch.bfloat16, 4096),
                 ("fp32 40 KiB", torch.float32, 10240)]
        bufs = [(name, torch.empty(n, dtype=dtype, device="cuda"), torch.empty(n, dtype=dtype, device="cuda"))
                for name, dtype, n in specs]
        order = [0, 1, 2, 0, 3, 4, 1, 0]  # the 8 KiB one thrice, between larger grids
        for _, x, _ in bufs:
            self.random(x.numel(), x.dtype, out=x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in order:  # eagerly once, as every implementation is warmed up
                self.ours(bufs[i][1], bufs[i][2])
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for i in order:
                self.ours(bufs[i][1], bufs[i][2])
        torch.cuda.synchronize()
        failures, checked = [], 0
        worst = {name: 0.0 for name, _, _ in bufs}
        replays = self.args.check_replays
        for r in range(replays + 1):
            if r == replays:  # the last check comes after many unchecked replays
                for _ in range(self.args.stress_replays):
                    graph.replay()
            for _, x, _ in bufs:
                self.random(x.numel(), x.dtype, out=x)
            graph.replay()
            for name, x, out in bufs:
                result = self.check(f"graph {name}", x, out)
                checked += 1
                worst[name] = max(worst[name], result["max_abs_error_vs_exact"])
                if not result["ok"]:
                    failures.append({"replay": r, **result})
        total = replays + 1 + self.args.stress_replays
        return [{"case": "graph replays, interleaved sizes and dtypes", "calls_per_replay": len(order),
                 "replays": total, "checked_replays": replays + 1, "checks": checked,
                 "ok": not failures, "failures": failures[:10], "max_abs_error_vs_exact": worst}]

    # -- timing ----------------------------------------------------------------------------------

    def timed(self, fn) -> list[float]:
        """Microseconds per call of `fn`, per replay of a graph of `calls` calls."""
        torch, a = self.torch, self.args
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(a.calls):
                fn()
        torch.cuda.synchronize()
        self.dist.barrier()
        torch.cuda.synchronize()
        for _ in range(a.warmup):
            graph.replay()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(a.replays)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(a.replays)]
        for s, e in zip(starts, ends):
            s.record()
            graph.replay()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e3 / a.calls for s, e in zip(starts, ends)]

    def time_size(self, dtype, nbytes: int, ours_on: bool) -> dict:
        import numpy as np
        import torch.distributed._symmetric_memory as symm_mem

        torch, dist = self.torch, self.dist
        numel = nbytes // torch.empty((), dtype=dtype).element_size()
        x = self.random(numel, dtype)
        out = torch.empty_like(x)
        row = {"dtype": str(dtype).removeprefix("torch."), "bytes": nbytes, "numel": numel}
        group = dist.group.WORLD.group_name
        fns = {}
        if ours_on and nbytes <= self.args.max_bytes:
            fns["ours"] = lambda: self.ours(x, out)
        else:
            row["ours"] = {"error": "not run: " + ("ipc_open was not true on every rank" if not ours_on
                                                   else f"above --max-bytes {self.args.max_bytes}")}
        y = x.clone()
        fns["nccl"] = lambda: dist.all_reduce(y)  # in place: values grow (to inf in fp16): timing only
        try:
            buf = symm_mem.empty(numel, dtype=dtype, device="cuda")
            symm_mem.rendezvous(buf, group)
            buf.copy_(x)
            fns["symm_one_shot"] = lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group)
            fns["symm_two_shot"] = lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group)
        except Exception as ex:  # noqa: BLE001  (recorded, the others still run)
            row["symm_one_shot"] = row["symm_two_shot"] = {"error": repr(ex)[:300]}
        for name, fn in fns.items():
            try:
                raw = self.timed(fn)
                row[name] = {"raw_us": [round(v, 3) for v in raw], "median_us": float(np.median(raw)),
                             "p95_us": float(np.percentile(raw, 95))}
            except Exception as ex:  # noqa: BLE001
                row[name] = {"error": repr(ex)[:300]}
        return row


def table(record: dict) -> str:
    lines = [f"{record['world']} x {record['card']}, {record['calls_per_replay']} calls per graph, "
             f"median (p95) us per call; ours: {record['ipc_status']}",
             f"{'size':>9} {'dtype':>8} " + " ".join(f"{n:>17}" for n in IMPLEMENTATIONS) + f" {'nccl/ours':>9}"]
    for row in record["sizes"]:
        cells = []
        for name in IMPLEMENTATIONS:
            r = row.get(name, {})
            cells.append(f"{r['median_us']:8.2f} ({r['p95_us']:6.2f})" if "median_us" in r else f"{'—':>17}")
        ratio = (f"{row['nccl']['median_us'] / row['ours']['median_us']:8.2f}x"
                 if "median_us" in row.get("ours", {}) and "median_us" in row.get("nccl", {}) else f"{'—':>9}")
        size = f"{row['bytes'] // KIB} KiB" if row["bytes"] % KIB == 0 else f"{row['bytes']} B"
        lines.append(f"{size:>9} {row['dtype']:>8} " + " ".join(cells) + f" {ratio}")
    checks = record["correctness"]
    bad = [c["case"] for c in checks if not c.get("ok")]
    for c in checks:
        if "fused_median_us" in c:
            lines.append(f"allreduce_add_rms_norm, 1 x 4096 fp16: {c['fused_median_us']:.2f} us per call "
                         f"(the plain one-shot: {c['plain_median_us']:.2f})")
    lines.append(f"correctness: {len(checks) - len(bad)} of {len(checks)} cases ok"
                 + (f"; FAILED: {bad}" if bad else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace, rank: int, world: int, local_world: int) -> int:
    import torch

    bench = Bench(args, rank, world)
    ours_on = all(bench.opened)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    correctness = bench.correctness(sizes) + bench.add_norm_checks() if ours_on else []
    rows = [bench.time_size(torch.float16, s, ours_on) for s in sizes]
    rows.append(bench.time_size(torch.bfloat16, 8 * KIB, ours_on))
    ok = ours_on and all(c["ok"] for c in correctness)
    if rank == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        card = torch.cuda.get_device_name(0)
        record = {
            "benchmark": "allreduce", "card": card, "world": world, "date": time.strftime("%Y-%m-%d"),
            "command": f"torchrun --nproc_per_node={local_world} -m bench.allreduce {' '.join(sys.argv[1:])}",
            "git_sha": (git_info() or {}).get("sha"), "torch": torch.__version__,
            "nccl": ".".join(str(v) for v in torch.cuda.nccl.version()),
            "environment": {k: settings.raw(k) for k in MULTICAST_OFF},
            "ipc_status": bench.status, "ipc_opened": bench.opened, "max_bytes": args.max_bytes,
            "calls_per_replay": args.calls, "replays": args.replays, "warmup_replays": args.warmup,
            "correctness_ok": ok, "correctness": correctness or [{"case": "not run", "ok": False,
                                                                  "why": bench.status}],
            "sizes": rows,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"allreduce-{world}x{card.replace(' ', '')}-{stamp}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
        print(table(record))
        print(f"wrote {path}", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (settings.is_set("RANK") and settings.is_set("WORLD_SIZE")):
        sys.exit("bench.allreduce runs one process per GPU: torchrun --nproc_per_node=2 -m bench.allreduce --out DIR")
    for name, value in MULTICAST_OFF.items():  # before torch initialises NCCL or symmetric memory
        settings.set_value(name, value)
    import torch
    import torch.distributed as dist

    rank, world = settings.integer("RANK"), settings.integer("WORLD_SIZE")
    local = settings.integer("LOCAL_RANK") if settings.is_set("LOCAL_RANK") else rank
    local_world = settings.integer("LOCAL_WORLD_SIZE") if settings.is_set("LOCAL_WORLD_SIZE") else world
    if world < 2:
        sys.exit("bench.allreduce needs at least 2 ranks (torchrun --nproc_per_node=2)")
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    try:
        status = run(args, rank, world, local_world)
        torch.cuda.synchronize()
        dist.barrier()
    except BaseException:  # noqa: BLE001  (one rank failing: say why and leave; torchrun stops the rest)
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # NCCL's teardown can hang


if __name__ == "__main__":
    main()
