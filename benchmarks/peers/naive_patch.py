"""Peer: the obvious script — load every shard whole, patch in torch, save_file.

Used by bench_patch.py as the "naive" baseline; writes the same layout as
resta_fast (one output file per fine-tune shard). fp32 math in separate ops.
"""

import argparse
import os

import torch
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--finetuned", required=True)
    ap.add_argument("--aligned", required=True)
    ap.add_argument("--unaligned", required=True)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    beta = torch.tensor(args.beta, dtype=torch.float32)
    for shard in sorted(f for f in os.listdir(args.finetuned) if f.endswith(".safetensors")):
        ft = load_file(os.path.join(args.finetuned, shard))
        al = load_file(os.path.join(args.aligned, shard))
        un = load_file(os.path.join(args.unaligned, shard))
        out = {}
        for name, f in ft.items():
            o = f.float() + beta * (al[name].float() - un[name].float())
            out[name] = o.to(f.dtype)
        save_file(out, os.path.join(args.out, shard), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
