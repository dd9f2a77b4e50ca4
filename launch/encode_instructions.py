"""Fill a text-embedding cache (the official ``t5_embeddings.pkl`` format) offline.

Encodes every instruction not yet in the cache with a local T5 encoder (e.g. a copy of
``google-t5/t5-11b``) and writes the cache back. Nothing is downloaded.

    python launch/encode_instructions.py --t5 /models/t5-11b --out t5_embeddings.pkl \
        --instructions instructions.txt            # one instruction per line
    python launch/encode_instructions.py --t5 /models/t5-11b --out t5_embeddings.pkl "pick up the bowl"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cosmos_policy.text import T5TextEncoder, TextEmbeddingCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t5", required=True, help="local directory of a transformers T5 encoder and tokenizer")
    parser.add_argument("--out", required=True, help="cache file to create or extend")
    parser.add_argument("--instructions", help="text file, one instruction per line")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("text", nargs="*", help="instructions given on the command line")
    args = parser.parse_args()

    instructions = list(args.text)
    if args.instructions:
        instructions += [line.strip() for line in Path(args.instructions).read_text().splitlines() if line.strip()]
    if not instructions:
        parser.error("no instructions: pass them as arguments or with --instructions FILE")
    out = Path(args.out)
    cache = TextEmbeddingCache.load(out) if out.exists() else TextEmbeddingCache()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    encoder = T5TextEncoder(args.t5, max_length=args.max_length, device=args.device, dtype=dtype)
    added = cache.fill(encoder, instructions, batch_size=args.batch_size)
    cache.save(out)
    print(f"{out}: {len(cache)} instructions ({added} new), embeddings {cache.shape}")


if __name__ == "__main__":
    main()
