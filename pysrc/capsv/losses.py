"""Normalised Prototypical loss (eq. 2-3) plus softmax classification, equal weights."""
import torch
import torch.nn.functional as F
from torch import nn

from capsv.distributed import SINGLE

STATS = ("loss", "np_loss", "ce_loss", "np_acc", "ce_acc")


class NPSoftmaxLoss(nn.Module):
    def __init__(self, embed_dim, n_speakers, softmax_weight=1.0):
        super().__init__()
        self.classifier = nn.Linear(embed_dim, n_speakers)
        self.softmax_weight = softmax_weight

    def forward(self, net, frames, speakers, part=SINGLE):
        """frames [n, M, T, C] (utterance 0 of each speaker is the support), speakers [n] global ids.

        Returns (loss, stats dict). With CAP, every query/support pair is pooled jointly; the
        softmax term uses each utterance pooled against its own speaker's partner: a query
        against its support, a support against its speaker's first query (authors' code).

        Across ranks (`part`, capsv.distributed) frames hold this rank's block of the batch's
        speakers: its queries are scored against the supports of every rank, and the loss is the
        mean over its own queries and utterances, whose mean over ranks is the 1-process loss.
        The stats are those of the global batch.
        """
        n, m = frames.shape[:2]
        dev = frames.device
        support = frames[:, 0]                                    # [n, T, C]
        queries = frames[:, 1:].reshape(n * (m - 1), *frames.shape[2:])
        supports = part.gather(support)                           # [N, T, C], every rank's, in rank order
        first = part.rank * n                                     # batch index of this rank's first speaker
        e_sup, e_qry = net.embed_grid(supports, queries)          # [nq, N, E] each
        # logit = q . P / |P| = |q| cos(q, P)
        logits = (e_qry * F.normalize(e_sup, dim=-1)).sum(-1)     # [nq, N]
        local = torch.arange(n, device=dev)
        target = (first + local).repeat_interleave(m - 1)
        np_loss = F.cross_entropy(logits, target)

        q_idx = torch.arange(n * (m - 1), device=dev)
        own_q = e_qry[q_idx, target]                                # query with its support
        own_s = e_sup[local * (m - 1), first + local]               # support with its speaker's first query
        emb = torch.cat([own_s, own_q])
        labels = torch.cat([speakers, speakers.repeat_interleave(m - 1)])
        cls = self.classifier(emb)
        ce_loss = F.cross_entropy(cls, labels)
        loss = np_loss + self.softmax_weight * ce_loss
        with torch.no_grad():
            values = torch.stack([loss, np_loss, ce_loss, (logits.argmax(1) == target).float().mean(),
                                  (cls.argmax(1) == labels).float().mean()])
            stats = dict(zip(STATS, part.mean(values).tolist()))   # one transfer (and all-reduce) per step
        return loss, stats
