"""Temporal pooling: TAP (eq. 4), SAP (eq. 5-7) and CAP (eq. 8-12).

Every pooling answers the same question for a *grid* of pairs: given a set A of
frame sequences [..., Na, Ta, C] and a set B [..., Nb, Tb, C], return the pooled
vectors of every A-member as paired with every B-member, and vice versa, both shaped
[..., Nb, Na, C] (rows follow B, columns follow A). TAP and SAP ignore the partner,
so their grids are broadcasts; CAP's depend on the pair.

CAP uses the identity of doc/design.md ("CAP, and why it is cheap here") so no Ta x Tb matrix is formed: with Â, B̂ the
L2-normalised projected frames, m = Â^T 1 and G = B̂^T B̂, the attention logit of A's
frame t against B is Â_t^T G_B m_A / Ta. `cap_pair_direct` keeps eq. 9-12 literally
and serves as the test oracle.
"""
import torch
import torch.nn.functional as F
from torch import nn


class TAP(nn.Module):
    def __init__(self, dim, **_):
        super().__init__()

    def single(self, x):
        return x.mean(dim=-2)

    def grid(self, a, b):
        return broadcast_grid(self.single(a), self.single(b))


class SAP(nn.Module):
    """Self-attentive pooling: w_t = softmax_t(mu^T tanh(W x_t + b))."""

    def __init__(self, dim, **_):
        super().__init__()
        self.attention = nn.Linear(dim, dim)
        self.context = nn.Parameter(torch.empty(dim, 1))
        nn.init.xavier_normal_(self.context)

    def single(self, x):
        h = torch.tanh(self.attention(x))
        w = torch.softmax(h @ self.context, dim=-2)       # [..., T, 1]
        return (w * x).sum(dim=-2)

    def grid(self, a, b):
        return broadcast_grid(self.single(a), self.single(b))

    def weights(self, x):
        """The attention weights w_t of x [..., T, C] -> [..., T] (each sums to 1), as `single` pools with them."""
        return torch.softmax((torch.tanh(self.attention(x)) @ self.context).squeeze(-1), dim=-1)


def broadcast_grid(ea, eb):
    """Pair-independent embeddings laid out as the [..., Nb, Na, C] grids of a CAP grid."""
    nb, na = eb.shape[-2], ea.shape[-2]
    ga = ea.unsqueeze(-3).expand(*ea.shape[:-2], nb, na, ea.shape[-1])
    gb = eb.unsqueeze(-2).expand(*eb.shape[:-2], nb, na, eb.shape[-1])
    return ga, gb


class CAP(nn.Module):
    """Cross attentive pooling with the meta-projection g = ReLU(W x + b) and temperature tau."""

    def __init__(self, dim, proj_dim=128, tau=0.05):
        super().__init__()
        self.proj = nn.Linear(dim, proj_dim)
        self.tau = tau

    def project(self, x):
        """L2-normalised projected frames Ŝ, their sum m and Gram matrix G (one per sequence)."""
        p = F.normalize(torch.relu(self.proj(x)), dim=-1)        # [..., N, T, D]
        return p, p.sum(dim=-2), p.transpose(-1, -2) @ p           # Ŝ, m [..., N, D], G [..., N, D, D]

    def grid(self, a, b):
        pa, ma, ga = self.project(a)
        pb, mb, gb = self.project(b)
        return self._side(a, pa, ma, gb), self._side(b, pb, mb, ga).transpose(-2, -3)

    def _side(self, x, p, m, g_other):
        """Pool each sequence of x against every sequence of the other set: [..., N_other, N, C].

        logits[o, n, t] = p[n, t] . (G_o m_n) / T_n ; e = (1/T) sum_t (1 + w_t) x_t.
        """
        t = x.shape[-2]
        v = torch.einsum("...ode,...ne->...ond", g_other, m)                     # G_o m_n, [..., No, N, D]
        logits = torch.einsum("...ntd,...ond->...ont", p, v) / (t * self.tau)
        w = torch.softmax(logits, dim=-1)                                          # [..., No, N, T]
        return x.mean(dim=-2).unsqueeze(-3) + torch.einsum("...ont,...ntc->...onc", w, x) / t


def cap_unit_frames(cap, x):
    """Ŝ: the L2-normalised meta-projected frames of x [..., T, C] -> [..., T, D]. Partner-independent, so
    scoring computes it once per crop (capsv.scoring)."""
    return F.normalize(torch.relu(cap.proj(x)), dim=-1)


