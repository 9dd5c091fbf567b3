"""bf16 full fine-tuning under torchrun (FSDP, 2 CPU ranks, gloo): optimizer.AdamW updates each
rank's shards, and its int16 low_bits state goes through the sharded optimiser checkpoint
(optimizer-rankR files, checked tensor by tensor on resume), so a resumed run equals a whole one
bit for bit."""
import pytest
import torch

from conftest import make_tiny_chat_model, tiny_examples, write_jsonl
from nanocausal.checkpoint import load_model
from safetensors.torch import load_file
from test_distributed import metrics, offline_args, torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def test_a_bf16_run_on_two_ranks_resumes_exactly(tmp_path):
    model = make_tiny_chat_model(tmp_path / "model", max_positions=2048)
    data = write_jsonl(tmp_path / "sft.jsonl", tiny_examples(16))
    flags = ["--min-lr-ratio", 1, "--dtype", "bfloat16"]  # (a constant schedule: 2 then 4 steps is one run of 4)
    torchrun("train_sft.py", *offline_args(model, data, tmp_path / "whole", steps=4), *flags)
    torchrun("train_sft.py", *offline_args(model, data, tmp_path / "resumed", steps=2), *flags)
    shard = load_file(tmp_path / "resumed" / "checkpoint" / "optimizer-rank1.safetensors")
    low = [t for name, t in shard.items() if name.endswith(".low_bits")]
    assert low and all(t.dtype == torch.int16 for t in low) and any(t.any() for t in low)
    torchrun("train_sft.py", *offline_args(model, data, tmp_path / "resumed", steps=4), *flags, "--resume")
    strip = [{k: v for k, v in row.items() if k not in ("time", "step_s", "tokens_per_s")} for row in metrics(tmp_path / "whole")]
    assert strip == [{k: v for k, v in row.items() if k not in ("time", "step_s", "tokens_per_s")}
                     for row in metrics(tmp_path / "resumed")]
    whole = dict(load_model(tmp_path / "whole" / "checkpoint", dtype=torch.bfloat16).named_parameters())
    for name, p in load_model(tmp_path / "resumed" / "checkpoint", dtype=torch.bfloat16).named_parameters():
        assert torch.equal(p, whole[name]), name
