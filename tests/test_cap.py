"""CAP: the fast identity (doc/design.md, "CAP, and why it is cheap here") against the literal eq. 9-12, values and gradients."""
import pytest
import torch

from capsv.models.pooling import CAP, SAP, TAP, cap_grid_direct, cap_pair_direct
from capsv.models.speaker_net import SpeakerNet


def make_cap(dim=12, proj=7, tau=0.05):
    torch.manual_seed(0)
    cap = CAP(dim, proj_dim=proj, tau=tau).double()
    return cap


def direct_grid(cap, a, b):
    """Loop of the oracle over every (b, a) pair -> two [Nb, Na, C] grids."""
    ea = torch.stack([torch.stack([cap_pair_direct(cap, a[i], b[j])[0] for i in range(len(a))]) for j in range(len(b))])
    eb = torch.stack([torch.stack([cap_pair_direct(cap, a[i], b[j])[1] for i in range(len(a))]) for j in range(len(b))])
    return ea, eb


@pytest.mark.parametrize("ta,tb", [(9, 23), (31, 5), (17, 17)])
def test_fast_cap_matches_direct_values_and_gradients(ta, tb):
    cap = make_cap()
    g = torch.Generator().manual_seed(ta * 100 + tb)
    a = torch.randn(4, ta, 12, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, tb, 12, dtype=torch.float64, generator=g, requires_grad=True)
    fa, fb = cap.grid(a, b)
    da, db = direct_grid(cap, a, b)
    assert fa.shape == da.shape == (3, 4, 12) and fb.shape == db.shape == (3, 4, 12)
    torch.testing.assert_close(fa, da, atol=1e-8, rtol=0)
    torch.testing.assert_close(fb, db, atol=1e-8, rtol=0)
    # gradients w.r.t. inputs and the meta-projection, through a random readout of both grids
    w1 = torch.randn_like(fa)
    w2 = torch.randn_like(fb)
    params = [a, b, cap.proj.weight, cap.proj.bias]
    gf = torch.autograd.grad((fa * w1).sum() + (fb * w2).sum(), params)
    gd = torch.autograd.grad((da * w1).sum() + (db * w2).sum(), params)
    for x, y in zip(gf, gd):
        torch.testing.assert_close(x, y, atol=1e-8, rtol=0)


def test_fast_cap_batched_leading_dims_match_per_trial():
    cap = make_cap()
    a = torch.randn(5, 3, 11, 12, dtype=torch.float64)
    b = torch.randn(5, 2, 8, 12, dtype=torch.float64)
    fa, fb = cap.grid(a, b)
    for i in range(5):
        da, db = direct_grid(cap, a[i], b[i])
        torch.testing.assert_close(fa[i], da, atol=1e-8, rtol=0)
        torch.testing.assert_close(fb[i], db, atol=1e-8, rtol=0)


def test_cap_attention_is_pair_dependent_and_tap_is_mean():
    cap = make_cap(tau=0.05)
    a = torch.randn(1, 10, 12, dtype=torch.float64)
    b = torch.randn(2, 10, 12, dtype=torch.float64)
    fa, _ = cap.grid(a, b)
    assert not torch.allclose(fa[0, 0], fa[1, 0])        # a pooled differently against each partner
    ta, tb = TAP(12).grid(a, b)
    torch.testing.assert_close(ta[1, 0], a[0].mean(0))
    torch.testing.assert_close(tb[1, 0], b[1].mean(0))


def test_sap_weights_sum_to_one():
    sap = SAP(6).double()
    x = torch.ones(2, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(sap.single(x), torch.ones(2, 6, dtype=torch.float64))


def test_parameter_count_near_paper():
    net = SpeakerNet(n_mels=40, channels=[16, 32, 64, 128], layers=[3, 4, 6, 3], pooling="cap",
                     embed_dim=512, cap_proj_dim=128, cap_tau=0.05)
    n = sum(p.numel() for p in net.parameters())
    assert 1.3e6 < n < 1.5e6, n
    out = net.frames(torch.randn(2, 200, 40))
    assert out.shape == (2, 50, 128)


def test_batched_direct_grid_matches_pairwise_oracle():
    """The benchmark's batched direct form is eq. 9-12 too."""
    cap = make_cap()
    a = torch.randn(3, 13, 12, dtype=torch.float64)
    b = torch.randn(2, 6, 12, dtype=torch.float64)
    for x, y in zip(cap_grid_direct(cap, a, b), direct_grid(cap, a, b)):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=0)
