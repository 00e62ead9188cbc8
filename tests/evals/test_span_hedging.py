"""The two reference policies of ``python -m evals.span.hedging`` (issue #23's analysis)."""

import numpy as np

from evals.span.hedging import fixed_share, follow_the_leader


def test_follow_the_leader_picks_the_model_that_was_better_on_earlier_tokens() -> None:
    lt = np.log([0.9, 0.9, 0.1, 0.1, 0.1, 0.9])
    lh = np.log([0.1, 0.1, 0.9, 0.9, 0.9, 0.1])
    # the transformer first; the hybrid once its moving average is ahead (decay 0: the last
    # token decides), never on the token itself
    assert follow_the_leader(lt, lh, 0.0).tolist() == [True, True, True, False, False, False]
    # a long memory: the early lead holds one token longer
    assert follow_the_leader(lt, lh, 0.99).tolist() == [True, True, True, True, False, False]


def test_fixed_share_is_the_even_mixture_without_learning_and_follows_the_better_model() -> None:
    rng = np.random.default_rng(0)
    lt, lh = np.log(rng.uniform(0.01, 1, 50)), np.log(rng.uniform(0.01, 1, 50))
    even = np.logaddexp(lt, lh) - np.log(2)
    # share 1: the weights return to 1/2 after every token, so it is the 50/50 mixture
    assert np.allclose(fixed_share(lt, lh, 1.0), even)
    # one model always better: fixed-share moves its weight there and beats the even mixture
    good, bad = np.full(40, np.log(0.8)), np.full(40, np.log(0.1))
    fs = fixed_share(good, bad, 0.05)
    assert fs.sum() > (np.logaddexp(good, bad) - np.log(2)).sum()
    assert fs[-1] > np.log(0.75)
