"""nanocausal/data.py: reading (errors name file and line), tokenising, batching."""
import json

import pytest

from conftest import tiny_examples, write_jsonl
from nanocausal import data, safe_files
from nanocausal.tokenizer import Tokenizer


# -----------------------------------------------------------------------------


def test_read_records_locates_every_value(tmp_path):
    """safe_files.read_records, the one reader of JSON Lines / JSON lists: where names line or item."""
    lines = tmp_path / "a.jsonl"
    lines.write_bytes(b'{"a": 1}\r\n\n"two"\n[3]\n{"step": 4, "lo')  # CRLF, a blank line, a half-written last line
    assert safe_files.read_records(lines, partial_last_line=True) == [({"a": 1}, f"{lines}:1"), ("two", f"{lines}:3"),
                                                                      ([3], f"{lines}:4")]
    with pytest.raises(ValueError, match=rf"^{lines}:5: not valid JSON \(Unterminated string"):
        safe_files.read_records(lines)
    listed = tmp_path / "a.json"
    listed.write_text(' [{"a": 1}, "two"]')
    expected = [({"a": 1}, f"{listed}: item 0"), ("two", f"{listed}: item 1")]
    assert safe_files.read_records(listed, json_list=True) == safe_files.read_records(listed, json_list=None) == expected
    listed.write_text('{"a": 1}')
    with pytest.raises(ValueError, match=rf"^{listed}: expected a JSON list of examples, got a dict$"):
        safe_files.read_records(listed, json_list=True)
    assert safe_files.read_records(listed, json_list=None) == [({"a": 1}, f"{listed}:1")]


def test_errors_name_file_and_line(tmp_path, tiny_chat_model):
    good = tiny_examples(3)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1])[:-3] + "\n")
    with pytest.raises(ValueError, match=rf"{bad_json}:2: not valid JSON"):
        data.load_examples(bad_json, "sft")

    pair = {"prompt": "x", "chosen": "y", "rejected": "z"}
    missing = write_jsonl(tmp_path / "missing.jsonl", [pair, pair, {"prompt": "x", "chosen": "y"}])
    with pytest.raises(ValueError, match=rf"{missing}:3: missing field 'rejected'"):
        data.load_examples(missing, "dpo")
    with pytest.raises(ValueError, match=rf"{missing}:1: missing field 'completion'"):
        data.load_examples(missing, "kto")

    long = write_jsonl(tmp_path / "long.jsonl", good[:1] + [{"prompt": "p", "completion": "a very long answer " * 40}])
    tokenizer = Tokenizer.from_pretrained(tiny_chat_model)
    examples = data.load_examples(long, "sft")
    with pytest.raises(ValueError, match=rf"{long}:2: prompt \+ completion is \d+ tokens, longer than the context of 64"):
        data.tokenize(examples, tokenizer, "sft", max_length=64, progress=False)

    label = write_jsonl(tmp_path / "label.jsonl", [{"prompt": "p", "completion": "c", "label": "yes"}])
    with pytest.raises(ValueError, match=rf"{label}:1: field 'label' must be true or false"):
        data.load_examples(label, "kto")


def test_conversational_and_caugym_formats(tmp_path, tiny_chat_model, shared_dir):
    tokenizer = Tokenizer.from_pretrained(tiny_chat_model)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Is it?", "completion": "Yes."}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "Is it?"}],
                                                  "completion": [{"role": "assistant", "content": "Yes."}]}])
    rows = [data.tokenize(data.load_examples(p, "sft"), tokenizer, "sft", progress=False)[0] for p in (plain, chat)]
    assert rows[0] == rows[1]
    ids, mask = rows[0]["ids"], rows[0]["completion_mask"]
    completion = [t for t, m in zip(ids, mask) if m]
    assert tokenizer.decode(completion) == "Yes.<|im_end|>"  # the completion and its end of turn, nothing else
    assert tokenizer.decode([t for t, m in zip(ids, mask) if not m]) == "<|im_start|>user\nIs it?<|im_end|>\n<|im_start|>assistant\n"

    # A CauGym test file: the prompt is the official user message, Type becomes type.
    examples = data.load_examples(shared_dir / "data" / "caugym" / "insufficient.json", "rl")
    first = json.loads((shared_dir / "data" / "caugym" / "insufficient.json").read_text())[0]
    assert examples[0]["prompt"] == [{"role": "user", "content": first["problem"] + "\nLet's think step by step. If the "
                                      "condition is not enough to solve the question, output \"LACK_CONDITION\" as final answer."}]
    assert examples[0]["answer"] == first["answer"] and examples[0]["type"] == first["Type"]
    rl = data.load_examples(shared_dir / "data" / "caugym" / "train_online_rl.jsonl", "rl")
    assert len(rl) == 3500 and rl[0]["prompt"][0]["content"].endswith("Let's think step by step.")


def test_kto_pairs_and_dpo_collation(tiny_chat_model):
    tokenizer = Tokenizer.from_pretrained(tiny_chat_model)
    base = tiny_examples(3)
    # KTO data often holds both completions of a prompt next to each other: the KL pair must not reuse its prompt.
    kto = [{**base[0], "label": True}, {**base[0], "completion": "no", "label": False}, {**base[1], "label": True}]
    kto = [data.normalise({**e, "_where": f"x:{i}"}, "kto") for i, e in enumerate(kto)]
    rows = data.tokenize(kto, tokenizer, "kto", progress=False)
    prompt_0 = tokenizer.apply_chat_template(kto[0]["prompt"])
    assert rows[0]["kl_ids"] == prompt_0 + tokenizer.encode(base[1]["completion"]) + [tokenizer.eos_token_ids[0]]
    assert rows[1]["kl_ids"][:len(prompt_0)] == prompt_0 and rows[2]["kl_ids"][-2:] == rows[0]["ids"][-2:]

    dpo = [data.normalise({"prompt": e["prompt"], "chosen": e["completion"], "rejected": "no", "_where": "x"}, "dpo")
           for e in base]
    dpo_rows = data.tokenize(dpo, tokenizer, "dpo", progress=False)
    batch = data.collate_dpo(dpo_rows, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6  # chosen rows 0-2, then rejected rows 3-5
    lengths = [len(r["chosen_ids"]) for r in dpo_rows] + [len(r["rejected_ids"]) for r in dpo_rows]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["completion_mask"][3:].sum(1).tolist() == [len(tokenizer.encode("no")) + 1] * 3
    for row, r in zip(batch["input_ids"][:3], dpo_rows):
        assert row[:len(r["chosen_ids"])].tolist() == r["chosen_ids"]


def test_batches_cover_each_epoch_and_resume():
    order = data.Batches(10, 3, seed=7)
    epoch0 = [order.next() for _ in range(3)]
    assert len({i for b in epoch0 for i in b}) == 9  # no repeats within an epoch; one example dropped
    state = order.state_dict()
    following = [order.next() for _ in range(3)]
    assert order.epoch == 1
    resumed = data.Batches(10, 3, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(3)] == following
    assert data.Batches(10, 3, seed=8).next() != epoch0[0] or data.Batches(10, 3, seed=9).next() != epoch0[0]
