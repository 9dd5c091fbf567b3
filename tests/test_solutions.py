"""nanocausal.solutions: worked solutions are scored right and rejected ones wrong by the official
rule, in the DPO and KTO rows built from them."""
from nanocausal.caugym import VARIANTS, is_correct, official_prompt
from nanocausal.problems import dataset_rows, problems


def test_rejected_answers_are_wrong_and_chosen_right():
    items = problems(84, variant=list(VARIANTS), seed=4, split="dpo")
    rows = list(dataset_rows(items, "dpo", 0))
    for p, row in zip(items, rows):
        assert row["prompt"] == official_prompt(p.problem, p.variant)
        assert is_correct(row["chosen"], p.answer) and not is_correct(row["rejected"], p.answer)
    kto = list(dataset_rows(items, "kto", 0))
    assert sum(r["label"] for r in kto) == len(kto) // 2
    assert all(is_correct(r["completion"], p.answer) == r["label"] for p, r in zip(items, kto))
