"""share_group_scales: the one rule for fp8_static's fused layers (q/k/v, gate/up), used by export and scoring."""

import pytest
import torch

from fp8mix.errors import FP8MixError
from fp8mix.quant.scales import share_group_scales


def test_every_member_gets_the_largest_scale():
    scales = {"q": torch.tensor([0.5]), "k": torch.tensor([2.0]), "v": torch.tensor([1.0]), "o": torch.tensor([0.25])}
    shared = share_group_scales([("q", "k", "v"), ("o",)], scales)
    assert {m: float(s) for m, s in shared.items()} == {"q": 2.0, "k": 2.0, "v": 2.0, "o": 0.25}
    assert all(s.dtype == torch.float32 and s.shape == (1,) for s in shared.values())
    shared["q"].mul_(3)
    assert float(shared["k"]) == 2.0  # each member holds its own tensor


def test_a_member_without_a_scale_is_an_error():
    with pytest.raises(FP8MixError, match="fused group"):
        share_group_scales([("q", "k", "v")], {"q": torch.tensor([1.0]), "k": torch.tensor([1.0])})


def test_per_channel_scales_are_not_shared():
    with pytest.raises(FP8MixError, match="per-tensor"):
        share_group_scales([("gate", "up")], {"gate": torch.ones(4, 1), "up": torch.ones(4, 1)})
