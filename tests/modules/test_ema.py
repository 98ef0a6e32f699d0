"""LitEma: buffer names, the warm-up decay schedule against closed forms, store/restore."""

import pytest
import torch
from torch import nn

from ldm.modules.ema import LitEma


def _model():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 2)))
    model[1][0].bias.requires_grad_(False)  # frozen: must get no shadow
    return model


def _set_all_(model, values):
    with torch.no_grad():
        for p, v in zip(model.parameters(), values, strict=True):
            p.copy_(v)


def test_buffer_names_and_dtypes():
    model = _model()
    ema = LitEma(model)
    sd = ema.state_dict()
    # CompVis names: the parameter name without dots; frozen parameters are skipped.
    assert list(sd) == ["decay", "num_updates", "0weight", "0bias", "10weight"]
    assert sd["decay"].dtype == torch.float32 and sd["decay"].item() == pytest.approx(0.9999)
    assert sd["num_updates"].dtype == torch.int32 and sd["num_updates"].item() == 0
    assert torch.equal(sd["10weight"], model[1][0].weight)
    assert LitEma(model, use_num_updates=False).num_updates.item() == -1
    assert list(ema.parameters()) == []


def test_rejects_decay_outside_unit_interval():
    with pytest.raises(ValueError):
        LitEma(_model(), decay=1.5)


def test_warmup_schedule_matches_closed_form():
    # decay 0.2 makes the min() switch: d_1 = 2/11 < 0.2, then d_n = 0.2 for n >= 2.
    model = _model()
    ema = LitEma(model, decay=0.2)
    theta0 = model[0].weight.detach().clone().double()
    targets = [torch.randn(4, 3, dtype=torch.float64) for _ in range(4)]
    decays = [2 / 11, 0.2, 0.2, 0.2]
    for target in targets:
        with torch.no_grad():
            model[0].weight.copy_(target)
        ema(model)
    # Unrolled: s_4 = prod(d) * s_0 + sum_k (1 - d_k) * prod_{j > k} d_j * theta_k.
    expected = theta0 * torch.tensor(decays, dtype=torch.float64).prod()
    for k, target in enumerate(targets):
        later = torch.tensor(decays[k + 1 :], dtype=torch.float64).prod()
        expected = expected + (1 - decays[k]) * later * target
    torch.testing.assert_close(ema.get_buffer("0weight").double(), expected, rtol=1e-6, atol=1e-6)
    assert ema.num_updates.item() == 4


def test_default_decay_follows_one_plus_n_over_ten_plus_n():
    model = _model()
    ema = LitEma(model)  # 0.9999 > (1 + n) / (10 + n) for these n
    s = model[0].bias.detach().clone().double()
    for n in range(1, 6):
        target = torch.randn(4, dtype=torch.float64)
        with torch.no_grad():
            model[0].bias.copy_(target)
        ema(model)
        d = (1 + n) / (10 + n)
        s = d * s + (1 - d) * target
    torch.testing.assert_close(ema.get_buffer("0bias").double(), s, rtol=1e-6, atol=1e-6)


def test_constant_decay_without_num_updates():
    model = _model()
    ema = LitEma(model, decay=0.5, use_num_updates=False)
    start = model[1][0].weight.detach().clone()
    with torch.no_grad():
        model[1][0].weight.fill_(1.0)
    for _ in range(3):
        ema(model)
    # s_3 = 0.5^3 s_0 + (1 - 0.5^3) * 1
    torch.testing.assert_close(ema.get_buffer("10weight"), 0.125 * start + 0.875)
    assert ema.num_updates.item() == -1


def test_frozen_parameters_are_untouched_and_update_needs_no_grad():
    model = _model()
    ema = LitEma(model)
    out = model(torch.randn(2, 3)).sum()
    ema(model)  # runs under no_grad: the graph of `out` is not extended
    assert out.requires_grad
    assert all(b.grad_fn is None for b in ema.buffers())


def test_store_copy_to_restore_round_trip():
    model = _model()
    ema = LitEma(model)
    original = [p.detach().clone() for p in model.parameters()]
    _set_all_(model, [torch.randn_like(p) for p in original])
    ema(model)
    trained = [p.detach().clone() for p in model.parameters()]

    ema.store(model.parameters())
    ema.copy_to(model)
    torch.testing.assert_close(model[0].weight, ema.get_buffer("0weight"))
    torch.testing.assert_close(model[1][0].weight, ema.get_buffer("10weight"))
    assert not torch.equal(model[0].weight, trained[0])
    assert torch.equal(model[1][0].bias, trained[3])  # frozen: copy_to leaves it alone

    ema.restore(model.parameters())
    for p, t in zip(model.parameters(), trained, strict=True):
        assert torch.equal(p, t)


def test_state_dict_round_trip_into_a_fresh_ema():
    model = _model()
    ema = LitEma(model)
    ema(model)
    other = LitEma(_model())
    other.load_state_dict(ema.state_dict(), strict=True)
    assert other.num_updates.item() == 1
    assert torch.equal(other.get_buffer("0weight"), ema.get_buffer("0weight"))
