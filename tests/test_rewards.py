"""nanocausal.caugym (the official CauGym rule) and nanocausal.rewards (the RL reward), on crafted responses."""
import pytest

from nanocausal.caugym import LACK, answer_spans, is_correct
from nanocausal.rewards import format_ok, reward

GOLD = '{"ANSWER": "Yes", "PROB": "0.1234"}'
PN_GOLD = '{"PROB": "0.2390"}'


@pytest.mark.parametrize("response, expected", [
    ('... so {"ANSWER": "Yes", "PROB": "0.1234"}', True),
    ('{"ANSWER": "No", "PROB": "0.1234"}', True),                       # Yes/No is not scored
    ('{"ANSWER": "Yes", "PROB": "0.1239"}', True),                      # within 0.0005
    ('{"ANSWER": "Yes", "PROB": "0.1229"}', True),
    ('{"ANSWER": "Yes", "PROB": "0.1240"}', False),                     # 0.0006 off
    ('{"ANSWER": "Yes", "PROB": "0.123"}', True),                       # numbers, not strings, compared
    ('{"PROB": 0.1234}', True),                                         # a JSON number parses too
    ('{ "ANSWER" : "Yes",\n "PROB" : " 0.12 34 " }', True),             # all whitespace removed first
    ('{"answer": "Yes", "prob": "0.1234"}', False),                     # spans must start with capital keys
    ('{"PROB": "0.9"} and later {"PROB": "0.1234"}', True),             # ANY parsed span counts
    ('{"PROB": "0.12.34"} {"PROB": "0.1234"}', True),                   # a bad span is skipped
    ('{"PROB": 0.12.34}', False),                                       # malformed JSON: skipped
    ('{"PROB": "abc"}', False),
    ('{"PROB": "0.1234"', False),                                       # no closing brace: no span
    ('The answer is 0.1234.', False),
    ('LACK_CONDITION', False),
])
def test_official_rule_on_crafted_responses(response, expected):
    assert is_correct(response, GOLD) is expected


def test_lower_case_inside_the_span():
    # the span is lower-cased before parsing, so an upper-case value key inside still reads
    assert answer_spans('{"PROB": "0.5", "ANSWER": "YES"}') == [{"prob": "0.5", "answer": "yes"}]
    assert is_correct('{"PROB": "0.2390"}', PN_GOLD) and is_correct('{"PROB": "0.239"}', PN_GOLD)


def test_lack_condition_is_a_substring_match():
    assert is_correct("so the answer is LACK_CONDITION", LACK)
    assert is_correct('{"PROB": "0.5"} LACK_CONDITION', LACK)
    assert not is_correct("lack_condition", LACK)
    assert not is_correct('{"PROB": "0.1234"}', LACK)
    assert not is_correct("LACK_CONDITION", GOLD)


def test_format_ok():
    assert format_ok('Step 1: ...\n{"ANSWER": "Yes", "PROB": "0.1234"}', GOLD) == 1.0
    assert format_ok('{"ANSWER": "Yes", "PROB": "0.1234"} and some chatter', GOLD) == 0.0
    assert format_ok('{"PROB": "0.1234"}', GOLD) == 0.0                 # missing the ANSWER key
    assert format_ok('{"ANSWER": "maybe", "PROB": "0.1234"}', GOLD) == 0.0
    assert format_ok('{"ANSWER": "Yes", "PROB": "x"}', GOLD) == 0.0
    assert format_ok("no answer at all", GOLD) == 0.0
    assert format_ok("Step 3: cannot compute.\nLACK_CONDITION", LACK) == 1.0
    assert format_ok('{"PROB": "0.2390"}', PN_GOLD) == 1.0


def test_reward_lenient_and_strict():
    right, wrong = '{"ANSWER": "Yes", "PROB": "0.1234"}', '{"ANSWER": "No", "PROB": "0.5000"}'
    assert reward("work\n" + right, GOLD) == pytest.approx(1.1)
    assert reward("work\n" + wrong, GOLD) == pytest.approx(0.1)
    assert reward("work", GOLD) == 0.0
    # several guesses: the official rule accepts any of them, strict only the last one
    spray = f"{right}\n{wrong}"
    assert reward(spray, GOLD) == pytest.approx(1.1)
    assert reward(spray, GOLD, strict=True) == pytest.approx(0.1)
    assert reward(f"{wrong}\n{right}", GOLD, strict=True) == pytest.approx(1.1)
    assert reward(right + " trailing text", GOLD, format_weight=0.5) == pytest.approx(1.0)
    # LACK_CONDITION answers
    assert reward("LACK_CONDITION", LACK) == pytest.approx(1.1)
    assert reward(f"LACK_CONDITION\n{right}", LACK) == pytest.approx(1.0)         # lenient: substring
    assert reward(f"LACK_CONDITION\n{right}", LACK, strict=True) == pytest.approx(0.0)
    assert reward(f"{right}\nLACK_CONDITION", GOLD, strict=True) == pytest.approx(0.0)


def test_named_rewards_weighted_and_logged_one_by_one():
    from nanocausal.rewards import REWARDS, lack_condition, parse_rewards
    from nanocausal.rollout import score
    assert lack_condition("so LACK_CONDITION", LACK) == 1.0 and lack_condition('{"PROB": "0.1"}', LACK) == 0.0
    assert lack_condition('{"PROB": "0.1"}', GOLD) == 1.0 and lack_condition("LACK_CONDITION", GOLD) == 0.0
    terms = parse_rewards("correct,format,length", "1,0.1,0.5")
    assert [(name, weight) for name, _, weight in terms] == [("correct", 1.0), ("format", 0.1), ("length", 0.5)]
    responses = ['x {"ANSWER": "Yes", "PROB": "0.1234"}', '{"ANSWER": "Yes", "PROB": "0.9"} more', "LACK_CONDITION"]

    class Decode:  # a stand-in tokenizer: the "ids" are the text
        decode = staticmethod(lambda ids, skip_special_tokens: ids)
    scores = score([{"answer": GOLD}] * 3, responses, Decode, reward_terms=terms)
    expected = [1 + 0.1 * 1 - 0.5 * len(responses[0]) / 1000, 0 + 0 - 0.5 * len(responses[1]) / 1000,
                0 + 0 - 0.5 * len(responses[2]) / 1000]
    assert scores["reward"].tolist() == pytest.approx(expected)
    assert scores["reward/correct"].tolist() == [1, 0, 0] and scores["reward/format"].tolist() == [1, 0, 0]
    # the default (no terms) is the official reward, and "correct,format" with weights 1, 0.1 equals it
    default = score([{"answer": GOLD}] * 3, responses, Decode)["reward"]
    same = score([{"answer": GOLD}] * 3, responses, Decode, reward_terms=parse_rewards("correct,format", "1,0.1"))
    assert default.tolist() == pytest.approx(same["reward"].tolist())
    assert set(REWARDS) >= {"correct", "format", "lack_condition", "length"}
    for names, weights in [("correct,nope", None), ("", None), ("correct,format", "1"), ("correct", "x")]:
        with pytest.raises(ValueError, match="--re"):
            parse_rewards(names, weights)
