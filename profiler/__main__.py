"""python -m profiler -m basic|nsight|timeline [-s EXPERIMENT] [-d SECONDS] [-o DIR]
[-- hydra overrides...]: profile one run of an experiment (what ./profile_gpu.sh runs).

Exit status: 0 ok; 1 the experiment failed (or nsight profiled no kernel); 2 usage; 3 no
profiler for -m nsight; 124 the -d limit stopped the experiment; 130 / 143 interrupted (SIGINT, e.g.
Ctrl-C / SIGTERM: either stops the experiment's process group first). Outputs
are written in every case but usage errors and a missing profiler; a stopped experiment leaves its
results.json with status "interrupted" and the points it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path

from harness import markdown
from runtime_patch import settings
from harness.results import REPO_ROOT, atomic_write_json, atomic_write_text, environment, to_jsonable
from harness.trace import Trace
from . import MODES, kernels, nsight, runner, sampling, timeline

EXIT_FAILED, EXIT_USAGE, EXIT_NO_TOOL, EXIT_TIME_LIMIT, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 124, 130, 143
DEFAULT_OUT = REPO_ROOT / "results" / "profiles"

MODES_HELP = """modes:
  basic     sample every GPU every 100 ms (NVML, else nvidia-smi): utilisation, memory used,
            power, SM clock; with no GPU, the experiment's process tree CPU%% and RSS (psutil).
            -> samples.csv, summary.json, utilisation.png
  nsight    Nsight Systems over the measured region (nsys on PATH), else Nsight Compute:
            ncu --clock-control none --target-processes all, capped at --kernel-cap kernels.
            -> kernels.csv, kernels.md (top kernels by total time), the tool's report
  timeline  CUPTI activity records (cupti-python) of every kernel, memcpy and memset on every
            stream, in the experiment and its disco workers, merged with the experiment's host
            spans and the sampled counters. Without CUPTI or a GPU: the host spans and per-step
            timings only (the summary says so).
            -> trace.json (chrome://tracing, https://ui.perfetto.dev), kernels.md, samples.csv

Outputs go to DIR/<mode>-<YYYYmmdd-HHMMSS>/ (a new folder every time); the experiment's own
results folder is its experiment/ subfolder. Everything after -- goes to the experiment as Hydra
overrides, e.g. -- device=cuda model=llama3-8b quant=q4f16_1.

exit status: 0 ok, 1 the experiment failed, 2 usage, 3 no profiler (nsight), 124 the -d limit
stopped the experiment (its results.json: status "interrupted", the points finished), 130 / 143
interrupted by SIGINT / SIGTERM (the experiment stopped the same way)."""


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="profile_gpu.sh", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s -m {basic,nsight,timeline} [-s EXPERIMENT] [-d SECONDS] [-o DIR] [-- hydra overrides...]",
        description="Profile one run of an experiment (python -m experiments.<EXPERIMENT>).",
        epilog=MODES_HELP)
    p.add_argument("-m", "--mode", required=True, choices=MODES, help="what to record (below)")
    p.add_argument("-s", "--experiment", default="baseline",
                   help="module under experiments/ with a main (default: baseline), e.g. tensor_parallel")
    p.add_argument("-d", "--duration", type=_positive(float), default=300.0, metavar="SECONDS",
                   help="bound on sampling/profiling time: the experiment is stopped after it (default 300)")
    p.add_argument("-o", "--out-dir", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help=f"folder for the run folder (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    p.add_argument("--top", type=_positive(int), default=settings.integer("LAB_PROFILE_TOP"),
                   help="rows of the kernel table (default 25, or $LAB_PROFILE_TOP)")
    p.add_argument("--kernel-cap", type=_positive(int), default=settings.integer("LAB_NCU_KERNELS"),
                   help="ncu: profile at most this many kernel launches (default 2000, or $LAB_NCU_KERNELS)")
    p.add_argument("--from-start", action="store_true", default=settings.flag("LAB_PROFILE_FROM_START"),
                   help="ncu: profile from the first kernel, not only inside the experiment's profiler range")
    p.add_argument("--interval-ms", type=_positive(int), default=100, help="sampling interval (default 100)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the experiment's output")
    p.add_argument("--full-trace", action="store_true",
                   help="timeline: keep every record, not only those of the timed repeats (large traces)")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    overrides = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    p = parser()
    args, rest = p.parse_known_args(argv)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)} (Hydra overrides go after --)")
    problem = runner.check_experiment(args.experiment)
    if problem:
        p.error(problem)
    for o in overrides:
        if o.lstrip("+~").split("=", 1)[0] in ("hydra.run.dir", "hydra.sweep.dir"):
            p.error(f"{o.split('=', 1)[0]} is set by the profiler (the experiment's results go to <run folder>/experiment)")
    return args, overrides


def make_run_dir(base: Path, mode: str) -> Path:
    """base/<mode>-<stamp>, or with -2, -3, ... where that exists already (never reused)."""
    base.mkdir(parents=True, exist_ok=True)
    stem = f"{mode}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        path = base / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name under {base}")


def child_env(extra: dict | None = None) -> dict:
    return {**settings.child_environment(**(extra or {})), "PYTHONUNBUFFERED": "1"}


class Profile:
    """One profiling run: its folder, the experiment's command, what was written."""

    def __init__(self, args, overrides, out: Path):
        self.args, self.overrides, self.out = args, overrides, out
        self.experiment_dir = out / "experiment"
        self.files: dict[str, str] = {}
        self.summary: dict = {"mode": args.mode, "experiment": args.experiment, "overrides": overrides,
                              "time_limit_s": args.duration, "output_dir": str(out),
                              "experiment_dir": str(self.experiment_dir),
                              "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                              "profile_command": list(getattr(sys, "orig_argv", sys.argv))}
        self.lines: list[str] = []

    def experiment_args(self) -> list[str]:
        return runner.experiment_args(self.args.experiment, self.overrides, self.experiment_dir)

    def note(self, name: str, what: str) -> None:
        self.files[name] = what

    def say(self, line: str) -> None:
        self.lines.append(line)

    def record_run(self, done: runner.Completed) -> None:
        self.summary.update(command=done.command, returncode=done.returncode, status=done.status,
                            wall_s=round(done.wall_s, 3))
        if done.interrupted_by:
            self.summary["interrupted_by"] = done.interrupted_by
        results = self.experiment_dir / "results.json"
        if results.is_file():
            try:
                self.summary["experiment_status"] = json.loads(results.read_text()).get("status")
            except (OSError, json.JSONDecodeError):
                pass
            self.summary["experiment_results"] = str(results)
        self.note("experiment.log", "the experiment's output")
        if self.experiment_dir.is_dir():
            self.note("experiment/", "the experiment's own results folder (results.json, summary.md, trace.json)")

    # --- sampling, shared by basic and timeline ---------------------------------------------

    def run_sampled(self, command: list[str], env: dict) -> tuple[runner.Completed, str, list[dict], str]:
        gpu = sampling.gpu_sampler()
        holder = {}

        def on_start(proc):
            sampler = gpu or sampling.CpuSampler(proc.pid)
            holder["recorder"] = sampling.Recorder(sampler, self.args.interval_ms).start()

        done = runner.run(command, env, self.out / "experiment.log", self.args.duration, on_start,
                          echo=not self.args.quiet)
        recorder = holder.get("recorder")
        rows = recorder.stop() if recorder else []
        kind = recorder.sampler.kind if recorder else "none"
        description = recorder.sampler.description if recorder else "nothing sampled"
        self.summary["sampler"] = kind
        self.summary["sampling"] = (f"{'GPU sampling' if kind in ('nvml', 'nvidia-smi') else 'CPU sampling'}: "
                                    f"{description}, every {self.args.interval_ms} ms")
        self.summary["samples"] = len(rows)
        self.summary["clock_origin_perf_counter_s"] = done.start_s
        if recorder and recorder.error:
            self.summary["sampler_error"] = recorder.error
        if rows:
            fields = recorder.sampler.fields
            sampling.write_csv(self.out / "samples.csv", rows, fields, done.start_s)
            self.note("samples.csv", f"one row per {'GPU and ' if kind != 'cpu' else ''}sample "
                                     "(time_s since the experiment started, perf_counter_s on the host clock)")
        return done, kind, rows, description

    # --- modes ------------------------------------------------------------------------------

    def basic(self) -> None:
        done, kind, rows, description = self.run_sampled([sys.executable, *self.experiment_args()], child_env())
        self.record_run(done)
        self.say(f"basic: {self.summary['sampling']} ({len(rows)} samples over {done.wall_s:.1f} s)")
        if rows:
            stats = sampling.summarize(kind, rows)
            self.summary["stats"] = stats
            self.lines += ["  " + line for line in sampling.describe(kind, stats)]
            sampling.plot(self.out / "utilisation.png", kind, rows, done.start_s,
                          f"{self.args.experiment}: {description}")
            self.note("utilisation.png", "the samples over time")

    def timeline(self) -> None:
        cupti_dir = self.out / "cupti"
        env = child_env({"LAB_CUPTI_DIR": str(cupti_dir)})
        args = self.experiment_args()  # ["-m", "experiments.<name>", ...]
        command = [sys.executable, "-m", "profiler.launch", *args[1:]]
        done, kind, rows, description = self.run_sampled(command, env)
        self.record_run(done)

        docs, unavailable = timeline.load_record_files(cupti_dir)
        host = timeline.load_host_traces(self.experiment_dir)
        windows = timeline.run_windows(host)
        if windows and not self.args.full_trace:  # the timed repeats only: weight loading, compiles and
            docs, left_out = timeline.keep_within(docs, windows)  # warm-up left out, a trace a browser opens
            self.summary["trace_window"] = {"kept": "the timed repeats of every sweep point", "left_out_records": left_out}
            self.say(f"timeline: the trace holds the timed repeats only; {left_out} records outside them left out "
                     "(weights, compiles, warm-up; --full-trace keeps everything)")
        device_docs = [d for d in docs if any(r["kind"] in timeline.DEVICE_KINDS for r in d.get("records", []))]
        if device_docs:
            reason = None
        elif unavailable:
            reason = "; ".join(sorted({f"{n.get('label', n.get('file', '?'))}: {n.get('reason')}" for n in unavailable}))
        elif docs:
            reason = (f"CUPTI traced {len(docs)} process(es) but recorded no GPU work "
                      "(did the experiment run on the CPU?)")
        else:
            reason = ("no CUPTI record files were written: the tracer did not start "
                      "(runtime_patch.cupti_tracer.maybe_start_from_env was not reached)")

        ranges = [r for r in (timeline.doc_time_range(d) for d in docs) if r]
        origin = min([done.start_s, *timeline.host_origin_candidates(host), *(a for a, _ in ranges),
                      *(r["perf_counter_s"] for r in rows[:1])])
        trace = Trace(origin)
        all_names = [r["name"] for d in docs for r in d.get("records", []) if r["kind"] == "kernel"]
        names = kernels.demangle(all_names)
        stats = timeline.add_cupti(trace, docs, names=names)
        timeline.add_telemetry(trace, kind, rows, description)
        mode = "cupti" if reason is None else "host spans only (fallback)"
        other = {"mode": "timeline", "kernel_trace": mode,
                 "note": "kernel-level records through CUPTI" if reason is None
                 else f"FALLBACK: no kernel-level records ({reason}); host spans and per-step timings only",
                 "clock": "time.perf_counter (CLOCK_MONOTONIC), shared by every process of the host"}
        doc = timeline.merged_document(host, trace, other)
        atomic_write_text(self.out / "trace.json", json.dumps(to_jsonable(doc), separators=(",", ":")))
        n_events = sum(1 for e in doc["traceEvents"] if e["ph"] != "M")
        self.note("trace.json", "Chrome trace: open in chrome://tracing (Load) or https://ui.perfetto.dev "
                                "(Open trace file)")

        steps = timeline.host_step_timings(host)
        self.summary.update(kernel_trace=mode, trace_events=n_events, host_steps=steps,
                            cupti={**stats, "record_files": len(docs),
                                   "incomplete": [d.get("label") for d in docs if d.get("complete") is False],
                                   "unavailable": unavailable})
        sections = []
        if reason is None:
            launches = [(names.get(r["name"], r["name"]), r["end_ns"] - r["start_ns"])
                        for d in docs for r in d["records"] if r["kind"] == "kernel"]
            kstats = kernels.aggregate(launches)
            copies = kernels.aggregate((r["name"], r["end_ns"] - r["start_ns"])
                                       for d in docs for r in d["records"] if r["kind"] in ("memcpy", "memset"))
            self.summary["top_kernels"] = kernels.table_rows(kstats, 10)
            sections.append(("Top kernels by total time", kernels.kernel_section(kstats, self.args.top)))
            if copies:
                sections.append(("Copies and sets", kernels.kernel_section(copies, self.args.top)))
            preface = (f"CUPTI activity records from {stats['processes']} process(es), GPU(s) {stats['devices']}: "
                       f"{stats['kernels']} kernels, {stats['memcpys']} memcpys, {stats['memsets']} memsets. "
                       "Times are as the GPU ran them, in the experiment's timeline ("
                       + ("everything the experiment ran, warm-up included)." if self.args.full_trace or
                          "trace_window" not in self.summary else "the timed repeats only; --full-trace keeps all)."))
            self.say(f"timeline: CUPTI records of {stats['kernels']} kernels, {stats['memcpys']} memcpys and "
                     f"{stats['memsets']} memsets on GPU(s) {stats['devices']} from {stats['processes']} process(es), "
                     f"{stats['flows']} launch arrows; merged with {len(host)} host trace(s)")
            for row in kernels.table_rows(kstats, 5):
                self.say(f"  {row['share']:6.1%}  {row['total_ms']:10.3f} ms  {row['calls']:7d} x  {row['name'][:70]}")
            idle = timeline.device_idle_during_decode(host, docs)
            if idle:
                self.summary["device_idle_during_decode"] = idle
                sections.append(("GPU idle time during decode steps", (
                    "Per host track with decode steps (a sweep point, an overlap mode) and GPU: the wall time of "
                    "its decode steps, the time the GPU ran a kernel, copy or set inside them, and the rest as "
                    "the idle fraction (host work and launch gaps the GPU waited through; tracing adds host "
                    "time, so this is an upper bound).\n\n") + markdown.table(idle, timeline.IDLE_COLUMNS)))
                for row in idle:
                    self.say(f"  GPU {row['device']} idle during {row['host_track']}'s decode steps: "
                             f"{row['idle_fraction']:.1%} of {row['decode_s'] * 1e3:.1f} ms")
        else:
            preface = (f"FALLBACK: no kernel-level records ({reason}). The trace holds the experiment's "
                       "host spans; below, per-step timings from them.")
            self.say(f"timeline: FALLBACK to the experiment's host spans: {reason}")
            self.summary["fallback_reason"] = reason
        if not host:
            self.say("  the experiment wrote no trace.json (stopped or failed before its report): "
                     "the trace holds what CUPTI and the sampler recorded only")
        if steps:
            sections.append(("Host step timings (the experiment's own spans)",
                             markdown.table(steps, timeline.STEP_COLUMNS)))
            for s in steps:
                if s["category"] in ("prefill", "decode"):
                    self.say(f"  host {s['category']}: {s['count']} steps, mean {s['mean_ms']:.3f} ms, "
                             f"p50 {s['p50_ms']:.3f} ms, p95 {s['p95_ms']:.3f} ms")
        atomic_write_text(self.out / "kernels.md", kernels.document(
            f"Timeline of {self.args.experiment}", sections, preface))
        self.note("kernels.md", "kernel table by total time" if reason is None else "host step timings (fallback)")

    def nsight(self, tool: str) -> None:
        env = child_env({"LAB_PROFILER_RANGE": "1"})
        target = nsight.target(self.experiment_args())
        tool_dir = self.out / tool
        tool_dir.mkdir()
        if tool == "nsys":
            report = tool_dir / "report"
            command = nsight.nsys_command(report, self.args.duration, target)
            done = runner.run(command, env, self.out / "experiment.log", self.args.duration + 180,
                              echo=not self.args.quiet)
            stats, csv_path, problem = nsight.nsys_kernels(report, self.out)
            what = ("Nsight Systems, capture limited to the experiment's profiler range "
                    "(--capture-range=cudaProfilerApi): kernel times as they ran")
        else:
            report = tool_dir / "profile"
            command = nsight.ncu_command(report, self.args.kernel_cap, self.args.from_start, target)
            done = runner.run(command, env, self.out / "experiment.log", self.args.duration,
                              echo=not self.args.quiet, stop_leader_first=True)
            launches, csv_path, problem = nsight.ncu_kernels(report, self.out)
            stats = kernels.aggregate((k["name"], k["duration_ns"]) for k in launches)
            scope = "from the first kernel" if self.args.from_start else "inside the experiment's profiler range"
            what = (f"Nsight Compute (ncu --clock-control none --target-processes all), {scope}, at most "
                    f"{self.args.kernel_cap} launches: each kernel serialised and measured on its own "
                    "(gpu__time_duration), not the overlapped timeline")
        self.record_run(done)
        names = kernels.demangle(s.name for s in stats)
        for s in stats:
            s.name = names.get(s.name, s.name)
        self.summary.update(tool=tool, tool_command=command, report=str(report), kernels_profiled=sum(s.calls for s in stats))
        if problem:
            self.summary["problem"] = problem
        for path in sorted(tool_dir.iterdir()):
            self.note(f"{tool}/{path.name}", f"the {tool} report")
        if csv_path is not None:
            self.note("kernels.csv", f"{tool}'s kernel data as CSV")
        if stats:
            self.summary["top_kernels"] = kernels.table_rows(stats, 10)
            atomic_write_text(self.out / "kernels.md", kernels.document(
                f"Kernels of {self.args.experiment} ({tool})", [("Top kernels by total time",
                                                                 kernels.kernel_section(stats, self.args.top))], what))
            self.note("kernels.md", "kernel table by total time")
            self.say(f"nsight: {tool}: {sum(s.calls for s in stats)} kernel launches of {len(stats)} kernels")
            for row in kernels.table_rows(stats, 5):
                self.say(f"  {row['share']:6.1%}  {row['total_ms']:10.3f} ms  {row['calls']:7d} x  {row['name'][:70]}")
        else:
            self.say(f"nsight: {tool}: no kernel data: {problem}")

    # --- the end ------------------------------------------------------------------------------

    def finish(self) -> int:
        self.summary["ended"] = datetime.now().astimezone().isoformat(timespec="seconds")
        self.summary["environment"] = environment()
        self.note("summary.json", "what ran, how it ended, the figures")
        self.summary["files"] = self.files
        atomic_write_json(self.out / "summary.json", self.summary)
        print(file=sys.stderr)
        for line in self.lines:
            print(line)
        status = self.summary.get("status", "?")
        if "experiment_results" in self.summary:
            print(f"experiment: {status}; its results.json: status {self.summary.get('experiment_status', '?')} "
                  f"({self.summary['experiment_results']})")
        else:
            print(f"experiment: {status}; it wrote no results.json")
        print(f"profile written to {self.out}")
        width = max(len(name) for name in self.files)
        for name, what in sorted(self.files.items()):
            print(f"  {name:<{width}}  {what}")
        if "trace.json" in self.files:
            print(f"open the trace: chrome://tracing -> Load -> {self.out / 'trace.json'}; "
                  "or https://ui.perfetto.dev -> Open trace file")
        if self.summary.get("status") == "time limit reached":
            return EXIT_TIME_LIMIT
        if self.summary.get("status") == "interrupted":
            return EXIT_TERMINATED if self.summary.get("interrupted_by") == "SIGTERM" else EXIT_INTERRUPTED
        if self.summary.get("returncode") != 0 or (self.args.mode == "nsight" and "problem" in self.summary):
            return EXIT_FAILED
        return 0


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    tool = None
    if args.mode == "nsight":
        tool = nsight.find_tool()
        if tool is None:
            print(f"profile_gpu.sh -m nsight: {nsight.NO_TOOL}", file=sys.stderr)
            return EXIT_NO_TOOL
    out = make_run_dir(args.out_dir.resolve(), args.mode)
    print(f"profile: {args.mode} of experiments.{args.experiment} -> {out}", file=sys.stderr, flush=True)
    profile = Profile(args, overrides, out)
    if args.mode == "basic":
        profile.basic()
    elif args.mode == "timeline":
        profile.timeline()
    else:
        profile.nsight(tool)
    return profile.finish()


if __name__ == "__main__":
    sys.exit(main())
