"""kNN monitor and linear probe (mixmask/evaluation.py) against brute-force references."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixmask.evaluation import extract_features, knn_predict, linear_probe


def knn_reference(query, bank, labels, num_classes, k, t):
    out = []
    for q in query:
        sims = [(F.cosine_similarity(q, b, dim=0).item(), int(l)) for b, l in zip(bank, labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, l in sims[:k]:
            votes[l] += math.exp(s / t)
        out.append(max(range(num_classes), key=lambda c: votes[c]))
    return out


@pytest.mark.parametrize("k,t", [(1, 0.1), (5, 0.1), (20, 0.5), (200, 0.1)])
def test_knn_matches_brute_force(k, t):
    g = torch.Generator().manual_seed(k)
    bank, query = torch.randn(60, 8, generator=g), torch.randn(17, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    got = knn_predict(query, bank, labels, 4, k, t, chunk=5)
    assert got.tolist() == knn_reference(query, bank, labels, 4, min(k, 60), t)


def test_extract_features_orders_by_index_and_drops_padding():
    data = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 3)
    order = [7, 2, 9, 0, 5, 1, 3, 8, 6, 4, 7, 2]  # 10 samples + 2 padding repeats
    batches = [(data[order[i : i + 4]], torch.tensor(order[i : i + 4]) % 3, torch.tensor(order[i : i + 4])) for i in range(0, 12, 4)]
    feats, labels = extract_features(lambda x: x * 2, batches)
    assert torch.equal(feats, data * 2)
    assert labels.tolist() == [i % 3 for i in range(10)]


def test_linear_probe_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.randint(0, 3, (300,), generator=g)
    x = centers[y] + torch.randn(300, 16, generator=g)
    train = [(x[i : i + 50], y[i : i + 50], torch.arange(i, i + 50)) for i in range(0, 200, 50)]
    val = [(x[200:], y[200:], torch.arange(100))]
    res = linear_probe(lambda t: t, 16, train, val, 3, epochs=30, lr=0.1, augment=False, batch_size=32)
    assert res["top1"] > 90 and res["train_top1"] > 90
