"""mixmask/crops.py: ContrastiveCrop's config, shared box table, heat-map boxes and update schedule."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch
from PIL import Image

from mixmask.crops import BoxTable, ContrastiveCrop, ContrastiveCropConfig, boxes_from_heat, whole_image_transform


def test_config_defaults_and_problems():
    c = ContrastiveCropConfig()
    assert (c.enabled, c.alpha, c.warmup, c.interval, c.threshold) == (False, 0.6, 20, 20, 0.1)
    assert c.problems() == []
    bad = ContrastiveCropConfig(alpha=0, warmup=-1, interval=0, threshold=1.0).problems()
    assert bad == ["alpha must be > 0", "warmup must be >= 0", "interval must be >= 1", "threshold must be in [0, 1)"]


def test_table_starts_whole_and_inactive_and_writes_in_place():
    t = BoxTable(5)
    assert t.array.shape == (5, 4) and t.array.dtype == np.float32 and len(t) == 5
    assert (t.array == [0, 0, 1, 1]).all() and not t.active
    addr, v = t.array.ctypes.data, t.version
    t.write([1, 3], torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]]))
    assert np.allclose(t.array[3], [0.5, 0.5, 0.9, 0.8]) and (t.array[0] == [0, 0, 1, 1]).all()
    t.active = True
    assert t.active and t.active_cell[0] == 1 and t.version == v + 2
    t.reset()
    assert (t.array == [0, 0, 1, 1]).all() and not t.active and t.array.ctypes.data == addr
    with pytest.raises(ValueError):
        BoxTable(0)


def test_state_dict_round_trip_restores_in_place():
    t = BoxTable(4)
    t.write([0, 2], [[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.6, 0.9]])
    t.active = True
    sd = t.state_dict()
    assert set(sd) == {"boxes", "active"} and sd["boxes"].dtype == torch.float32 and sd["boxes"].shape == (4, 4)
    t.write([0, 1, 2, 3], torch.zeros(4, 4))  # the state dict is a copy
    assert float(sd["boxes"][2, 3]) == pytest.approx(0.9)

    u = BoxTable(4)
    held = u.array  # a view taken before loading (as a worker or compiled decoder holds it)
    cell = u.active_cell
    addr = u.array.ctypes.data
    u.load_state_dict(sd)
    assert u.array.ctypes.data == addr and np.array_equal(held, sd["boxes"].numpy()) and cell[0] == 1 and u.active
    u.load_state_dict({"boxes": torch.tensor([[0, 0, 1, 1]] * 4, dtype=torch.float32)})  # no "active": inferred
    assert not u.active
    u.load_state_dict({"boxes": sd["boxes"]})
    assert u.active
    with pytest.raises(ValueError, match="shape"):
        u.load_state_dict({"boxes": torch.zeros(3, 4)})


def _child(table: BoxTable, ready, go, out):
    ready.set()
    go.wait(30)
    out.put((table.array.copy(), table.active))


def test_table_shared_with_a_spawned_process():
    """Pickled to a spawned process (workers under spawn/forkserver), the table is the same memory: a
    write made after the child started is what the child reads."""
    t = BoxTable(3)
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_child, args=(t, ready, go, out))
    p.start()
    try:
        assert ready.wait(120)
        t.write([1], [[0.25, 0.5, 0.75, 1.0]])
        t.active = True
        go.set()
        arr, active = out.get(timeout=60)
    finally:
        p.join(30)
    assert np.allclose(arr[1], [0.25, 0.5, 0.75, 1.0]) and active


def test_boxes_from_heat_bright_rectangle():
    """A bright rectangle (rows 2-4, cols 3-6 of an 8 x 8 map) on an offset background."""
    heat = torch.full((2, 8, 8), 5.0)
    heat[0, 2:5, 3:7] = 8.0
    heat[1, 0, 7] = 6.0  # one bright cell in the top-right corner
    same = boxes_from_heat(heat, 0.1, 8)  # no upsampling: exactly the cells above the threshold
    assert torch.allclose(same[0], torch.tensor([2 / 8, 3 / 8, 5 / 8, 7 / 8]))
    assert torch.allclose(same[1], torch.tensor([0, 7 / 8, 1 / 8, 1]))
    # upsampled x8 (bilinear, align_corners=False): pixel p samples the map at s = (p + 0.5) / 8 - 0.5,
    # above 0.1 for 1.1 < s < 4.9 (rows: p = 13..42) and 2.1 < s < 6.9 (columns: p = 21..58)
    up = boxes_from_heat(heat, 0.1, 64)
    assert torch.allclose(up[0], torch.tensor([13 / 64, 21 / 64, 43 / 64, 59 / 64]))
    assert up[1, 0] == 0 and up[1, 3] == 1 and up[1, 2] < 0.2 and up[1, 1] > 0.8
    rect = boxes_from_heat(heat[:1], 0.1, (64, 32))  # (Hi, Wi): columns x4, s = (p + 0.5) / 4 - 0.5: p = 10..29
    assert torch.allclose(rect[0], torch.tensor([13 / 64, 10 / 32, 43 / 64, 30 / 32]))


def test_boxes_from_heat_constant_or_below_threshold_gives_whole_image():
    heat = torch.stack([torch.zeros(7, 7), torch.full((7, 7), 3.0)])
    assert torch.equal(boxes_from_heat(heat, 0.1, 56), torch.tensor([[0, 0, 1, 1]] * 2, dtype=torch.float32))
    one = torch.zeros(1, 7, 7)
    one[0, 3, 3] = 1
    b = boxes_from_heat(one, 0.1, 7)
    assert torch.allclose(b, torch.tensor([[3 / 7, 3 / 7, 4 / 7, 4 / 7]]))
    b = boxes_from_heat(one, 0.999, 70)  # the upsampled peak stays below 1: nothing above -> whole image
    assert torch.equal(b, torch.tensor([[0, 0, 1, 1]], dtype=torch.float32))


def test_due_schedule():
    cc = ContrastiveCrop(ContrastiveCropConfig(enabled=True, warmup=3, interval=2), 4)
    assert [e for e in range(10) if cc.due(e)] == [3, 5, 7, 9]
    assert not any(ContrastiveCrop(ContrastiveCropConfig(warmup=0, interval=1), 4).due(e) for e in range(5))


class _Net(torch.nn.Module):
    """A 'feature map' whose heat is bright where the input is (N, 3, 16, 16) -> (N, 2, 4, 4)."""

    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AvgPool2d(4)
        self.seen_training = []

    def fmap(self, x):
        self.seen_training.append(self.training)
        p = self.pool(x.float())  # (N, 3, 4, 4)
        return torch.cat([p[:, :1], -p[:, 1:2]], 1)  # a negative channel: the heat sums |F_c|


def test_update_writes_boxes_by_index_and_activates():
    net = _Net()
    x = torch.zeros(6, 3, 16, 16)
    for k in range(6):
        x[k, :, (k % 4) * 4:(k % 4) * 4 + 4, 4:8] = 1  # a bright 4 x 4 block in cell row k % 4, column 1
    index = torch.tensor([5, 0, 3, 1, 2, 4])
    # two batches, the last one padded by repeating the first sample (as the eval loader's shards)
    loader = [(x[:4], None, index[:4]), (torch.cat([x[4:], x[:2]]), None, torch.cat([index[4:], index[:2]]))]
    cc = ContrastiveCrop(ContrastiveCropConfig(enabled=True, threshold=0.5), 6)
    net.train()
    assert cc.update(net.fmap, loader, size=4) == 8
    assert cc.table.active and net.training and net.seen_training == [False, False]
    for k in range(6):
        r = k % 4
        assert np.allclose(cc.table.array[int(index[k])], [r / 4, 1 / 4, (r + 1) / 4, 2 / 4]), k
    gathered = []

    def gather(t):  # two processes holding the same shard: everything twice
        gathered.append(t.shape)
        return torch.cat([t, t])
    cc.table.reset()
    assert cc.update(net.fmap, loader, size=4, gather=gather) == 16
    assert gathered[:2] == [(4, 4), (4,)] and cc.table.active
    assert np.allclose(cc.table.array[5], [0, 1 / 4, 1 / 4, 2 / 4])
    sd = cc.state_dict()
    other = ContrastiveCrop(ContrastiveCropConfig(enabled=True), 6)
    other.load_state_dict(sd)
    assert np.array_equal(other.table.array, cc.table.array) and other.table.active


def test_whole_image_transform_resizes_to_a_square():
    img = Image.fromarray(np.zeros((30, 50, 3), np.uint8))
    assert whole_image_transform(16)(img).size == (16, 16)
