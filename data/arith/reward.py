"""Exact-answer reward for data/arith's word problems, in the form score.py's `--reward_fn` takes:

    python score.py --reward_fn data/arith/reward.py:exact_answer --dataset runs/generate ...

`exact_answer(prompts, responses, answer, **columns)` returns 1.0 for each response whose answer is the right integer
and 0.0 otherwise. The answer read from a response is its LAST integer (a leading minus sign kept): "8", "8." and
"20 - 12 = 8" count as 8, and "20 minus 12 equals 12." as 12. The last rather than the first, because this small
model mostly restates the problem before it answers ("Tom has 14 + 7 = 21 apples."), and a rule that read the first
number would score every such answer 0 whatever its result; a response that goes on after its answer ("... = 21.
He gets 2 more") is read at its last number, and is wrong if that number is. A response with no integer gets 0.0.
`answer` is the dataset's column of that name (generate.py carries it along with `--keep_columns answer`); every
other column arrives in **columns and is ignored.
"""

import re

INTEGER = re.compile(r"-?\d+")


def last_integer(text):
    """The last integer written in text, or None."""
    found = INTEGER.findall(text)
    return int(found[-1]) if found else None


def exact_answer(prompts, responses, answer, **columns):
    """1.0 where the last integer of the response equals the answer, else 0.0 (one float per response)."""
    return [float(last_integer(r) == int(a)) for r, a in zip(responses, answer)]
