"""AdamW for bf16 weights (training.make_optimizer picks it when a trainable weight is not
float32; float32 runs use torch's own)."""
import math

import torch

from nanocausal import distributed


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov and Hutter, 2019) for bf16 weights: float32 moments, float32 weights kept
    as two 16-bit halves, and float32 temporaries of one chunk at a time. With g the gradient, t the
    step, bc1 = 1 - b1^t, bc2 = 1 - b2^t (torch.optim.AdamW's update, bias corrections folded):

        m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
        w <- w (1 - lr wd) - lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps sqrt(bc2))          (float32)

    Why float32 moments: torch.optim.AdamW keeps m and v in the weight's dtype; in bf16 (8-bit
    mantissa) v's increment (1 - b2) g^2 = 5 % of g^2 rounds away once v is a few times larger.

    Why a float32 w: near |w| = 0.02 a bf16 weight is a multiple of 2^-13 = 1.2e-4, so rounding
    w - 1e-6 back to bf16 returns w: at the README's lr (1e-6 for GRPO, 1e-5 for SFT) most updates
    would be lost. A bf16 number is the upper 16 bits of a float32 one, so the float32 w is kept
    whole as the bf16 weight p (what the model computes with and saves) plus its lower 16 bits,
    `low` (int16 state, 2 bytes per weight): in the integers of their bit patterns

        bits(w) = 65536 * bits(p) + low,   bits(p) = floor((bits(w) + 32768) / 65536),   -32768 <= low < 32768

    p is w rounded to the nearest bf16 (ties away from zero), so a bf16 run follows the float32
    run and its weights are that run's rounded to bf16. Measured against the other ways on 1M
    weights N(0, 0.02), 200 steps at lr 1e-6 (python benchmarks/bench_adamw.py, CPU): error of the
    total update against torch's float32 run / share of bf16 weights equal to that run's rounded /
    extra bytes per weight:
        plain bf16 rounding    99 %     10 %    0
        stochastic rounding    75 %     29 %    0 (noise ~ sqrt(ulp / (steps lr)) does not average out)
        Kahan, bf16 c         1.5 %     98 %    2 (c's own rounding adds up)
        float32 master          0 %    100 %    4 (bf16 weights then save no memory in training)
        p + low (this)       0.01 %   99.9 %    2 (float32 rounding of the folded bias corrections)
    On 2 CPU cores its step takes ~2.3x torch's float32 one (chunks, casts, bit operations).

    Why chunks: a whole-tensor float32 update of the 545M-element embedding of a 7B model would
    make float32 temporaries of 2.2 GB each; CHUNK elements at a time, the step's extra memory is
    two 4-byte chunks (memory_plan's optimizer_temporaries). A chunk's working set (m, v, two
    temporaries: 16 MiB) fits a GPU's L2 (50 MB on an H100), so its ~25 elementwise passes should
    move near the 26 bytes per weight they must (g, p, low, m, v) through HBM: ~0.5 s a step at 7B
    (a prediction: no GPU has run it). float32 parameters (PPO's value head beside bf16 weights)
    are updated in place and have no `low`."""

    CHUNK = 1 << 20  # elements: 4 MiB per 4-byte temporary

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict):
        """torch's, except that the state keeps its dtypes: torch casts every state tensor of a bf16
        parameter to bf16, which would round the float32 moments and wreck the int16 low bits."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"])))
        for saved_id, values in state_dict["state"].items():
            for key, value in values.items():
                if key != "step" and torch.is_tensor(value):
                    self.state[params[saved_id]][key] = value.to(params[saved_id].device)

    @torch.no_grad()
    def step(self, closure=None):  # (closure: torch's signature; FSDP's state-dict helpers call step(closure=None))
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if p.dtype == torch.bfloat16:
                        state["low_bits"] = torch.zeros_like(p, dtype=torch.int16)
                state["step"] += 1
                t = state["step"].item()
                bc1, bc2_sqrt = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
                # (under FSDP: this rank's shards; elementwise, so each rank updates its own)
                names = ["exp_avg", "exp_avg_sq"] + (["low_bits"] if "low_bits" in state else [])
                tensors = [distributed.local(x).view(-1).split(self.CHUNK) for x in (p, p.grad, *map(state.get, names))]
                for weight, grad, m, v, *low in zip(*tensors):
                    w = weight if not low else join_float32(weight, low[0])
                    g = grad.to(torch.float32, copy=True)
                    m.lerp_(g, 1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    denominator = torch.sqrt(v, out=g).add_(group["eps"] * bc2_sqrt)  # (g's buffer, now free)
                    w.mul_(1 - group["lr"] * group["weight_decay"]).addcdiv_(
                        m, denominator, value=-group["lr"] * bc2_sqrt / bc1)
                    del g, denominator  # (freed before split_float32's temporary: two chunks at most)
                    if low:
                        split_float32(w, weight, low[0])
                    del w  # (and before the next chunk's)


def join_float32(high, low):
    """The float32 number whose bit pattern is 65536 * bits(high) + low (high bf16, low int16)."""
    bits = high.view(torch.int16).to(torch.int32).bitwise_left_shift_(16)
    return bits.add_(low.to(torch.int32)).view(torch.float32)


def split_float32(w, high, low):
    """Write float32 w as high (bf16: w rounded to nearest, ties away from zero) and low (int16),
    so that join_float32(high, low) == w bit for bit. w's buffer is used up."""
    bits = w.view(torch.int32).add_(32768)
    low.copy_(bits.bitwise_and(65535).sub_(32768))
    high.view(torch.int16).copy_(bits.bitwise_right_shift_(16))
