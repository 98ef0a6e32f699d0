"""Each demo model is served at the settings it was evaluated at (MODEL_CARD.md)."""
from ldm import evaluate
from server.contract import Limits


def test_served_defaults_equal_the_evaluated_ones():
    limits = Limits(sizes=(32,))
    assert limits.default_guidance_scale == evaluate.DEFAULT_GUIDANCE
    assert limits.default_steps == evaluate.DEFAULT_STEPS
    assert limits.default_sampler == evaluate.DEFAULT_SAMPLER


def test_the_emoji_model_serves_at_the_settings_it_was_evaluated_at():
    import json
    from pathlib import Path

    import numpy as np

    from ldm.pipeline import Txt2ImgPipeline
    from ldm.pretrained import load_pretrained, read_sampling

    root = Path(__file__).resolve().parents[1]
    evaluated = json.loads((root / "docs/eval_emoji_ldm.json").read_text())
    own = read_sampling(root / "checkpoints/emoji/ldm")
    assert own == {k: evaluated[k] for k in ("steps", "guidance_scale", "sampler")}
    model = load_pretrained(root / "checkpoints/emoji/ldm")  # strict: every weight is there
    images = Txt2ImgPipeline(model)(["grinning face"], steps=2, seed=0)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