def cap_cross_logits(sxt, mx, syt):
    """Attention logits of every crop of x against every crop of y, from partner-independent quantities.

    sxt [B, Kx, D, Tx]: unit frames of x, transposed; mx [B, Kx, D]: their sum divided by Tx * tau;
    syt [B, Ky, D, Ty]: unit frames of y, transposed. Returns [B * Kx, Ky, Tx]:
    logits[(b, i), j, t] = sx[b,i,t] . G_y[b,j] mx[b,i] with G_y = sy^T sy (doc/design.md, "CAP, and why it is cheap here"); softmax over t
    gives the weights of eq. 11. G_y m is taken as sy^T (sy m): 2 Ty D products per crop pair instead of
    D^2, but no D x D Gram matrix is stored per crop (64 KB at D = 128, more than sy itself) or gathered
    per trial, which measured no faster. The frames are kept transposed ([D, T] per crop): two of the
    three products then read them as stored, which measured a little faster (6 %) than [T, D].
    """
    b, kx, d, tx = sxt.shape
    ky, ty = syt.shape[1], syt.shape[3]
    m = mx.unsqueeze(1).expand(b, ky, kx, d).reshape(b * ky, kx, d)
    y = torch.bmm(m, syt.reshape(b * ky, d, ty))                            # sy m: [(B, j), i, s]
    v = torch.bmm(y, syt.reshape(b * ky, d, ty).transpose(1, 2))            # G_y m: [(B, j), i, D]
    v = v.view(b, ky, kx, d).transpose(1, 2).reshape(b * kx, ky, d)        # [(B, i), j, D]
    return torch.bmm(v, sxt.reshape(b * kx, d, tx))                          # [(B, i), j, t]


def cap_cross_weights(cap, x, y):
    """CAP's attention weights (eq. 11) of each sequence of x [Kx, Tx, C] against each of y [Ky, Ty, C]:
    [Kx, Ky, Tx], each summing to 1 over Tx. Computed as stage 3 does (cap_unit_frames, cap_cross_logits);
    y's weights against x are cap_cross_weights(cap, y, x)."""
    sx, sy = cap_unit_frames(cap, x), cap_unit_frames(cap, y)
    mx = sx.sum(-2) / (x.shape[-2] * cap.tau)
    logits = cap_cross_logits(sx.transpose(-1, -2)[None], mx[None], sy.transpose(-1, -2)[None])
    return torch.softmax(logits, dim=-1)


def cap_pair_direct(cap, s, q):
    """Eq. 9-12 for one pair, literally: s [Ts, C], q [Tq, C] -> (e_s, e_q). Test oracle only."""
    S = torch.relu(cap.proj(s))
    Q = torch.relu(cap.proj(q))
    R = F.normalize(S, dim=-1) @ F.normalize(Q, dim=-1).T              # R_ij = cos(S_i, Q_j), [Ts, Tq]
    mu_s = R.mean(dim=0)                                                 # [Tq]
    mu_q = R.mean(dim=1)                                                 # [Ts]
    w_s = torch.softmax(R @ mu_s / cap.tau, dim=0)                       # [Ts]
    w_q = torch.softmax(R.T @ mu_q / cap.tau, dim=0)                     # [Tq]
    e_s = ((1 + w_s)[:, None] * s).sum(0) / s.shape[0]
    e_q = ((1 + w_q)[:, None] * q).sum(0) / q.shape[0]
    return e_s, e_q


def cap_grid_direct(cap, a, b):
    """Eq. 9-12 batched over every (b, a) pair, forming the full [..., Nb, Na, Tb, Ta] cosine tensor.

    The cost the fast form avoids; used by the benchmarks (capsv.bin.bench).
    """
    pa = F.normalize(torch.relu(cap.proj(a)), dim=-1)                  # [..., Na, Ta, D]
    pb = F.normalize(torch.relu(cap.proj(b)), dim=-1)                  # [..., Nb, Tb, D]
    R = torch.einsum("...itd,...jsd->...jits", pa, pb)                 # [..., Nb, Na, Ta, Tb]
    mu_a = R.mean(dim=-2, keepdim=True)                                 # mean over a's frames: [.., 1, Tb]
    mu_b = R.mean(dim=-1, keepdim=True)                                 # mean over b's frames: [.., Ta, 1]
    w_a = torch.softmax((R * mu_a).sum(-1) / cap.tau, dim=-1)          # [..., Nb, Na, Ta]
    w_b = torch.softmax((R * mu_b).sum(-2) / cap.tau, dim=-1)          # [..., Nb, Na, Tb]
    ea = torch.einsum("...jit,...itc->...jic", 1 + w_a, a) / a.shape[-2]
    eb = torch.einsum("...jis,...jsc->...jic", 1 + w_b, b) / b.shape[-2]
    return ea, eb


POOLINGS = {"tap": TAP, "sap": SAP, "cap": CAP}
