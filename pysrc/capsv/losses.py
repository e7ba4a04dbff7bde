"""Normalised Prototypical loss (eq. 2-3) plus softmax classification, equal weights."""
import torch
import torch.nn.functional as F
from torch import nn


class NPSoftmaxLoss(nn.Module):
    def __init__(self, embed_dim, n_speakers, softmax_weight=1.0):
        super().__init__()
        self.classifier = nn.Linear(embed_dim, n_speakers)
        self.softmax_weight = softmax_weight

    def forward(self, net, frames, speakers):
        """frames [N, M, T, C] (utterance 0 of each speaker is the support), speakers [N] global ids.

        Returns (loss, stats dict). With CAP, every query/support pair is pooled jointly; the
        softmax term uses each utterance pooled against its own speaker's partner: a query
        against its support, a support against its speaker's first query (authors' code).
        """
        n, m = frames.shape[:2]
        support = frames[:, 0]                                    # [N, T, C]
        queries = frames[:, 1:].reshape(n * (m - 1), *frames.shape[2:])
        e_sup, e_qry = net.embed_grid(support, queries)           # [Nq, N, E] each
        # logit = q . P / |P| = |q| cos(q, P)
        logits = (e_qry * F.normalize(e_sup, dim=-1)).sum(-1)     # [Nq, N]
        target = torch.arange(n, device=frames.device).repeat_interleave(m - 1)
        np_loss = F.cross_entropy(logits, target)

        q_idx = torch.arange(n * (m - 1), device=frames.device)
        own_q = e_qry[q_idx, target]                                # query with its support
        own_s = e_sup[torch.arange(n, device=frames.device) * (m - 1), torch.arange(n, device=frames.device)]
        emb = torch.cat([own_s, own_q])
        labels = torch.cat([speakers, speakers.repeat_interleave(m - 1)])
        cls = self.classifier(emb)
        ce_loss = F.cross_entropy(cls, labels)
        loss = np_loss + self.softmax_weight * ce_loss
        with torch.no_grad():
            stats = {
                "loss": loss.item(), "np_loss": np_loss.item(), "ce_loss": ce_loss.item(),
                "np_acc": (logits.argmax(1) == target).float().mean().item(),
                "ce_acc": (cls.argmax(1) == labels).float().mean().item(),
            }
        return loss, stats
