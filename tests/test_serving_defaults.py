"""The server's defaults are the ones the demo model was evaluated at (MODEL_CARD.md)."""
from ldm import evaluate
from server.contract import Limits


def test_served_defaults_equal_the_evaluated_ones():
    limits = Limits(sizes=(32,))
    assert limits.default_guidance_scale == evaluate.DEFAULT_GUIDANCE
    assert limits.default_steps == evaluate.DEFAULT_STEPS
    assert limits.default_sampler == evaluate.DEFAULT_SAMPLER
