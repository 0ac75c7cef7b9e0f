"""Compile the CUDA artifacts a GPU run needs, on any machine (no GPU required).

    python -m bench.build_artifacts --out artifacts --models llama3-8b --quants q0f16,q4f16_1 --tps 1,2,4
    python -m bench.build_artifacts --out artifacts --quants q0f16 --prefill-gemms library,tir
    python -m bench.build_artifacts --out artifacts --quants q0f16 --prefill-attentions library,tir \
        --decode-attentions library,tir

The folder can be carried to the GPU box; `--out` is a compile cache like any other.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from engine.compile import BuildSpec, compile_model
from engine.config import preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="llama3-8b")
    ap.add_argument("--quants", default="q0f16,q8f16_1,q4f16_1")
    ap.add_argument("--tps", default="1")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--lm-heads", default="replicated", help="LM head layouts at tp > 1, comma-separated")
    ap.add_argument("--prefill-gemms", default="auto", help="prefill GEMMs (auto, library, tir), comma-separated")
    ap.add_argument("--prefill-attentions", default="auto",
                    help="prefill self-attention (auto, library, tir), comma-separated")
    ap.add_argument("--decode-attentions", default="auto", help="decode attention (auto, library, tir), comma-separated")
    ap.add_argument("--decode-gemvs", default="auto", help="q4 decode GEMVs (auto, library, tir), comma-separated")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    specs = [BuildSpec(preset(m), q, int(tp), args.target, args.arch, lm_head=head, prefill_gemm=g,
                       prefill_attention=a, decode_attention=d, decode_gemv=v)
             for m in args.models.split(",") for q in args.quants.split(",") for tp in args.tps.split(",")
             for head in args.lm_heads.split(",") if int(tp) > 1 or head == "replicated"
             for g in args.prefill_gemms.split(",") for a in args.prefill_attentions.split(",")
             for d in args.decode_attentions.split(",") for v in args.decode_gemvs.split(",")]
    for spec in tqdm(specs, desc="compile", unit="artifact"):
        artifact = compile_model(spec, args.out)
        tqdm.write(f"{artifact.path.name}: {artifact.metadata['compile_seconds']} s")


if __name__ == "__main__":
    main()
