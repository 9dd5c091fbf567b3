"""bf16 weights under AdamW at a full-fine-tuning learning rate: how far each way of writing the
update into bf16 weights strays from the float32 run (nanocausal.optimizer.AdamW's docstring).

    python benchmarks/bench_adamw.py [--n 1000000] [--steps 200] [--lr 1e-6]

Weights N(0, 0.02) (a transformer's init scale), gradients d + noise with d fixed (a steady
direction, as training has), the same gradients for every variant. Error: ||dw - dw_f32|| /
||dw_f32|| of the total update dw, where the weights a variant ends with are p (+ c for Kahan:
the weight it tracks); "ours": nanocausal.optimizer.AdamW (p + its low 16 bits); "= bf16(f32)": the share of bf16 weights equal to the float32 run's
weights rounded to bf16 (the best any bf16 storage can do). Seconds per step on this CPU.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs with no install

from nanocausal.optimizer import AdamW, join_float32


def stochastic_round(x):
    """x (float32) -> bf16, rounding up with probability equal to the distance to the lower value."""
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-6)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = (torch.randn(args.n) * 0.02).bfloat16()
    direction = torch.randn(args.n)
    grads = lambda step: direction + 0.5 * torch.randn(args.n, generator=torch.Generator().manual_seed(step))

    reference = torch.nn.Parameter(start.float())
    ref_opt = torch.optim.AdamW([reference], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ours = torch.nn.Parameter(start.clone())
    our_opt = AdamW([ours], lr=args.lr, weight_decay=0.0)
    plain, rounded, kahan, compensation = start.clone(), start.clone(), start.clone(), torch.zeros_like(start)
    seconds = {"float32 (torch)": 0.0, "ours": 0.0}
    for step in range(args.steps):
        before = reference.detach().clone()
        reference.grad = grads(step)
        started = time.perf_counter()
        ref_opt.step()
        seconds["float32 (torch)"] += time.perf_counter() - started
        update = reference.detach() - before  # the same float32 update, written three ways
        plain = (plain.float() + update).bfloat16()
        rounded = stochastic_round(rounded.float() + update)
        tracked = kahan.float() + compensation.float() + update  # Kahan: carry what rounding dropped
        kahan = tracked.bfloat16()
        compensation = (tracked - kahan.float()).bfloat16()
        ours.grad = grads(step).bfloat16()
        started = time.perf_counter()
        our_opt.step()
        seconds["ours"] += time.perf_counter() - started
    target = reference.detach() - start.float()
    print(f"{args.n:,} weights, {args.steps} steps at lr {args.lr:g}; float32 update rms {target.pow(2).mean().sqrt():.3g}")
    print(f"{'variant':<22}{'rel. error':>11}{'= bf16(f32)':>13}{'bytes/weight':>14}")
    for name, weights, extra in (("plain bf16 rounding", plain, 0), ("stochastic rounding", rounded, 0),
                                 ("Kahan, bf16 c (p)", kahan, 2), ("Kahan, bf16 c (p + c)", tracked, 2),
                                 ("float32 master", reference.detach(), 4), ("ours (p)", ours.detach(), 2),
                                 ("ours (p + low)", join_float32(ours.detach(), our_opt.state[ours]["low_bits"]), 2)):
        error = ((weights.float() - start.float()) - target).norm() / target.norm()
        same = (weights.bfloat16() == reference.detach().bfloat16()).float().mean()
        print(f"{name:<22}{error:>10.2%}{same:>13.2%}{extra:>14}")
    for name, total in seconds.items():
        print(f"{name}: {total / args.steps * 1e3:.1f} ms per step")


if __name__ == "__main__":
    main()
