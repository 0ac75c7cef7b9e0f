"""Compile the CUDA artifacts a GPU run needs, on any machine (no GPU required).

    python -m bench.build_artifacts --out artifacts --models llama3-8b --quants q0f16,q4f16_1 --tps 1,2,4
    python -m bench.build_artifacts --out artifacts --quants q0f16 --prefill-gemms library,tir
    python -m bench.build_artifacts --out artifacts --quants q0f16 --prefill-attentions library,tir \
        --decode-attentions library,tir
    python -m bench.build_artifacts --out artifacts --quants q0f16 --tps 2 --microbatch-decode   # full_overlap
    python -m bench.build_artifacts --out artifacts --quants q0f16 --tps 1,2 --kv-caches static,paged
    python -m bench.build_artifacts --out artifacts --quants q0f16 --tps 2 --batch-invariant   # double_buffer
    python -m bench.build_artifacts --out artifacts --quants q0f16 --tps 1 --pps 2            # pipeline stages

The folder can be carried to the GPU box; `--out` is a compile cache like any other.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

from tqdm import tqdm

from engine.compile import BuildSpec, compile_model
from engine.config import KERNEL_OPTIONS, preset


def kernel_flag(option: str) -> str:
    """The command-line flag of a kernel option (engine.config.KERNEL_OPTIONS): --prefill-gemms."""
    return "--" + option.replace("_", "-") + "s"


def add_kernel_args(ap: argparse.ArgumentParser) -> None:
    """One comma-separated flag per kernel option; each combination is one artifact."""
    for option in KERNEL_OPTIONS:
        ap.add_argument(kernel_flag(option), default="auto",
                        help=f"{option}: auto, library, tir (comma-separated; one artifact each)")


def kernel_variants(args: argparse.Namespace) -> list[dict[str, str]]:
    """Every combination of the kernel flags' values, as BuildSpec keyword arguments."""
    choices = [getattr(args, option + "s").split(",") for option in KERNEL_OPTIONS]
    return [dict(zip(KERNEL_OPTIONS, combo)) for combo in itertools.product(*choices)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="llama3-8b")
    ap.add_argument("--quants", default="q0f16,q8f16_1,q4f16_1")
    ap.add_argument("--tps", default="1")
    ap.add_argument("--pps", default="1", help="pipeline stages, comma-separated (pp > 1: every stage's artifact)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--lm-heads", default="auto",
                    help="LM head layouts at tp > 1, comma-separated (auto: vocab_parallel on cuda where it applies)")
    ap.add_argument("--kv-caches", default="auto", help="paged, static or auto, comma-separated (engine.config.KV_CACHES)")
    ap.add_argument("--microbatch-decode", action="store_true",
                    help="also export batch_decode_pair (what experiments.overlap mode=full_overlap builds at tp > 1)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="decode attention split as at batch 1 (what experiments.overlap builds with double_buffer "
                         "or full_overlap among its modes)")
    add_kernel_args(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    def pair_decode(tp: str, kv: str) -> bool:  # batch_decode_pair: tp > 1, on the paged cache only
        return args.microbatch_decode and int(tp) > 1 and BuildSpec.resolved_kv_cache(kv, args.target) == "paged"

    # with pp > 1 the KV cache and allreduce are settled by BuildSpec (paged, TVM's CCL)
    specs = [stage for m in args.models.split(",") for q in args.quants.split(",") for tp in args.tps.split(",")
             for pp in args.pps.split(",") for head in args.lm_heads.split(",") if int(tp) > 1 or head in ("replicated", "auto")
             for kernels in kernel_variants(args) for kv in dict.fromkeys(args.kv_caches.split(",") if int(pp) == 1
                                                                          else ["auto"])
             for stage in BuildSpec(preset(m), q, int(tp), args.target, args.arch, lm_head=head, **kernels,
                                    kv_cache=kv, microbatch_decode=pair_decode(tp, kv) and int(pp) == 1,
                                    batch_invariant=args.batch_invariant, pp=int(pp)).stages]
    for spec in tqdm(specs, desc="compile", unit="artifact"):
        artifact = compile_model(spec, args.out)
        tqdm.write(f"{artifact.path.name}: {artifact.metadata['compile_seconds']} s")


if __name__ == "__main__":
    main()
