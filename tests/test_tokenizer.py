"""nanocausal.tokenizer against transformers' AutoTokenizer on real tokenizers: Qwen2.5 and Qwen3
from ../shared/tokenizers, and SmolLM2-135M-Instruct built by ../shared/tools/make_smollm2.py."""
import json
import os

import pytest

from nanocausal.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

IM_END, ENDOFTEXT = "<|im_end|>", "<|endoftext|>"

CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "Is the effect of X on Y positive?"}],
    "system": [{"role": "system", "content": "Answer as JSON."},
               {"role": "user", "content": "Compute the ATE.\nP(Y=1|do(X=1)) = 0.7"}],
    "multi_turn": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "What is 2+2?"}],
    "multi_turn_system": [{"role": "system", "content": "Be terse."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "Name a prime."},
                          {"role": "assistant", "content": "7"}],
    "thinking_history": [{"role": "user", "content": "Why?"},
                         {"role": "assistant", "content": "<think>\nLet me see.\n</think>\n\nBecause."},
                         {"role": "user", "content": "Sure?"}],
}

TEXTS = ["0 7 42 3.14159 -0.5 1e-9 100000000 0.1234",
         '{"ANSWER": "Yes", "PROB": "0.1234"}',
         '{\n  "ANSWER": "LACK_CONDITION",\n  "PROB": null\n}',
         "line one\nline two\n\n\nindented\n\ttab\r\nwindows  \n",
         "Café, naïve, Größe, 因果推理, 🤖🎲, x² ≤ ∑ αᵢ, «quotes» — dash",
         f"special tokens inside text: {IM_END}{ENDOFTEXT} stay special",
         "  leading and trailing spaces  "]


def load_pair(path):
    return Tokenizer.from_pretrained(str(path)), transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def qwen25(shared_dir):
    return load_pair(shared_dir / "tokenizers" / "qwen2.5")


@pytest.fixture(scope="module")
def qwen3(shared_dir):
    return load_pair(shared_dir / "tokenizers" / "qwen3")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_pair(smollm2_path)


# name -> (fixture, template kwargs)
CASES = {"qwen2.5": ("qwen25", {}), "smollm2": ("smollm2", {}), "qwen3": ("qwen3", {}),
         "qwen3-thinking-on": ("qwen3", {"enable_thinking": True}),
         "qwen3-thinking-off": ("qwen3", {"enable_thinking": False})}


def hf_chat_ids(hf, messages, add_generation_prompt, **kwargs):
    return hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                  return_dict=False, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_chat_template_ids_match_transformers(case, request):
    fixture, kwargs = CASES[case]
    ours, hf = request.getfixturevalue(fixture)
    for name, messages in CONVERSATIONS.items():
        for add_generation_prompt in (True, False):
            expected = hf_chat_ids(hf, messages, add_generation_prompt, **kwargs)
            got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
            assert got == expected, (name, add_generation_prompt, ours.decode(got), hf.decode(expected))
            text = ours.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
            assert ours.encode(text) == expected


