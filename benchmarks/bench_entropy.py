"""What the exact RL entropy costs in the output head: forward + backward of the completion
log-probs (nanocausal.logprobs.token_logprobs, 151,936-token vocabulary, 4 rows x 192 completion
tokens, one thread) with the entropy of every token from the same logits chunks (rl.py now), against
the log-probs alone plus a no-grad entropy pass on every 8th token (rl.py before issue 29).

    python benchmarks/bench_entropy.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanocausal.logprobs import token_logprobs  # noqa: E402
torch.manual_seed(0); torch.set_num_threads(1)
V, C, B, T = 151936, 64, 4, 256
class M(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.lm_head = torch.nn.Linear(C, V, bias=False)
    def hidden_states(s, ids, mask=None): return s.h
m = M(); ids = torch.randint(0, V, (B, T)); mask = torch.zeros(B, T, dtype=torch.long); mask[:, 64:] = 1
def old():
    m.h = torch.randn(B, T, C, requires_grad=True)
    lp = token_logprobs(m, ids, None, mask, 1.0, 256, hidden=m.h)
    lp.sum().backward()
    with torch.no_grad():
        sampled = mask.bool() & ((mask.cumsum(1) - 1) % 8 == 0)
        token_logprobs(m, ids, None, sampled, 1.0, 256, hidden=m.h.detach(), return_entropy=True)
def new():
    m.h = torch.randn(B, T, C, requires_grad=True)
    lp, ent = token_logprobs(m, ids, None, mask, 1.0, 256, hidden=m.h, return_entropy=True)
    lp.sum().backward()
for f in (old, new, old, new):
    f(); t = time.time(); [f() for _ in range(3)]; print(f.__name__, round((time.time() - t) / 3, 3), "s")
