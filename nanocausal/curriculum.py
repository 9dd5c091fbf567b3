"""A curriculum that tracks the learner (`--curriculum adaptive`): RL prompts drawn at the
difficulty the policy needs now, not filtered or reordered from a fixed dataset (verl's curriculum
samplers reorder a fixed dataset; DAPO's dynamic sampling drops the groups that carry no signal
after paying for their rollouts).

The generator (nanocausal/tiny.py) has a difficulty knob: the number of borrows k in the column
subtraction of an effect item (0 to 3; the careless teacher slips on borrows, so they are what is
hard). The knob b in [0, 3] is a real number; each problem draws k = floor(b) + Bernoulli(b -
floor(b)) and the generator is sampled until its subtraction has exactly k borrows. After every
step the knob follows the group pass rate p (the share of the step's rollouts the official rule
accepts) towards the target p* (0.5: where a GRPO group's reward variance, p (1 - p), is largest):

    b <- clip(b + RATE * (p - p*), 0, 3)

so it rises when the policy passes more often than the target and falls when it passes less. The
knob and the count of problems drawn are the stream's whole state: saved in every checkpoint (the
"data" entry, as any stream's position) and restored by --resume, so a resumed run draws exactly
the problems and knob values of an uninterrupted one. Each problem comes from its own random
stream, keyed by (seed, its index), so nothing else's random draws move it.
"""
import math
import random

from nanocausal import caugym, tiny

RATE = 2.0  # knob change per unit of pass-rate error: a step at p = 1 with p* = 0.5 adds one borrow
MAX_BORROWS = 3  # a 4-decimal subtraction with top >= bottom borrows into at most 3 columns


def borrows(item):
    """Borrows in the worked subtraction of an effect item (columns whose top digit was raised by 10)."""
    a, b = item["numbers"]
    columns, _ = tiny.subtraction_columns(a, b)
    return sum(int(column.split("-")[0]) >= 10 for column in columns)


def draw(seed, index, knob, variant="base"):
    """Problem `index` of the stream at knob value `knob` (an effect item with the drawn borrow count)."""
    rng = random.Random(f"adaptive {seed} {index}")
    want = math.floor(knob) + (rng.random() < knob - math.floor(knob))
    for _ in range(1000):  # exactly k borrows happens for >= 1 problem in 8: this never runs out in practice
        item = tiny.make_problem(rng, no_path_share=0.0, variant=variant)
        if borrows(item) == want:
            break
    return item


class AdaptiveStream:
    """The prompt stream of rl.train_rl under --curriculum adaptive (the interface of
    rollout.PromptStream: ready, next, state_dict, load_state_dict), plus observe(correct) after
    each step, which moves the knob and returns what to log."""

    def __init__(self, seed, tokenizer, target=0.5, variant="base", knob=1.0):
        self.seed, self.tokenizer, self.target, self.variant = seed, tokenizer, target, variant
        self.state = {"borrows": float(knob), "drawn": 0}

    def ready(self):
        """Check the variant now, before a run writes anything (problems are drawn when asked for)."""
        draw(self.seed, 0, self.state["borrows"], self.variant)

    def next(self, n):
        first, self.state["drawn"] = self.state["drawn"], self.state["drawn"] + n
        items = [draw(self.seed, i, self.state["borrows"], self.variant) for i in range(first, first + n)]
        return [{"prompt_ids": self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": caugym.official_prompt(it["problem"], it["variant"])}],
                    add_generation_prompt=True),
                 "answer": it["answer"], "type": it["type"], "variant": it["variant"]} for it in items]

    def observe(self, correct):
        """Move the knob by the step's pass rate; return {curriculum_borrows: the knob this step's
        problems were drawn at, curriculum_next: its new value, curriculum_pass_rate}."""
        used, passed = self.state["borrows"], float(correct.float().mean())
        self.state["borrows"] = min(MAX_BORROWS, max(0.0, used + RATE * (passed - self.target)))
        return {"curriculum_borrows": used, "curriculum_next": self.state["borrows"], "curriculum_pass_rate": passed}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)