def test_tools_reasoning_and_none_fields_match_transformers(qwen25, qwen3):
    # tojson must be plain json.dumps (jinja's own would escape <, >, & and '), non-ASCII kept.
    tool = {"type": "function", "function": {
        "name": "do_intervention", "description": "Set X := x & read P(Y<1) — it's 'exact', café",
        "parameters": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}}}
    messages = [{"role": "user", "content": "Intervene.", "tool_calls": None}]
    for ours, hf in (qwen25, qwen3):
        assert ours.apply_chat_template(messages, tools=[tool]) == hf_chat_ids(hf, messages, True, tools=[tool])
    # A reasoning trace passed as a field (and a None field) renders as transformers renders it.
    ours, hf = qwen3
    messages = [{"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "Because.", "reasoning_content": "Think first.", "tool_calls": None}]
    got = ours.apply_chat_template(messages, add_generation_prompt=False)
    assert got == hf_chat_ids(hf, messages, False)
    assert "Think first." in ours.decode(got)


# A template that leans on every rendering rule transformers applies: trim_blocks and lstrip_blocks
# (block tags on their own indented lines), special-token variables, tojson's options, loop controls,
# namespace, {% generation %}, strftime_now, and `is defined` on a key given as None.
FEATURE_TEMPLATE = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message.role) }}
    {% endif %}
    {% if message.role == 'system' and not loop.first %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message.role }}{% if message.name is defined %} ({{ message.name }}){% endif %}

    {% if message.role == 'assistant' %}
{% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}

    {% else %}
{{ message.content }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2, sort_keys=True) }}{% endif %}
{{ '%d turns, %s, pad=%s' % (ns.turns, strftime_now('%Y'), pad_token) }}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def test_template_rendering_rules_match_transformers(tmp_path, shared_dir):
    folder = make_folder(tmp_path, shared_dir / "tokenizers" / "qwen2.5", {"chat_template": FEATURE_TEMPLATE})
    ours, hf = load_pair(folder)
    tools = [{"name": "f", "description": "a < b & 'c' — é", "z": 1, "a": [1, 2]}]
    messages = CONVERSATIONS["multi_turn_system"] + [{"role": "user", "content": "Again", "name": None},
                                                     {"role": "system", "content": "skipped"}]
    for add_generation_prompt in (True, False):
        for extra in ({}, {"tools": tools}):
            expected = hf_chat_ids(hf, messages, add_generation_prompt, **extra)
            assert ours.apply_chat_template(messages, add_generation_prompt, **extra) == expected
    with pytest.raises(Exception, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("fixture", ["qwen25", "qwen3", "smollm2"])
def test_encode_decode_round_trip_matches_transformers(fixture, request):
    ours, hf = request.getfixturevalue(fixture)
    assert ours.vocab_size == len(hf)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode(IM_END) == [hf.convert_tokens_to_ids(IM_END)]


def test_eos_and_pad_ids(qwen25, smollm2):
    ours, hf = qwen25
    im_end, endoftext = hf.convert_tokens_to_ids(IM_END), hf.convert_tokens_to_ids(ENDOFTEXT)
    assert ours.eos_token_ids == (im_end, endoftext)  # the tokenizer's eos first, then the pad token
    assert ours.pad_token_id == hf.pad_token_id == endoftext
    ours, hf = smollm2
    assert ours.eos_token_ids == (hf.eos_token_id,) == (hf.convert_tokens_to_ids(IM_END),)
    assert ours.pad_token_id == hf.pad_token_id


def make_folder(tmp_path, source, tokenizer_config_edits=None, generation_config=None):
    """A tokenizer folder that shares `source`'s tokenizer.json, with an edited config."""
    folder = tmp_path / "tok"
    folder.mkdir()
    os.symlink(source / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    for key, value in (tokenizer_config_edits or {}).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


def test_eos_ids_from_generation_config_and_pad_fallback(tmp_path, shared_dir, qwen25):
    hf = qwen25[1]
    im_end, endoftext = hf.convert_tokens_to_ids(IM_END), hf.convert_tokens_to_ids(ENDOFTEXT)
    # Qwen2.5 Instruct's published generation_config.json (eos as a list), with no pad token
    # in the tokenizer config: the pad id falls back to the first eos.
    folder = make_folder(tmp_path, shared_dir / "tokenizers" / "qwen2.5", {"pad_token": None},
                         {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext]})
    tok = Tokenizer.from_pretrained(str(folder))
    assert tok.eos_token_ids == (im_end, endoftext)
    assert tok.pad_token_id == im_end


@pytest.mark.parametrize("case", ["qwen2.5", "smollm2", "qwen3-thinking-off"])
def test_encode_chat_completion_mask_and_ids(case, request):
    fixture, kwargs = CASES[case]
    ours, hf = request.getfixturevalue(fixture)
    completion = '{"ANSWER": "Yes", "PROB": "0.1234"}'
    for name in ("single_turn", "system", "multi_turn"):
        prompt = CONVERSATIONS[name]
        ids, completion_mask = ours.encode_chat_completion(prompt, completion, **kwargs)
        prompt_ids = hf_chat_ids(hf, prompt, True, **kwargs)
        n_completion = len(hf.encode(completion, add_special_tokens=False)) + 1  # + <|im_end|>
        assert completion_mask == [0] * len(prompt_ids) + [1] * n_completion
        assert ids[:len(prompt_ids)] == prompt_ids
        assert ids[-1] == hf.convert_tokens_to_ids(IM_END)
        assert ours.decode([i for i, m in zip(ids, completion_mask) if m]) == completion + IM_END
        # These templates are prefix-consistent: the ids are transformers' full conversation up to
        # the end-of-turn token, which is followed only by the template's newline.
        full = hf_chat_ids(hf, prompt + [{"role": "assistant", "content": completion}], False, **kwargs)
        assert full[:len(ids)] == ids
        assert hf.decode(full[len(ids):]) == "\n"


def test_completion_ends_with_the_templates_end_of_turn_not_the_first_eos(tmp_path, shared_dir, qwen25):
    # Llama 3.1 lists <|end_of_text|> before <|eot_id|>; its turns end with the latter. Same shape
    # here: <|endoftext|> is the first generation_config eos, yet ChatML turns end with <|im_end|>.
    hf = qwen25[1]
    im_end, endoftext = hf.convert_tokens_to_ids(IM_END), hf.convert_tokens_to_ids(ENDOFTEXT)
    folder = make_folder(tmp_path, shared_dir / "tokenizers" / "qwen2.5", {"eos_token": ENDOFTEXT},
                         {"eos_token_id": [endoftext, im_end]})
    tok = Tokenizer.from_pretrained(str(folder))
    assert tok.eos_token_ids[0] == endoftext
    ids, completion_mask = tok.encode_chat_completion(CONVERSATIONS["single_turn"], "Yes")
    assert ids[-1] == im_end and completion_mask[-1] == 1
    assert tok.decode(ids[completion_mask.index(1):]) == "Yes" + IM_END


def test_hub_id_downloads_tokenizer_files_only(tmp_path, shared_dir, monkeypatch):
    import huggingface_hub
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(shared_dir / "tokenizers" / "qwen2.5")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    tok = Tokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    assert tok.encode("Hi") and len(calls) == 1 and calls[0][0] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "tokenizer.json" in calls[0][1]
    assert not [p for p in calls[0][1] if "safetensors" in p or p.endswith((".bin", ".pt"))]


def test_bad_folders_give_one_clear_line(tmp_path, shared_dir):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="neither a checkpoint folder nor a hub id"):
        Tokenizer.from_pretrained(str(tmp_path / "missing"))
    folder = make_folder(tmp_path, shared_dir / "tokenizers" / "qwen2.5", {"chat_template": None})
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained(str(folder)).apply_chat_template(CONVERSATIONS["single_turn"])
    (folder / "chat_template.jinja").write_bytes(b"{{ 'caf\xe9' }}")
    with pytest.raises(ValueError, match=r"chat_template\.jinja: not UTF-8 text \(byte 0xe9 at offset 7\)"):
        Tokenizer.from_pretrained(str(folder))


