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
"""
import functools
import json
import os
import re
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import Tokenizer as _HFTokenizer

from nanocausal.checkpoint import TOKENIZER_FILES, adapter_base, is_adapter, resolve
from nanocausal.lora import ADAPTER_CONFIG
from nanocausal.safe_files import read_json, read_text

# Names under which a message's reasoning may be passed; templates read `reasoning_content`
# (Qwen3) or `thinking` (gpt-oss). transformers fills both from whichever is given.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _read_json(path):
    """A tokenizer config file's object ({} when the file is absent); errors are one line naming it."""
    return read_json(path) if os.path.exists(path) else {}


def _token_string(value):
    """A special token in a config is a plain string or a serialised AddedToken {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


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


# -----------------------------------------------------------------------------
# The chat template's sandbox: templates come from the hub, so they are untrusted programs.
#
# Jinja's immutable sandbox forbids attribute tricks and mutating the inputs, but not a template
# that runs forever ({% for i in range(99999) %}{% for j in range(99999) %}) or allocates 10 GB
# ({{ 'x' * 10**10 }}). So every render gets a budget, checked *before* the work is done:
#   - operations: each loop iteration, call and output piece costs 1; at most MAX_TEMPLATE_OPERATIONS
#     (a real template spends tens to thousands), which bounds the time;
#   - characters: every string or list the template builds (output, ~ and +, *, %, filter and method
#     results) is charged its length; at most MAX_TEMPLATE_CHARS in all, which bounds the memory.
#     Operations whose result can be far larger than their inputs (* and **, padding widths,
#     replace, join, indent) are refused from their arguments before they run.
# Over budget is a SecurityError, which render_chat reports in one line naming the template's
# file. Real templates never come near these limits.
MAX_TEMPLATE_OPERATIONS = 1_000_000
MAX_TEMPLATE_CHARS = 50_000_000
MAX_TEMPLATE_INT_ARGUMENT = 100_000  # widths and counts passed to filters and methods (range's own limit)
MAX_TEMPLATE_INT_BITS = 4096  # the result of **
_HUGE_FORMAT_WIDTH = re.compile(r"\d{6,}")  # in a format string: a width of a million or more


class _Budget(Extension):
    """The per-render budget (comment above), spent by the sandbox's hooks and by the calls that
    _BoundedSandbox._parse inserts; render_chat resets it."""

    def __init__(self, environment):
        super().__init__(environment)
        self.reset()

    def reset(self):
        self.operations, self.chars = 0, 0

    def spend(self, operations=1):
        self.operations += operations
        if self.operations > MAX_TEMPLATE_OPERATIONS:
            raise SecurityError(f"the template ran more than {MAX_TEMPLATE_OPERATIONS:,} operations")

    def charge(self, size):
        self.chars += size
        if self.chars > MAX_TEMPLATE_CHARS:
            raise SecurityError(f"the template built more than {MAX_TEMPLATE_CHARS:,} characters")

    def charge_value(self, value):
        if isinstance(value, (str, list, tuple, dict)):
            self.charge(len(value))
        return value

    def iterate(self, iterable):  # wraps every {% for %}'s iterable
        for item in iterable:
            self.spend()
            yield item

    def emit(self, value):  # wraps every piece of output, {% set %} blocks included
        self.spend()
        self.charge(len(str(value)))
        return value

    def text(self, value):  # wraps every operand of ~
        value = str(value)
        self.charge(len(value))
        return value

    def check_arguments(self, name, owner, args, kwargs):
        """Refuse, before it runs, a filter or method call whose result would be too large."""
        values = list(args) + list(kwargs.values())
        if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_TEMPLATE_INT_ARGUMENT for v in values):
            raise SecurityError(f"{name}: an integer argument over {MAX_TEMPLATE_INT_ARGUMENT:,}")
        texts = [v for v in [owner] + values if isinstance(v, str)]
        if name in ("format", "format_map", "do_format") and any(_HUGE_FORMAT_WIDTH.search(t) for t in texts[:1]):
            raise SecurityError(f"{name}: a format width of a million or more")
        estimate = 0
        if name in ("replace", "do_replace") and len(texts) >= 3:  # the text, old, new
            estimate = texts[0].count(texts[1]) * len(texts[2]) if texts[1] else len(texts[0]) * len(texts[2])
        elif name in ("join", "do_join"):
            sep = owner if isinstance(owner, str) else next((v for v in values[2:] if isinstance(v, str)), "")
            items = next((v for v in values if hasattr(v, "__len__") and not isinstance(v, str)), ())
            estimate = len(sep) * len(items)
        elif name == "do_indent" and args and isinstance(args[0], str):
            width = args[1] if len(args) > 1 else kwargs.get("width", 4)
            pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            estimate = pad * (args[0].count("\n") + 1)
        self.charge(estimate)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    @property
    def budget(self):
        return self.extensions[_Budget.identifier]

    def _parse(self, source, name, filename):
        """Jinja's syntax tree, with the budget's calls around every loop's iterable, every piece of
        output and every operand of ~ (the three things the sandbox's own hooks do not see)."""
        tree = super()._parse(source, name, filename)
        budget = self.budget
        for node in list(tree.find_all(nodes.For)):
            node.iter = budget.call_method("iterate", [node.iter], lineno=node.lineno)
        for node in list(tree.find_all(nodes.Output)):
            node.nodes = [budget.call_method("emit", [child], lineno=node.lineno) for child in node.nodes]
        for node in list(tree.find_all(nodes.Concat)):
            node.nodes = [budget.call_method("text", [child], lineno=node.lineno) for child in node.nodes]
        tree.set_environment(self)
        return tree

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: B902 (jinja's signature)
        __self.budget.spend()
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        if getattr(target, "__self__", None) is __self.budget:  # the budget's own calls (_parse)
            return __obj(*args)  # (without the _loop_vars / _block_vars jinja passes to every call)
        __self.budget.check_arguments(getattr(target, "__name__", ""), getattr(target, "__self__", None), args, kwargs)
        return __self.budget.charge_value(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        budget = self.budget
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                    budget.charge(len(sequence) * max(count, 0))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > MAX_TEMPLATE_INT_BITS:
                raise SecurityError(f"{left} ** {right}: a number of more than {MAX_TEMPLATE_INT_BITS} bits")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            budget.charge(len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            budget.check_arguments("format", left, right if isinstance(right, tuple) else (right,), {})
        return budget.charge_value(super().call_binop(context, operator, left, right))


def _bounded_filter(budget, function):
    """A filter that checks its arguments and pays for its result (filters bypass sandbox.call)."""
    @functools.wraps(function)  # keeps jinja's pass_context / pass_eval_context marks
    def bounded(*args, **kwargs):
        budget.spend()
        budget.check_arguments(getattr(function, "__name__", ""), None, args, kwargs)
        return budget.charge_value(function(*args, **kwargs))
    return bounded


@functools.lru_cache(maxsize=16)
def _compile_template(source):
    """The template's compiled program, or a jinja2 TemplateSyntaxError / SecurityError.
    trim_blocks/lstrip_blocks drop the newline and indentation around {% ... %} lines, exactly as
    transformers renders (templates are written for these settings)."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=[_GenerationTag, jinja2.ext.loopcontrols, _Budget])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(env.budget, f) for name, f in env.filters.items()}
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
        try:
            self._tokenizer = _HFTokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust library raises a bare Exception for any bad file
            raise ValueError(f"{tokenizer_file}: not a valid tokenizer.json ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        legacy_map = _read_json(os.path.join(folder, "special_tokens_map.json"))

        # Special-token strings (bos_token, eos_token, ..., plus model-specific ones such as
        # image_token): the template sees them as variables, like transformers' special_tokens_map.
        # tokenizer_config.json wins over the legacy file.
        self.special_tokens = {name: _token_string(value) for source in (legacy_map, config)
                               for name, value in source.items()
                               if name.endswith("_token") and _token_string(value) is not None}

        # The chat template: chat_template.jinja takes priority (newer transformers save it there).
        template_file = os.path.join(folder, "chat_template.jinja")
        config_file = os.path.join(folder, "tokenizer_config.json")
        self.template_file = template_file if os.path.exists(template_file) else config_file  # for error messages
        named = config.get("chat_template")
        if os.path.exists(template_file):
            self.chat_templates = {"default": read_text(template_file)}
        elif isinstance(named, list):  # named templates: [{"name", "template"}]
            if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                       for t in named):
                raise ValueError(f"{config_file}: 'chat_template' must be a string or a list of "
                                 f"{{\"name\", \"template\"}} objects")
            self.chat_templates = {t["name"]: t["template"] for t in named}
        elif named and not isinstance(named, str):
            raise ValueError(f"{config_file}: 'chat_template' must be a string, got {type(named).__name__}")
        else:
            self.chat_templates = {"default": named} if named else {}
        for name in self.chat_templates:  # a template that does not compile is refused at load
            self._template(name)

        # Every id that ends a reply, the tokenizer's own eos first (see the module docstring).
        ids = [self.token_to_id(self.special_tokens["eos_token"])] if "eos_token" in self.special_tokens else []
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(os.path.join(folder, name)).get("eos_token_id")
            eos = eos if isinstance(eos, list) else [eos]
            if any(i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size)
                   for i in eos):
                raise ValueError(f"{os.path.join(folder, name)}: 'eos_token_id' must be token ids (integers below "
                                 f"{self.vocab_size}), got {eos}")
            ids += eos
        # A pad token only ever follows the end of a sequence, so emitting one ends the reply too.
        # This is what keeps <|endoftext|> a stop token for Qwen2.5 folders that ship no
        # generation_config.json (Qwen's own generation_config lists it as an eos).
        pad = self.special_tokens.get("pad_token")
        special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special}
        if pad is not None and pad in special:
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
            folder = adapter_base(folder)  # a bare LoRA adapter: its base's tokenizer (a cycle: one line)
        return cls(folder)

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
        template, where = self._template(name)
        template.environment.budget.reset()
        try:
            return template.render(messages=[self._normalise(m) for m in messages], tools=tools,
                                   documents=template_kwargs.pop("documents", None),
                                   add_generation_prompt=add_generation_prompt,
                                   **{**self.special_tokens, **template_kwargs})
        except jinja2.TemplateError as e:  # raise_exception(...), a sandbox refusal, an over-budget render
            raise ValueError(f"{where}: the chat template refused this conversation: {e}") from None
        except Exception as e:  # the template's own bug on this input (e.g. a content that is no string)
            raise ValueError(f"{where}: the chat template failed on this conversation ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None

    def _template(self, name):
        """The compiled chat template `name` and the file it came from (for error messages)."""
        where = f"{self.template_file}" + ("" if name == "default" else f" (chat template {name!r})")
        try:
            return _compile_template(self.chat_templates[name]), where
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{where}: chat template line {e.lineno}: {e.message}") from None
        except (jinja2.TemplateError, RecursionError, MemoryError) as e:
            raise ValueError(f"{where}: the chat template cannot be compiled ({type(e).__name__}: {e})") from None

    def apply_chat_template(self, messages, add_generation_prompt=True, **template_kwargs):
        """Ids of the rendered conversation; identical to transformers'
        apply_chat_template(messages, add_generation_prompt=..., tokenize=True)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **template_kwargs))

    def encode_chat_completion(self, prompt_messages, completion, **template_kwargs):
        """(prompt messages, completion text) -> (ids, completion_mask), the unit every trainer uses.

            ids             = apply_chat_template(prompt_messages, add_generation_prompt=True)
                              + encode(completion) + end_of_turn
            completion_mask = 0 on the prompt, 1 on encode(completion) + end_of_turn

        The mask covers end_of_turn because the model must learn to say the answer *and* to stop: a
        reply trained without its EOS never ends at sampling time. end_of_turn is what the template
        writes after an assistant message, up to and including its first eos id: <|im_end|> for ChatML,
        <|eot_id|> for Llama 3. We find it by rendering the conversation with the assistant message and
        reading what follows the message, so it is the template's own end of turn, not a guess (Llama
        3.1's first generation_config eos, <|end_of_text|>, is not what ends its turns). Whatever the
        template writes after that eos (ChatML's "\\n") is dropped: sampling stops at the eos, so the
        model never produces it. Where the template is prefix-consistent (Qwen2.5, SmolLM2, Qwen3 with
        enable_thinking=False) the ids are therefore transformers' full-conversation ids up to that eos.

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
