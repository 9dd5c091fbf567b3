"""Text <-> token ids, and chat conversations -> token ids, for Hugging Face checkpoints.

Two files do all the work:
- tokenizer.json: the whole fast-tokenizer pipeline (normaliser, pre-tokeniser, BPE merges, added
  tokens, decoder). The `tokenizers` library runs it; nothing here re-implements BPE.
- the chat template: a Jinja program, shipped with the model (chat_template.jinja, or the
  `chat_template` key of tokenizer_config.json), that turns a list of messages
  [{"role": "user", "content": "..."}, ...] into the one string the model was trained on. For Qwen
  and SmolLM2 that is ChatML:

      <|im_start|>system\nYou are ...<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n

  The last line is the "generation prompt": it opens the assistant's turn, so the model's next
  tokens are its reply. Each model has its own format, which is why we render the model's own
  template rather than hard-coding one, and why rendering must match transformers exactly (same
  sandbox, same filters, same variables): one different token is a prompt the model never saw.

Ending a reply. A chat model ends its turn by emitting an end-of-turn token (<|im_end|> for ChatML,
<|eot_id|> for Llama 3). A model can also stop on other tokens: Qwen2.5 Instruct's
generation_config.json lists both <|im_end|> and <|endoftext|>, Llama 3.1's three ids. So
`eos_token_ids` is a set, and a sampler stops a row at the first token in it.

Training on a reply. `encode_chat_completion` returns prompt + completion ids and a mask that is 1
on the completion only, its end-of-turn token included: the model must learn to say the answer
*and* to stop; a reply trained without its EOS never ends at sampling time.
"""
import functools
import json
import os
from datetime import datetime

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from nanocausal.checkpoint import TOKENIZER_FILES, base_of, is_adapter, resolve
from nanocausal.lora import ADAPTER_CONFIG