HOSTILE_TEMPLATES = {  # template -> what the one-line refusal says
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}": "operations",
    "{% set s = 'x' * 99999 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}": "operations",
    "{{ 'x' * 10**10 }}": "characters",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}": "characters",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}": "characters",
    "{% set x %}{% for i in range(99999) %}{% for j in range(99) %}yyyyyyyyyyyyyyyyyy{% endfor %}{% endfor %}"
    "{% endset %}": "operations",
    "{{ 'x'.ljust(10**10) }}": "integer argument", "{{ 'x'|center(10**9) }}": "integer argument",
    "{{ '{:>9999999999}'.format('x') }}": "format width", "{{ '%9999999999s' % 'x' }}": "format width",
    "{% set a = 'a' * 99999 %}{{ a.replace('a', 'b' * 99999) }}": "characters",
    "{% set a = '\n' * 99999 %}{{ a|indent(99999) }}": "characters",
    "{{ 2 ** 100000 }}": "bits",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}": "RecursionError",
    "{{ ''.__class__.__mro__ }}": "unsafe",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_templates_are_refused_in_one_line_naming_the_file(tmp_path, shared_dir, template):
    folder = make_folder(tmp_path, shared_dir / "tokenizers" / "qwen2.5", {})
    (folder / "chat_template.jinja").write_text(template)
    with pytest.raises(ValueError) as refused:
        Tokenizer.from_pretrained(str(folder)).render_chat(CONVERSATIONS["single_turn"])
    message = str(refused.value)
    assert message.startswith(f"{folder / 'chat_template.jinja'}: ") and HOSTILE_TEMPLATES[template] in message
    assert "\n" not in message


def test_template_syntax_errors_name_the_file_and_line_at_load(tmp_path, shared_dir):
    folder = make_folder(tmp_path, shared_dir / "tokenizers" / "qwen2.5", {"chat_template": "{{ x }}\n{% for %}"})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat template line 2: "):
        Tokenizer.from_pretrained(str(folder))


def test_a_budget_is_per_render_not_per_template(qwen25):
    # Many renders of a real template never add up to a refusal: each render starts from zero.
    ours, theirs = qwen25
    conversation = CONVERSATIONS["multi_turn_system"] * 20
    for _ in range(50):
        assert ours.render_chat(conversation) == theirs.apply_chat_template(conversation, tokenize=False,
                                                                            add_generation_prompt=True)
