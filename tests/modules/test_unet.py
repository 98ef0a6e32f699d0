"""Tests for ldm.modules.unet: the whole model (shapes, conditioning, config checks, ONNX)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ldm.config import ConfigError
from ldm.modules.attention import attention_backend
from ldm.modules.unet import UNetModel
from tests.modules.unet_helpers import CFG_ATTN, CFG_ST, CFG_UPDOWN, perturb_

# --- whole model ---------------------------------------------------------------------------

def test_forward_shapes_and_zero_output_at_init():
    model = UNetModel(CFG_ST).eval()
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([10, 500]), torch.randn(2, 3, 16))
    assert out.shape == (2, 4, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # `out` conv is zero-initialised

    model = UNetModel(CFG_UPDOWN).eval()
    logits = model(torch.randn(2, 3, 8, 8), torch.tensor([1.5, 7.0]), y=torch.tensor([0, 2]))
    assert logits.shape == (2, 7, 8, 8)  # n_embed codebook logits


def test_output_depends_on_context_timestep_and_batch_independent():
    torch.manual_seed(0)
    model = UNetModel(CFG_ST).eval()
    perturb_(model, seed=5)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 16)
    with torch.no_grad():
        out = model(x, t, ctx)
        assert (out - model(x, t, torch.randn(2, 3, 16))).abs().max() > 1e-3
        assert (out - model(x, torch.tensor([11, 501]), ctx)).abs().max() > 1e-4
        # Each sample is processed on its own (GroupNorm, not BatchNorm).
        torch.testing.assert_close(model(x[1:], t[1:], ctx[1:]), out[1:], atol=1e-5, rtol=1e-5)
        with attention_backend("math"):
            torch.testing.assert_close(model(x, t, ctx), out, atol=1e-5, rtol=1e-5)


def test_class_labels_required_iff_num_classes():
    model = UNetModel(CFG_UPDOWN)
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="class-conditional"):
        UNetModel(CFG_ATTN)(torch.randn(1, 4, 8, 8), torch.tensor([1]), y=torch.tensor([0]))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(use_spatial_transformer=True), "context_dim"),
        (dict(context_dim=16), "use_spatial_transformer"),
        (dict(num_heads=-1, num_head_channels=-1), "num_head"),
    ],
)
def test_invalid_configs_are_rejected(changes, match):
    with pytest.raises(ConfigError, match=match):
        UNetModel(dataclasses.replace(CFG_ATTN, **changes))


def test_onnx_export_matches_pytorch(tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    model = UNetModel(CFG_ST).eval()
    perturb_(model, seed=6)
    args = (torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 3, 16))
    path = tmp_path / "unet.onnx"
    with attention_backend("math"), torch.no_grad():
        torch.onnx.export(
            model, args, str(path), dynamo=False, opset_version=17,
            input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["eps"],
            dynamic_axes={
                "sample": {0: "batch", 2: "height", 3: "width"},
                "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "tokens"},
            },
        )
    # Run at another batch size, resolution and token count than the traced one.
    x, t, ctx = torch.randn(2, 4, 12, 16), torch.tensor([5, 900]), torch.randn(2, 5, 16)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(
        None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()}
    )
    with torch.no_grad():
        expected = model(x, t, ctx)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)