# Names under which a message's reasoning may be passed; templates read `reasoning_content`
# (Qwen3) or `thinking` (gpt-oss). transformers fills both from whichever is given.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _read_json(path):
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def _token_string(value):
    """A special token in a config is a plain string or a serialised AddedToken {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class _GenerationTag(Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used by training templates to mark the
    assistant's text for transformers' assistant mask) and renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain json.dumps (as transformers).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile_template(source):
    # Templates come from the hub, so they are untrusted code: the immutable sandbox forbids attribute
    # tricks and mutating the inputs. trim_blocks/lstrip_blocks drop the newline and indentation around
    # {% ... %} lines, exactly as transformers renders (templates are written for these settings).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A Hugging Face tokenizer folder: tokenizer.json + tokenizer_config.json (+ chat_template.jinja,
    generation_config.json, config.json when present)."""

    def __init__(self, folder):
        tokenizer_file = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(tokenizer_file):
            raise FileNotFoundError(f"{folder}: no tokenizer.json (nanocausal reads the fast-tokenizer file only)")
        self.folder = folder
        self._tokenizer = _HFTokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        legacy_map = _read_json(os.path.join(folder, "special_tokens_map.json"))

        # Special-token strings (bos_token, eos_token, ..., plus model-specific ones such as
        # image_token): the template sees them as variables, like transformers' special_tokens_map.
        self.special_tokens = {}
        for source in (legacy_map, config):  # tokenizer_config.json wins over the legacy file
            for name, value in source.items():
                if name.endswith("_token") and _token_string(value) is not None:
                    self.special_tokens[name] = _token_string(value)

        # The chat template: chat_template.jinja takes priority (newer transformers save it there).
        template_file = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(template_file):
            with open(template_file, encoding="utf-8") as f:
                self.chat_templates = {"default": f.read()}
        elif isinstance(config.get("chat_template"), list):  # named templates: [{"name", "template"}]
            self.chat_templates = {t["name"]: t["template"] for t in config["chat_template"]}
        elif config.get("chat_template"):
            self.chat_templates = {"default": config["chat_template"]}
        else:
            self.chat_templates = {}

        # Every id that ends a reply, the tokenizer's own eos first (see the module docstring).
        ids = [self.token_to_id(self.special_tokens["eos_token"])] if "eos_token" in self.special_tokens else []
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(os.path.join(folder, name)).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [eos]
        # A pad token only ever follows the end of a sequence, so emitting one ends the reply too.
        # This is what keeps <|endoftext|> a stop token for Qwen2.5 folders that ship no
        # generation_config.json (Qwen's own generation_config lists it as an eos).
        pad = self.special_tokens.get("pad_token")
        if pad is not None and pad in self._special_added_tokens():
            ids.append(self.token_to_id(pad))
        self.eos_token_ids = tuple(dict.fromkeys(i for i in ids if i is not None))
        if not self.eos_token_ids:
            raise ValueError(f"{folder}: no eos token in tokenizer_config.json, generation_config.json or config.json")
        # The id that fills the padded positions of a batch; never read as content (masks are built
        # by position, not by comparing ids with it).
        pad_id = self.token_to_id(pad) if pad is not None else None
        self.pad_token_id = pad_id if pad_id is not None else self.eos_token_ids[0]

    @classmethod
    def from_pretrained(cls, name_or_path):
        """A local folder, or a hub id such as "Qwen/Qwen2.5-0.5B-Instruct" (tokenizer files only,
        plus config.json for its eos ids)."""
        folder = resolve(name_or_path, TOKENIZER_FILES + ["config.json", ADAPTER_CONFIG])
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")) and is_adapter(folder):
            return cls.from_pretrained(base_of(folder))  # a bare LoRA adapter: its base's tokenizer
        return cls(folder)

    def _special_added_tokens(self):
        return {t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special}

    # ---- text <-> ids ----------------------------------------------------------------------------

    @property
    def vocab_size(self):
        """Number of ids, added tokens included (the model's embedding may be larger: padded rows)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return self._tokenizer.token_to_id(token)

    def encode(self, text):
        """Text -> ids. Special-token strings in the text ("<|im_end|>") become their ids; nothing is
        added around the text (no BOS): chat templates write their own, and a second one would be a
        prompt the model never saw. Same as transformers' encode(text, add_special_tokens=False)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------------

    def render_chat(self, messages, add_generation_prompt=True, **template_kwargs):
        """The conversation as the string the model reads, rendered by the model's own template.

        The template sees: messages, tools and documents (None unless given), add_generation_prompt,
        the special-token strings (bos_token, eos_token, ...), and any template_kwargs (such as
        Qwen3's enable_thinking=False), which override the special tokens on a clash."""
        if not self.chat_templates:
            raise ValueError(f"{self.folder}: no chat template (neither chat_template.jinja nor "
                             f"tokenizer_config.json's 'chat_template')")
        tools = template_kwargs.pop("tools", None)
        name = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
        if name not in self.chat_templates:
            raise ValueError(f"{self.folder}: no 'default' chat template among {sorted(self.chat_templates)}")
        template = _compile_template(self.chat_templates[name])
        return template.render(messages=[self._normalise(m) for m in messages], tools=tools,
                               documents=template_kwargs.pop("documents", None),
                               add_generation_prompt=add_generation_prompt,
                               **{**self.special_tokens, **template_kwargs})

    def apply_chat_template(self, messages, add_generation_prompt=True, **template_kwargs):
        """Ids of the rendered conversation; identical to transformers'
        apply_chat_template(messages, add_generation_prompt=..., tokenize=True)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **template_kwargs))

    def encode_chat_completion(self, prompt_messages, completion, **template_kwargs):
        """(prompt messages, completion text) -> (ids, completion_mask), the unit every trainer uses.

            ids             = apply_chat_template(prompt_messages, add_generation_prompt=True)
                              + encode(completion) + end_of_turn
            completion_mask = 0 on the prompt, 1 on encode(completion) + end_of_turn

        end_of_turn is what the template writes after an assistant message, up to and including its
        first eos id: <|im_end|> for ChatML, <|eot_id|> for Llama 3. We find it by rendering the
        conversation with the assistant message and reading what follows the message, so it is the
        template's own end of turn, not a guess (Llama 3.1's first generation_config eos,
        <|end_of_text|>, is not what ends its turns). Whatever the template writes after that eos
        (ChatML's "\\n") is dropped: sampling stops at the eos, so the model never produces it.
        Where the template is prefix-consistent (Qwen2.5, SmolLM2, Qwen3 with enable_thinking=False)
        the ids are therefore transformers' full-conversation ids up to that eos.

        The completion is encoded on its own, not together with the prompt's text, because that is
        how a sampled reply is built: token by token after the prompt ids. The completion is
        everything the model writes; for Qwen3 in thinking mode that includes its <think>...</think>.
        """
        prompt_ids = self.apply_chat_template(prompt_messages, add_generation_prompt=True, **template_kwargs)
        completion_ids = self.encode(completion) + self._end_of_turn_ids(prompt_messages, **template_kwargs)
        completion_mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
        return prompt_ids + completion_ids, completion_mask

    def _end_of_turn_ids(self, prompt_messages, **template_kwargs):
        marker = "<<nanocausal: end of the completion>>"
        conversation = list(prompt_messages) + [{"role": "assistant", "content": marker}]
        rendered = self.render_chat(conversation, add_generation_prompt=False, **template_kwargs)
        at = rendered.rfind(marker)
        after = self.encode(rendered[at + len(marker):]) if at >= 0 else []
        for n, token_id in enumerate(after):
            if token_id in self.eos_token_ids:
                return after[:n + 1]
        # The template writes no end-of-turn token: end with the tokenizer's eos, or nothing would.
        return [self.eos_token_ids[0]]

    @staticmethod
    def _normalise(message):
        # As transformers: keys set to None are dropped (many templates test `is defined`), and a
        # reasoning trace is visible under each name templates read.
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        return message
