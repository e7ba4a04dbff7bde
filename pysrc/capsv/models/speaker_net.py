"""The speaker network: trunk -> pooling -> BN + ReLU -> bias-free fc (512-d embedding)."""
import torch
from torch import nn

from capsv.models.pooling import POOLINGS, broadcast_grid
from capsv.models.trunk import FastResNet34


class SpeakerNet(nn.Module):
    def __init__(self, n_mels, channels, layers, pooling, embed_dim, cap_proj_dim, cap_tau):
        super().__init__()
        self.trunk = FastResNet34(n_mels, channels, layers)
        dim = self.trunk.out_dim
        self.pair_dependent = pooling == "cap"
        self.pool = POOLINGS[pooling](dim, proj_dim=cap_proj_dim, tau=cap_tau)
        # The authors' CAP code puts BN + ReLU before a bias-free fc; TAP and SAP use the same
        # head so that the ablation differs only in the pooling.
        self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, embed_dim, bias=False))

    @classmethod
    def from_config(cls, cfg):
        return cls(**cfg["model"])

    @classmethod
    def from_checkpoint(cls, state, device="cpu"):
        """The trained network of a checkpoint's state (capsv.checkpoint), on `device`, in eval mode."""
        net = cls.from_config(state["config"]).to(device)
        net.load_state_dict(state["model"])
        return net.eval()

    def frames(self, feats):
        """[B, T, n_mels] -> frame-level trunk outputs [B, T/4, 128]."""
        return self.trunk(feats)

    def embed(self, x):
        """Pooled vectors [..., C] -> embeddings [..., E] through BN + ReLU + bias-free fc."""
        lead = x.shape[:-1]
        return self.head(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)

    def embed_grid(self, a, b):
        """Embeddings of every (b, a) pair: a [..., Na, Ta, C], b [..., Nb, Tb, C] -> two [..., Nb, Na, E].

        The first holds each a-member as pooled against each b-member, the second the reverse.
        """
        if self.pair_dependent:
            return self.embed_pairs(*self.pool.grid(a, b))
        return broadcast_grid(self.embed(self.pool.single(a)), self.embed(self.pool.single(b)))

    def embed_pairs(self, ga, gb):
        """Head over two pooled grids [..., Nb, Na, C] in one call, so BatchNorm sees all pair
        embeddings together."""
        out = self.embed(torch.cat([ga.reshape(-1, ga.shape[-1]), gb.reshape(-1, gb.shape[-1])]))
        n = ga.shape[:-1].numel()
        return out[:n].reshape(*ga.shape[:-1], -1), out[n:].reshape(*gb.shape[:-1], -1)

    def head_affine(self):
        """The eval-mode BN of the head as x -> scale * x + shift (scale, shift [C]); scoring pushes it
        through the pooling sum, which is linear in the frames."""
        bn = self.head[0]
        if bn.training or bn.running_var is None:
            raise ValueError("head_affine needs the head's BatchNorm in eval mode with running statistics")
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return scale, bn.bias - bn.running_mean * scale

    def head_factor(self):
        """R [min(E, C), C] with R^T R = W^T W for the head's fc W [E, C] (QR of W, in float64).

        (W r).(W r') = (R r).(R r') for all r, r', so cosines between embeddings are cosines between R r:
        scoring multiplies by a C x C matrix instead of E x C (4x fewer products at E = 512, C = 128).
        """
        w = self.head[2].weight
        return torch.linalg.qr(w.detach().double(), mode="r").R.to(w.dtype)
