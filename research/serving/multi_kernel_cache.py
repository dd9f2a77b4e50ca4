"""Does inductor's multi_kernel (triton.multi_kernel = 1) survive a second compile of the same graph in a new process,
one that finds the first's inductor cache? On torch 2.11 a 2b server compiled with it failed so (research/serving).
Compiles a GELU + row-wise float8 quantization of 8,192-wide rows (the pattern that gained) and prints one JSON line.

    python research/serving/multi_kernel_cache.py --how env|options [--no-fx-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def gelu_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.nn.functional.gelu(x.float())
    scale = y.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448.0
    return (y / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--how", choices=["env", "options"], required=True)
    parser.add_argument("--no-fx-cache", action="store_true")
    args = parser.parse_args()
    options = {"triton.multi_kernel": 1} if args.how == "options" else {}
    if args.no_fx_cache:
        options["fx_graph_cache"] = False
    fn = torch.compile(gelu_quantize, dynamic=False, options=options or None)
    x = torch.randn(14112, 8192, device="cuda", dtype=torch.bfloat16)
    try:
        q, s = fn(x)
        ref_q, ref_s = gelu_quantize(x)
        ok = bool(torch.allclose(s, ref_s, rtol=1e-3)) and float((q.float() - ref_q.float()).abs().max()) <= 32
        print(json.dumps({"how": args.how, "fx_cache": not args.no_fx_cache, "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                          "result": "ok" if ok else "wrong values"}), flush=True)
    except Exception as exc:
        print(json.dumps({"how": args.how, "fx_cache": not args.no_fx_cache, "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                          "result": f"{type(exc).__name__}: {str(exc)[-160:]}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
