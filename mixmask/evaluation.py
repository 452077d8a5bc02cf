"""Evaluation: the kNN monitor and the linear probe on frozen features, and a classifier's top-1.

kNN (Wu et al. 2018, as in the MoCo/InstDisc monitors): features f are L2-normalised; for a query,
the k most cosine-similar bank features vote for their labels with weight exp(s / T); top-1 of the
summed votes. Linear probe (MoCo v2 protocol, docs/methods.md §6): a linear classifier on the frozen pooled
backbone features, SGD with momentum 0.9, step decay x0.1 at the milestones, cross-entropy.

Loaders are iterables of (x, labels, index); with several processes each rank sees a shard padded to
equal length, ``gather`` concatenates tensors across ranks, and repeated indices are dropped. A training
loader of Batch becomes one with ``FirstView`` (the augmented linear probe).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class FirstView:
    """A loader of Batch (one-view mode) as an iterable of (x1, labels, index); set_epoch starts an epoch."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch, 0)

    def __iter__(self):
        for b in self.loader:
            yield b.x1, b.labels, b.index


@torch.no_grad()
def extract_features(
    features: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    gather: Gather = _identity,
    desc: str = "",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every sample once, ordered by dataset index.  -> (n, C) float32, (n,) int64"""
    feats, labels, index = [], [], []
    for x, y, idx in tqdm(loader, desc=desc, disable=not progress, leave=False):
        f = features(x).float()  # (B, C)
        feats.append(gather(f.contiguous()))
        labels.append(gather(y.contiguous()))
        index.append(gather(idx.to(f.device).contiguous()))
    feats, labels, index = torch.cat(feats), torch.cat(labels), torch.cat(index)
    order = torch.argsort(index, stable=True)
    index, feats, labels = index[order], feats[order], labels[order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]  # drop the padding repeats
    return feats[first], labels[first]


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,  # (Q, C)
    bank: torch.Tensor,  # (B, C)
    bank_labels: torch.Tensor,  # (B,)
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN vote; returns the predicted class per query.  -> (Q,) int64"""
    query, bank = F.normalize(query.float(), dim=1), F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for q in query.split(chunk):
        sim, nn_idx = (q @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[nn_idx], (sim / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


@torch.no_grad()
def knn_top1(
    features: Callable[[torch.Tensor], torch.Tensor],
    bank_loader: Iterable,
    query_loader: Iterable,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    gather: Gather = _identity,
    progress: bool = False,
) -> float:
    """kNN top-1 (%) of ``query_loader`` samples against the ``bank_loader`` features."""
    bank, bank_labels = extract_features(features, bank_loader, gather, "kNN bank", progress)
    query, labels = extract_features(features, query_loader, gather, "kNN query", progress)
    pred = knn_predict(query, bank, bank_labels, num_classes, k, t)
    return 100.0 * (pred == labels).float().mean().item()


def linear_probe(
    features: Callable[[torch.Tensor], torch.Tensor],
    width: int,
    train_loader: Iterable,
    val_loader: Iterable,
    num_classes: int,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    milestones: tuple[float, ...] = (0.6, 0.8),
    augment: bool = True,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    gather: Gather = _identity,
    set_epoch: Callable[[int], None] | None = None,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Train a linear classifier on frozen features; return {"top1": val %, "train_top1": %}.

    augment=True: every epoch passes the (augmenting) train loader through the frozen backbone
    (the protocol). augment=False: centre-crop features are extracted once and the classifier is
    trained on them (fast; for small demos). In both cases every process trains the same classifier
    on the gathered features, so no gradient synchronisation is needed.
    """
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(width, num_classes).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = sorted(round(m * epochs) for m in milestones)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=steps, gamma=0.1)
    cached = None if augment else extract_features(features, train_loader, gather, "probe features", progress)
    correct = total = 0
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not progress):
        if cached is None:
            if set_epoch is not None:
                set_epoch(epoch)
            feats, labels = extract_features(features, train_loader, gather)
        else:
            feats, labels = cached
        order = torch.randperm(feats.shape[0], generator=gen).to(feats.device)
        correct = total = 0
        for b in order.split(batch_size):
            logits = head(feats[b])
            loss = F.cross_entropy(logits, labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (logits.argmax(1) == labels[b]).sum().item()
            total += b.numel()
        sched.step()
    val_feats, val_labels = extract_features(features, val_loader, gather, "probe val", progress)
    with torch.no_grad():
        top1 = 100.0 * (head(val_feats).argmax(1) == val_labels).float().mean().item()
    return {"top1": top1, "train_top1": 100.0 * correct / max(total, 1)}


@torch.no_grad()
def top1_accuracy(
    logits: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    gather: Gather = _identity,
    progress: bool = False,
) -> float:
    """Top-1 (%) of a classifier over every sample of ``loader`` (each counted once)."""
    scores, labels = extract_features(logits, loader, gather, "val top-1", progress)  # (n, classes), (n,)
    return 100.0 * (scores.argmax(1) == labels).float().mean().item()
