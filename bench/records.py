"""Turn experiment results (results.json) into benchmark records under docs/benchmarks/.

    python -m bench.records results/tensor_parallel/20261126-150000 [...] --out docs/benchmarks

One JSON record per results folder: model, quant, tp, batch, card, date, command, git SHA and the
figures (decode tokens/s, speedup, efficiency, allreduce share, roofline fraction, TTFT), with the
raw per-step samples kept. Prints Markdown table rows for docs/BENCHMARKS.md.

`write_checked_record` is the record of a GPU benchmark whose results carry their own check
(`ok`): bench.static_kv's, bench.attention_o's and bench.gemv's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness.results import atomic_write_json, atomic_write_text, git_info


def write_checked_record(out: Path, module: str, results: list[dict], sha: str | None = None,
                         extra: dict | None = None) -> bool:
    """`results` (each with its `ok`) as a record at `out`, written atomically: card, date, git SHA
    (`sha` where the benchmark was given the one that built its plugins, else this checkout's), the
    command (`python -m bench.<module>` and this process's arguments), torch's version, `ok` (every
    result's), and the benchmark's `extra` fields (e.g. the copy bandwidth it measured). Returns that
    `ok`."""
    import torch

    ok = all(r["ok"] for r in results)
    atomic_write_text(out, json.dumps({
        "card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
        "git_sha": sha if sha is not None else (git_info() or {}).get("sha"),
        "command": " ".join(["python", "-m", f"bench.{module}", *sys.argv[1:]]), "torch": torch.__version__,
        **(extra or {}), "ok": ok, "results": results}, indent=1))
    return ok


def _experiment(command: str | None, results_dir: Path) -> str:
    """The experiment's name: its module in the command (`python -m experiments.NAME ...`), else
    the results folder's parent (results/NAME/<time>; a hydra.run.dir elsewhere has no such parent)."""
    for word in (command or "").split():
        if word.startswith("experiments."):
            return word.split(".", 1)[1]
    return results_dir.parent.name


def _card(env: dict) -> str:
    gpus = env.get("gpus") or []
    return f"{len(gpus)} x {gpus[0]['name']}" if gpus else (env.get("cpu_model") or "CPU")


# experiments.overlap's figures per mode, kept where present
OVERLAP_FIGURES = ("same_tokens", "note", "hidden_ms", "allreduce_hidden_ms", "allreduce_hidden_fraction")


def _step_figures(s: dict) -> dict:
    """What built and ran the point (KV cache, allreduce and its path) and where its decode step's
    time went in the traced repeat (harness/breakdown.py), per GPU, without the kernel lists."""
    build = s.get("build") or {}
    out = {"kv_cache": build.get("kv_cache"), "allreduce_kernel": build.get("allreduce"),
           "allreduce_path": s.get("allreduce_path"), "gpu_idle_share": s.get("gpu_idle_share"),
           "collectives_share_traced": s.get("collectives_share_traced")}
    breakdown = s.get("breakdown") or {}
    if breakdown.get("measured"):
        out["decode_breakdown_us"] = [
            {"device": d["device"], "step_us": d["decode"]["step_us"], "idle_us": d["decode"]["idle_us"],
             **d["decode"]["categories"]} for d in breakdown["devices"] if d.get("decode")]
        out["traced_decode_tokens_per_s"] = breakdown.get("traced_decode_tokens_per_s")
    elif breakdown:
        out["decode_breakdown_us"] = breakdown.get("reason")
    return {k: v for k, v in out.items() if v is not None}


def record_of(results_dir: Path) -> dict:
    data = json.loads((results_dir / "results.json").read_text())
    env, cfg = data["environment"], data["config"]
    points = []
    for run in data["runs"]:
        s = data["summary"].get(run["label"], data["summary"] if data["summary"].get("label") == run["label"] else {})
        point = {"label": run["label"], **run["params"], "batch": cfg.get("workload", {}).get("batch"),
                 "error": run["error"]}
        if not run["error"]:
            point.update({
                "decode_tokens_per_s": s.get("decode_tokens_per_s"), "speedup": s.get("speedup"),
                "efficiency": s.get("efficiency"), "allreduce_share": s.get("allreduce_share"),
                "allreduce_seconds_each": (s.get("allreduce") or {}).get("seconds_each"),
                "roofline_fraction": s.get("roofline_fraction"), "ttft_s_p50": s["ttft_s"]["p50"],
                "kl": s.get("kl"), "top1": s.get("top1"),
                "itl_s": {k: s["itl_s"][k] for k in ("p50", "p95", "mean", "count")},
                "weight_bytes_per_rank": s.get("weight_bytes"), "gpu_memory_used_bytes": s.get("gpu_memory_used_bytes"),
                "memory_predicted_bytes": s.get("memory_predicted_bytes"), "transfer_share": s.get("transfer_share"),
                "transfer_seconds_each": (s.get("transfer") or {}).get("seconds_each"),
                "tokens_first_sequence": s.get("tokens_first_sequence"),
                "raw_itl_s": [t for sample in run["samples"] for t in sample["itl_s"]],
            })
            point.update({k: s[k] for k in OVERLAP_FIGURES if k in s})
            point.update(_step_figures(s))
            if "allreduce_overlap" in s:  # full_overlap: its run with serialized collectives, raw samples kept
                overlap = dict(s["allreduce_overlap"])
                samples = overlap.pop("serialized_samples", [])
                point["allreduce_overlap"] = {**overlap,
                                              "serialized_raw_itl_s": [t for r in samples for t in r["itl_s"]]}
        points.append(point)
    return {"experiment": _experiment(env.get("command"), results_dir), "model": cfg["model"].get("preset"), "quant": cfg.get("quant", {}).get("name"),
            "lm_head": cfg.get("lm_head"), "overlap": cfg.get("overlap"),
            "workload": cfg.get("workload"), "card": _card(env), "date": env["timestamp"][:10],
            "command": env.get("command"), "git_sha": (env.get("git") or {}).get("sha"),
            "git_dirty": (env.get("git") or {}).get("dirty"), "bandwidth_bytes_per_s": (data.get("bandwidth") or {}).get("bytes_per_s"),
            "status": data["status"], "points": points, "source": str(results_dir),
            **({"batch_invariant_attention": data["summary"]["batch_invariant_attention"]}
               if "batch_invariant_attention" in data["summary"] else {})}


def table_rows(record: dict) -> list[str]:
    rows = []
    for p in record["points"]:
        if p["error"]:
            rows.append(f"| {record['model']} | {record['quant']} | {p.get('tp')} | {p.get('batch')} | error: {p['error'][:60]} |||||")
            continue
        fmt = lambda v, f: "—" if v is None else f.format(v)  # noqa: E731
        rows.append(f"| {record['model']} | {record['quant']} | {p.get('tp')} | {p.get('batch')} | "
                    f"{fmt(p['decode_tokens_per_s'], '{:.1f}')} | {fmt(p['itl_s']['p50'] * 1e3, '{:.2f}')} / "
                    f"{fmt(p['itl_s']['p95'] * 1e3, '{:.2f}')} | {fmt(p['speedup'], '{:.2f}x')} | "
                    f"{fmt(p['efficiency'], '{:.0%}')} | {fmt(p['allreduce_share'], '{:.0%}')} | "
                    f"{fmt(p['roofline_fraction'], '{:.0%}')} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--sha", default=None, help="the git SHA the run was made from (replaces what the results say)")
    ap.add_argument("--peers", type=Path, default=None,
                    help="a file of JSON lines a peer printed in the same device call (e.g. ../shared/peers' "
                         "gpt-fast): kept in every record as `peers`")
    args = ap.parse_args()
    peers = [json.loads(line) for line in args.peers.read_text().splitlines() if line.startswith("{")] \
        if args.peers else []
    for folder in args.results:
        record = record_of(folder)
        if peers:
            record["peers"] = peers
        if args.sha and args.sha != record["git_sha"]:
            record["git_sha"], record["git_dirty"], record["git_sha_from"] = args.sha, None, "--sha"
        batch = record["points"][0].get("batch")
        name = (f"{record['date']}-{record['card'].replace(' ', '')}-{record['experiment']}-{record['model']}-"
                f"{record['quant'] or 'mixed'}-b{batch}{args.tag}.json")
        atomic_write_json(args.out / name, record)
        print(f"<!-- {name} -->")
        print("\n".join(table_rows(record)))


if __name__ == "__main__":
    main()
