"""The mixing methods of mixmask/mixing (MixStage -> Batch) on tiny CPU batches.

Every expected value is rebuilt here from the module docstrings: the plain normalisation formula, the
nearest upsampling of the grid masks (cell_row = (y g) // H), the Philox uniforms of kernels/rng.py's
Python-int reference (Un-Mix's lam / box / mixup switch, the random partner permutation), the
Box-Muller noise of kernels/fill.py's numpy reference, and the cell masks of kernels/cells.py's
reference twin. Nothing here asks the method under test for the value it is checked against, except
the saliency map (mixmask.mixing.saliency.foreground), which is the method's own definition of
foreground and is recomputed with the public function.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing

import numpy as np
import pytest
import torch

from kernels.cells import cell_masks_reference
from kernels.fill import high_pass_reference, normals_reference
from kernels.masks import sample_masks_reference
from kernels.rng import STREAM_SHIFT, STREAMS, uniform4_reference
from mixmask.batch import Batch
from mixmask.config import Config, ConfigError, MaskConfig, load_config, validate
from mixmask.frameworks.moco_v2 import MoCoV2, MoCoV2Config
from mixmask.fused import normalize
from mixmask.losses import info_nce
from mixmask.mixing import MIXERS, MixStage
from mixmask.mixing.saliency import foreground, spectral_residual
from mixmask.mixing.unmix import cutmix_box, draw

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
N, H, W, G = 6, 16, 16, 4
METHODS = list(MIXERS)
ROUTES = ["torch", "auto"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------------
# builders and independent references
# ----------------------------------------------------------------------------------------------------


def make_cfg(method: str, **sections) -> Config:
    """A Config for ``method`` with the tiny grids; ``sections``: {"unmix": {"mixup_p": 1.0}, ...}."""
    cfg = Config()
    cfg.mask.method, cfg.mask.grid, cfg.mscn.grid = method, G, G
    for name, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, name), key, value)
    validate(cfg)
    return cfg


def make_stage(method: str, cfg: Config | None = None, *, route="torch", dtype=torch.float32, seed=7, rank=0,
               world=1) -> MixStage:
    cfg = cfg or make_cfg(method)
    return MixStage(MEAN, STD, dtype=dtype, channels_last=True, mixer=MIXERS[method].from_config(cfg), seed=seed,
                    rank=rank, world=world, route=route)


def views(seed: int, n: int = N, h: int = H, w: int = W, structured: bool = False):
    """Two uint8 NHWC views. structured: a dim noisy background with one bright square per image at an
    image-dependent place (so the spectral-residual saliency differs per image)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        if not structured:
            out.append(torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g))
            continue
        v = torch.randint(0, 60, (n, h, w, 3), generator=g)
        for j in range(n):
            y, x = torch.randint(0, h - 5, (2,), generator=g).tolist()
            v[j, y:y + 5, x:x + 5] += 180
        out.append(v.clamp(0, 255).to(torch.uint8))
    return out


def call(stage: MixStage, v1, v2, epoch=0, step=0) -> Batch:
    n = v1.shape[0]
    return stage(v1, v2, torch.arange(n), torch.arange(n) + 100, epoch, step)


def norm_formula(v: torch.Tensor) -> torch.Tensor:
    """((v / 255 - mean) / std), float64 arithmetic -> float32 (N, 3, H, W)."""
    m = torch.tensor(MEAN, dtype=torch.float64)
    s = torch.tensor(STD, dtype=torch.float64)
    return ((v.double() / 255 - m) / s).float().permute(0, 3, 1, 2)


def norm(v: torch.Tensor) -> torch.Tensor:
    """The project's definition of the normalised value (mixmask.fused.normalize), float32."""
    return normalize(v, MEAN, STD, torch.float32, True, "torch")


def high_pass(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    out = np.empty(tuple(x.shape), np.float32)
    high_pass_reference(x.contiguous().numpy(), out, cfg.mscn.hp_kernel, cfg.mscn.hp_sigma)
    return torch.from_numpy(out)


def noise(std: float, seed: int, epoch: int, batch_index: int, stream: str, n: int, c: int, h: int, w: int):
    """std * z_j(e) rounded to float32, laid out as (N, C, H, W) with e = (c H + y) W + x."""
    z = [(std * normals_reference(seed, epoch, batch_index, j, STREAMS[stream], c * h * w)).astype(np.float32)
         for j in range(n)]
    return torch.from_numpy(np.stack(z).reshape(n, c, h, w))


def upsample(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(M, gh, gw) -> (M, H, W) with cell_row = (y gh) // H, cell_col = (x gw) // W (written here)."""
    gh, gw = masks.shape[-2:]
    rows = torch.tensor([(y * gh) // h for y in range(h)])
    cols = torch.tensor([(x * gw) // w for x in range(w)])
    return masks[:, rows][:, :, cols]


def erased_elements(masks: np.ndarray, boxes: np.ndarray, c: int, h: int, w: int) -> torch.Tensor:
    """(N, C, H, W) bool: masked cells (masks == 0, per channel or shared) or outside the focal window."""
    n = masks.shape[0]
    out = torch.zeros((n, c, h, w), dtype=torch.bool)
    up = upsample(torch.from_numpy(masks).reshape(-1, *masks.shape[2:]), h, w).reshape(n, masks.shape[1], h, w)
    for j in range(n):
        for ch in range(c):
            out[j, ch] = up[j, ch if masks.shape[1] > 1 else 0] == 0
        top, left, bh, bw = (int(t) for t in boxes[j])
        if bh > 0:
            inside = torch.zeros((h, w), dtype=torch.bool)
            inside[top:top + bh, left:left + bw] = True
            out[j] |= ~inside
    return out


def keys_of(stage: MixStage, epoch=0, step=0):
    return stage.seed, epoch, step * stage.world + stage.rank


def assert_provenance(mixed: torch.Tensor, x1: torch.Tensor, perm: torch.Tensor, keep: torch.Tensor):
    """mixed[j] = x1[j] where keep (M, H, W) is 1, x1[perm[j]] where it is 0 (exact)."""
    expect = torch.where(keep.bool()[:, None], x1, x1[perm])
    assert torch.equal(mixed, expect)


def ref_box(lam: float, u_row: float, u_col: float, h: int, w: int):
    """CutMix's rand_bbox (Yun et al. 2019), written from the Un-Mix docstring: side sqrt(1 - lam) of each
    image side, centre (floor(u_row H), floor(u_col W)), the half sides subtracted and added, clipped."""
    side_h, side_w = math.floor(h * math.sqrt(1 - lam)), math.floor(w * math.sqrt(1 - lam))
    cy, cx = math.floor(u_row * h), math.floor(u_col * w)
    return (int(np.clip(cy - side_h // 2, 0, h)), int(np.clip(cy + side_h // 2, 0, h)),
            int(np.clip(cx - side_w // 2, 0, w)), int(np.clip(cx + side_w // 2, 0, w)))


def batch_tensors(b: Batch) -> dict[str, torch.Tensor | None]:
    out = {"x1": b.x1, "x2": b.x2, "labels": b.labels, "index": b.index, "hard_negative": b.hard_negative}
    for i, m in enumerate(b.mixes):
        out |= {f"mix{i}.x": m.x, f"mix{i}.perm": m.perm, f"mix{i}.lam": m.lam, f"mix{i}.mask": m.mask}
    return out


def assert_batches_equal(a: Batch, b: Batch, close: tuple[str, ...] = ()):
    """Every field equal (torch.equal), except those in ``close`` (only dtype and shape here)."""
    assert len(a.mixes) == len(b.mixes) and [m.method for m in a.mixes] == [m.method for m in b.mixes]
    ta, tb = batch_tensors(a), batch_tensors(b)
    for k in ta:
        if ta[k] is None or tb[k] is None:
            assert ta[k] is None and tb[k] is None, k
        else:
            assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
            assert k in close or torch.equal(ta[k], tb[k]), k


def random_parts(b: Batch, method: str) -> list[torch.Tensor]:
    """What the step's random draws decide: the mixed views, the erased query, the hard negative."""
    parts = [m.x for m in b.mixes]
    if method in ("mscn", "saliency"):
        parts.append(b.x1)
    if b.hard_negative is not None:
        parts.append(b.hard_negative)
    return parts


# ----------------------------------------------------------------------------------------------------
# 1. pixel provenance
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("method, mask_opts", [("mixmask", {}), ("mixmask", {"per_sample": True, "kind": "discrete"}),
                                               ("saliency_mixmask", {})])
@pytest.mark.parametrize("h", [16, 20])
def test_mixmask_provenance(method, mask_opts, route, h):
    v1, v2 = views(1, h=h, w=h, structured=method == "saliency_mixmask")
    cfg = make_cfg(method, saliency={"hard_negative": False}, mask=mask_opts)
    stage = make_stage(method, cfg, route=route)
    b = call(stage, v1, v2, epoch=2, step=3)
    seed, epoch, bi = keys_of(stage, 2, 3)

    for x, v in ((b.x1, v1), (b.x2, v2)):
        assert x.dtype == torch.float32 and x.shape == (N, 3, h, h)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, norm(v))
        torch.testing.assert_close(x, norm_formula(v), rtol=0, atol=1e-6)
    assert len(b.mixes) == 1 and b.hard_negative is None
    m = b.mixes[0]
    assert torch.equal(m.perm, torch.arange(N).flip(0))  # partner "auto", even N: the reversal
    assert m.x.is_contiguous(memory_format=torch.channels_last) and m.lam.dtype == torch.float32

    # the masks the method says it used are the ones its sampler draws for these keys
    if method == "mixmask":
        n_masks = N if cfg.mask.per_sample else 1
        expect_mask = sample_masks_reference(cfg.mask.kind, n_masks, G, cfg.mask.ratio, seed, epoch, bi)
    else:
        fg = foreground(spectral_residual(v1), G, cfg.saliency.threshold)
        r = cfg.mask.ratio
        expect_mask = cell_masks_reference(fg, N, 1, G, r, r, 1.0, 0.0, 1.0, cfg.saliency.cap, "balanced", h, h,
                                           seed, epoch, bi, STREAMS["cells"])[0][:, 0]
    expect_mask = torch.from_numpy(expect_mask)
    assert m.mask.shape == expect_mask.shape and torch.equal(m.mask.cpu(), expect_mask)

    keep = upsample(m.mask.cpu(), h, h).expand(N, h, h)
    assert 0 < int((keep == 0).sum()) < keep.numel()  # something is mixed, something kept
    assert_provenance(m.x, b.x1, m.perm, keep)
    assert torch.equal(m.lam, keep.double().mean(dim=(1, 2)).float())  # realised fraction, exactly


def test_saliency_mixmask_spreads_cells_over_foreground_and_background():
    """Balanced cells: n = int(r G) partner cells, n_fg within half a cell of n nf / G (or capped)."""
    v1, v2 = views(2, structured=True)
    cfg = make_cfg("saliency_mixmask", saliency={"hard_negative": False})
    b = call(make_stage("saliency_mixmask", cfg), v1, v2)
    fg = torch.from_numpy(foreground(spectral_residual(v1), G, cfg.saliency.threshold)).bool().reshape(N, G, G)
    n_cells = int(cfg.mask.ratio * G * G)
    for j in range(N):
        taken = b.mask[j] == 0
        nf = int(fg[j].sum())
        n_fg = int((taken & fg[j]).sum())
        assert int(taken.sum()) == min(n_cells, n_fg + G * G - nf)
        assert abs(n_fg - n_cells * nf / (G * G)) <= 0.5 or n_fg in (nf, math.floor(cfg.saliency.cap * G * G + 0.5))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("n", [6, 5])
def test_unmix_mixup(route, n):
    v1, v2 = views(3, n=n)
    stage = make_stage("unmix", make_cfg("unmix", unmix={"mixup_p": 1.0}), route=route)
    b = call(stage, v1, v2, epoch=1, step=4)
    seed, epoch, bi = keys_of(stage, 1, 4)
    u = uniform4_reference(seed, epoch, bi, 0, STREAMS["batch"] << STREAM_SHIFT)
    assert torch.equal(b.x1, norm(v1)) and torch.equal(b.x2, norm(v2))
    (m,) = b.mixes
    perm = torch.arange(n).flip(0) if n % 2 == 0 else torch.arange(n).roll(-1)
    assert torch.equal(m.perm, perm) and m.mask is None
    assert torch.equal(m.lam, torch.full((n,), u[0], dtype=torch.float32))
    lam = torch.tensor(u[0], dtype=torch.float64)
    expect = lam * b.x1.double() + (1 - lam) * b.x1.double()[perm]
    torch.testing.assert_close(m.x.double(), expect, rtol=0, atol=1e-6)
    assert m.x.is_contiguous(memory_format=torch.channels_last) and m.x.dtype == torch.float32


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_unmix_cutmix(route, seed):
    v1, v2 = views(4 + seed, h=20, w=20)
    h = w = 20
    stage = make_stage("unmix", make_cfg("unmix", unmix={"mixup_p": 0.0}), route=route, seed=seed)
    b = call(stage, v1, v2, epoch=seed, step=5)
    s, epoch, bi = keys_of(stage, seed, 5)
    (m,) = b.mixes
    x1 = b.x1
    assert torch.equal(x1, norm(v1)) and torch.equal(m.perm, torch.arange(N).flip(0))
    # random images: x1[j] and its partner differ at every pixel, so provenance is unambiguous
    assert (x1 != x1[m.perm]).any(dim=1).all()
    own = (m.x == x1).all(dim=1)  # (N, H, W)
    other = (m.x == x1[m.perm]).all(dim=1)
    assert (own ^ other).all()  # every pixel is one or the other
    assert torch.equal(other, other[:1].expand_as(other))  # the same box for every sample

    # the partner pixels form one axis-aligned rectangle
    ys, xs = torch.nonzero(other[0], as_tuple=True)
    if len(ys):
        y0, y1, x0, x1_ = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        assert int(other[0].sum()) == (y1 - y0) * (x1_ - x0)
    else:
        y0 = y1 = x0 = x1_ = 0
    area = (y1 - y0) * (x1_ - x0)
    assert torch.equal(m.lam, torch.full((N,), 1 - area / (h * w), dtype=torch.float32))

    # ... which is the box of the batch's uniforms (own version of the formula, and the module's)
    u = uniform4_reference(s, epoch, bi, 0, STREAMS["batch"] << STREAM_SHIFT)
    assert not u[1] < 0.0
    ry0, ry1, rx0, rx1 = ref_box(u[0], u[2], u[3], h, w)
    if ry1 > ry0 and rx1 > rx0:
        assert (y0, y1, x0, x1_) == (ry0, ry1, rx0, rx1)
    else:
        assert area == 0
    lam, mixup, u_row, u_col = draw(stage.keys(epoch, 5), 0.0)
    assert (lam, mixup, u_row, u_col) == (u[0], False, u[2], u[3])
    assert cutmix_box(lam, u_row, u_col, h, w) == (ry0, ry1, rx0, rx1)
    assert m.mask is not None and torch.equal(m.mask.cpu()[0] == 0, other[0])


def test_cutmix_box_formula_edges():
    """ref_box against the module's cutmix_box on a grid of uniforms, corners included."""
    for lam in (0.0, 0.01, 0.3, 0.5, 0.99, 1.0 - 2 ** -32):
        for u_row in (0.0, 0.05, 0.5, 0.97, 1.0 - 2 ** -32):
            for u_col in (0.0, 0.33, 1.0 - 2 ** -32):
                for h, w in ((16, 16), (20, 20), (7, 9)):
                    assert cutmix_box(lam, u_row, u_col, h, w) == ref_box(lam, u_row, u_col, h, w)


@pytest.mark.parametrize("route", ROUTES)
def test_unmix_cutmix_non_square(route):
    v1, v2 = views(9, h=16, w=20)
    b = call(make_stage("unmix", make_cfg("unmix", unmix={"mixup_p": 0.0}), route=route), v1, v2)
    own = (b.mixed == b.x1).all(dim=1)
    assert torch.equal(b.lam, own.double().mean(dim=(1, 2)).float())


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mixup_p", [1.0, 0.0])
def test_unmix_mixmask_provenance(route, mixup_p):
    v1, v2 = views(5)
    cfg = make_cfg("unmix_mixmask", unmix={"mixup_p": mixup_p})
    stage = make_stage("unmix_mixmask", cfg, route=route)
    b = call(stage, v1, v2, epoch=0, step=2)
    seed, epoch, bi = keys_of(stage, 0, 2)
    assert torch.equal(b.x1, norm(v1)) and torch.equal(b.x2, norm(v2)) and b.hard_negative is None
    mm, um = b.mixes
    # MixMask view: a random permutation of the batch stream, call 1 (argsort of the uniforms)
    assert torch.equal(torch.sort(mm.perm).values, torch.arange(N))
    u = [uniform4_reference(seed, epoch, bi, j, (STREAMS["batch"] << STREAM_SHIFT) + 1)[0] for j in range(N)]
    assert torch.equal(mm.perm, torch.from_numpy(np.argsort(u, kind="stable")))
    expect_mask = torch.from_numpy(sample_masks_reference(cfg.mask.kind, 1, G, cfg.mask.ratio, seed, epoch, bi))
    assert torch.equal(mm.mask.cpu(), expect_mask)
    keep = upsample(mm.mask.cpu(), H, W).expand(N, H, W)
    assert_provenance(mm.x, b.x1, mm.perm, keep)
    assert torch.equal(mm.lam, keep.double().mean(dim=(1, 2)).float())
    # Un-Mix view: the reversal, mixup or CutMix
    assert torch.equal(um.perm, torch.arange(N).flip(0))
    if mixup_p == 1.0:
        lam = um.lam.double()[:, None, None, None]
        torch.testing.assert_close(um.x.double(), lam * b.x1.double() + (1 - lam) * b.x1.double()[um.perm],
                                   rtol=0, atol=1e-6)
    else:
        keep = um.mask.cpu().expand(N, H, W)
        assert_provenance(um.x, b.x1, um.perm, keep)
        assert torch.equal(um.lam, keep.double().mean(dim=(1, 2)).float())


def check_erased(x: torch.Tensor, base: torch.Tensor, erased: torch.Tensor, fill: torch.Tensor, atol: float):
    """x == fill (exactly) where erased, x == base (within atol) elsewhere; something erased."""
    assert erased.any()
    assert torch.equal(x[erased], fill[erased])
    torch.testing.assert_close(x[~erased], base[~erased], rtol=0, atol=atol)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("high_pass_on, variant", [(True, {}), (False, {}), (True, {"focal_p": 1.0}),
                                                   (True, {"focal_p": 0.0, "spatial_p": 0.0, "ratio": [0.3, 0.5]})])
def test_mscn_provenance(route, high_pass_on, variant):
    v1, v2 = views(6)
    cfg = make_cfg("mscn", mscn={"high_pass": high_pass_on, **variant})
    stage = make_stage("mscn", cfg, route=route, rank=1, world=2)
    b = call(stage, v1, v2, epoch=3, step=2)
    seed, epoch, bi = keys_of(stage, 3, 2)
    assert bi == 2 * 2 + 1
    atol = 0.0 if route == "torch" else 1e-6
    base1 = high_pass(norm(v1), cfg) if high_pass_on else norm(v1)
    base2 = high_pass(norm(v2), cfg) if high_pass_on else norm(v2)
    torch.testing.assert_close(b.x2, base2, rtol=0, atol=atol)
    if not high_pass_on:
        assert torch.equal(b.x2, norm(v2))
    c = cfg.mscn
    masks, boxes = cell_masks_reference(None, N, 3, G, c.ratio[0], c.ratio[1], c.spatial_p, c.focal_p, c.focal_size,
                                        1.0, "uniform", H, W, seed, epoch, bi, STREAMS["cells"])
    erased = erased_elements(masks, boxes, 3, H, W)
    fill = noise(c.noise_std, seed, epoch, bi, "noise", N, 3, H, W)
    check_erased(b.x1, base1, erased, fill, atol)
    if c.focal_p == 1.0:  # every sample keeps one window of round(focal_size H) px and loses the rest
        side = math.floor(c.focal_size * H + 0.5)
        assert ((~erased[:, 0]).sum(dim=(1, 2)) == side * side).all()
    if c.spatial_p == 0.0:  # channel-wise: some sample's channels lose different cells
        assert any(not torch.equal(erased[j, 0], erased[j, ch]) for j in range(N) for ch in (1, 2))
    assert b.mixes == () and b.hard_negative is None
    for x in (b.x1, b.x2):
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


def test_mscn_mean_fill():
    """fill="mean": the erased elements take the sample's per-channel mean of the (high-passed) view."""
    v1, v2 = views(7)
    cfg = make_cfg("mscn", mscn={"fill": "mean", "focal_p": 0.0, "ratio": [0.3, 0.5]})
    stage = make_stage("mscn", cfg)
    b = call(stage, v1, v2)
    seed, epoch, bi = keys_of(stage)
    c = cfg.mscn
    masks, boxes = cell_masks_reference(None, N, 3, G, *c.ratio, c.spatial_p, c.focal_p, c.focal_size, 1.0, "uniform",
                                        H, W, seed, epoch, bi, STREAMS["cells"])
    hp1 = high_pass(norm(v1), cfg)
    erased = erased_elements(masks, boxes, 3, H, W)
    mean = hp1.double().mean(dim=(2, 3), keepdim=True).expand_as(hp1)
    assert erased.any() and torch.equal(b.x1[~erased], hp1[~erased])
    torch.testing.assert_close(b.x1[erased].double(), mean[erased], rtol=0, atol=1e-6)


@pytest.mark.parametrize("route", ROUTES)
def test_saliency_provenance_and_hard_negative(route):
    v1, v2 = views(8, h=20, w=20, structured=True)
    h = w = 20
    cfg = make_cfg("saliency")
    stage = make_stage("saliency", cfg, route=route)
    b = call(stage, v1, v2, epoch=1, step=1)
    seed, epoch, bi = keys_of(stage, 1, 1)
    atol = 0.0 if route == "torch" else 1e-6
    c, s = cfg.mscn, cfg.saliency
    hp2 = high_pass(norm(v2), cfg)
    torch.testing.assert_close(b.x2, hp2, rtol=0, atol=atol)
    assert b.mixes == ()

    # the query: balanced cells on v1's foreground and background, noise of the noise stream
    fg1 = foreground(spectral_residual(v1), G, s.threshold)
    masks, boxes = cell_masks_reference(fg1, N, 3, G, c.ratio[0], c.ratio[1], c.spatial_p, c.focal_p, c.focal_size,
                                        s.cap, "balanced", h, w, seed, epoch, bi, STREAMS["cells"])
    check_erased(b.x1, high_pass(norm(v1), cfg), erased_elements(masks, boxes, 3, h, w),
                 noise(c.noise_std, seed, epoch, bi, "noise", N, 3, h, w), atol)

    # the hard negative: a copy of the (high-passed) key view with some of ITS foreground cells noised
    hard = b.hard_negative
    assert hard is not None and hard.dtype == torch.float32 and hard.is_contiguous(memory_format=torch.channels_last)
    fg2 = torch.from_numpy(foreground(spectral_residual(v2), G, s.threshold)).bool().reshape(N, G, G)
    changed = hard != b.x2  # (N, 3, H, W)
    hard_fill = noise(s.hard_noise_std, seed, epoch, bi, "hard_noise", N, 3, h, w)
    assert torch.equal(hard[changed], hard_fill[changed])
    cells = []
    for j in range(N):
        assert torch.equal(changed[j], changed[j, :1].expand(3, h, w))  # the same cells in every channel
        # whole cells: the changed pixels are the upsampled cell set
        cell_set = torch.zeros((G, G), dtype=torch.bool)
        ys, xs = torch.nonzero(changed[j, 0], as_tuple=True)
        cell_set[(ys * G) // h, (xs * G) // w] = True
        assert torch.equal(upsample(cell_set[None], h, w)[0], changed[j, 0])
        assert not (cell_set & ~fg2[j]).any()  # only foreground cells
        nf, k = int(fg2[j].sum()), int(cell_set.sum())
        lo, hi = s.hard_ratio
        assert math.floor(lo * nf + 0.5) <= k <= math.floor(hi * nf + 0.5) and k >= 1
        cells.append(cell_set)
    expect, _ = cell_masks_reference(fg2.reshape(N, -1).numpy().astype(np.uint8), N, 3, G, *s.hard_ratio, 1.0, 0.0,
                                     1.0, 1.0, "foreground", h, w, seed, epoch, bi, STREAMS["hard_cells"])
    assert torch.equal(torch.stack(cells), torch.from_numpy(expect[:, 0] == 0))
    # different images, different cells: no sample shares its hard-negative cells with another
    patterns = {tuple(cs.flatten().tolist()) for cs in cells}
    assert len(patterns) == N
    assert len({tuple(f.flatten().tolist()) for f in fg2}) > 1  # the saliency itself differs per image


def test_saliency_without_hard_negative():
    v1, v2 = views(10, structured=True)
    b = call(make_stage("saliency", make_cfg("saliency", saliency={"hard_negative": False})), v1, v2)
    assert b.hard_negative is None and b.mixes == ()
    mixer = MIXERS["saliency"].from_config(make_cfg("saliency", saliency={"hard_negative": False}))
    assert mixer.hard_negatives is False


@pytest.mark.parametrize("route", ROUTES)
def test_saliency_mixmask_hard_negative(route):
    """saliency_mixmask's hard negative: the plainly normalised key view, foreground cells noised."""
    v1, v2 = views(11, structured=True)
    cfg = make_cfg("saliency_mixmask")
    stage = make_stage("saliency_mixmask", cfg, route=route)
    b = call(stage, v1, v2)
    seed, epoch, bi = keys_of(stage)
    s = cfg.saliency
    fg2 = foreground(spectral_residual(v2), G, s.threshold)
    masks, boxes = cell_masks_reference(fg2, N, 3, G, *s.hard_ratio, 1.0, 0.0, 1.0, 1.0, "foreground", H, W, seed,
                                        epoch, bi, STREAMS["hard_cells"])
    check_erased(b.hard_negative, norm(v2), erased_elements(masks, boxes, 3, H, W),
                 noise(s.hard_noise_std, seed, epoch, bi, "hard_noise", N, 3, H, W), 0.0)


def test_registry_matches_config():
    literal = typing.get_args(typing.get_type_hints(MaskConfig)["method"])
    assert set(literal) == set(MIXERS) and len(literal) == len(MIXERS)
    for name, cls in MIXERS.items():
        assert cls.name == name


# ----------------------------------------------------------------------------------------------------
# 2. routes, 3. determinism and resume, 4. dtype
# ----------------------------------------------------------------------------------------------------


HIGH_PASSED = {"mscn": ("x1", "x2"), "saliency": ("x1", "x2", "hard_negative")}


@pytest.mark.parametrize("method", METHODS)
def test_routes_give_equal_batches(method):
    """Bit-identical, except the high-passed views of mscn / saliency: the Numba high_pass accumulates the
    blur in float32 (kernels/fill.py's definition), its numpy reference (the torch route) in float64, so
    they differ by a few float32 ulps (seen: <= 3.3e-7). Masks, boxes and noise are identical (the
    provenance tests check the noise bit for bit on both routes)."""
    v1, v2 = views(12, structured=method.startswith("saliency"))
    for step in (0, 1):
        a = call(make_stage(method, route="torch"), v1, v2, epoch=1, step=step)
        b = call(make_stage(method, route="auto"), v1, v2, epoch=1, step=step)
        close = HIGH_PASSED.get(method, ())
        assert_batches_equal(a, b, close=close)
        for k in close:
            ta, tb = getattr(a, k), getattr(b, k)
            torch.testing.assert_close(ta, tb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["mscn", "saliency"])
def test_routes_bit_identical_with_high_pass(method):
    v1, v2 = views(12, structured=True)
    a = call(make_stage(method, route="torch"), v1, v2)
    b = call(make_stage(method, route="auto"), v1, v2)
    assert_batches_equal(a, b)


def test_high_pass_reference_vs_documented_float32_accumulation():
    """kernels/fill.py: 'The blur is accumulated in float32, taps in index order.' Written out here: the
    Numba kernel (route auto) is that, bit for bit; the numpy reference is within 1e-6 of it."""
    from kernels.fill import gaussian_taps
    from kernels.fill import high_pass as high_pass_numba

    x = norm(views(16)[0]).contiguous().numpy()
    k, half = 11, 5
    taps = gaussian_taps(k, 5.0)
    refl = lambda i, n: -i if i < 0 else (2 * n - 2 - i if i >= n else i)  # noqa: E731
    rows = np.zeros_like(x)
    for xx in range(W):
        acc = np.zeros(x.shape[:3], np.float32)
        for i in range(k):
            acc = acc + taps[i] * x[..., refl(xx + i - half, W)]
        rows[..., xx] = acc
    expect = np.zeros_like(x)
    for y in range(H):
        acc = np.zeros((x.shape[0], x.shape[1], W), np.float32)
        for i in range(k):
            acc = acc + taps[i] * rows[:, :, refl(y + i - half, H)]
        expect[:, :, y] = x[:, :, y] - acc
    got = np.empty_like(x)
    high_pass_numba(x, got, k, 5.0)
    assert np.array_equal(got, expect)
    ref = np.empty_like(x)
    high_pass_reference(x, ref, k, 5.0)
    assert np.abs(ref - expect).max() <= 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_and_resumable(method):
    v1, v2 = views(13, structured=method.startswith("saliency"))
    a = make_stage(method, seed=3, rank=1, world=2)
    for step in range(3):  # a stage that has run earlier steps ...
        first = call(a, v1, v2, epoch=2, step=step)
    fresh = make_stage(method, seed=3, rank=1, world=2)  # ... and a fresh one (a resumed run)
    assert_batches_equal(first, call(fresh, v1, v2, epoch=2, step=2))
    assert_batches_equal(first, call(a, v1, v2, epoch=2, step=2))  # no hidden state in the stage

    def differs(other: Batch) -> bool:
        return any(not torch.equal(p, q) for p, q in zip(random_parts(first, method), random_parts(other, method)))

    assert differs(call(fresh, v1, v2, epoch=2, step=3))  # another step
    assert differs(call(make_stage(method, seed=3, rank=0, world=2), v1, v2, epoch=2, step=2))  # another rank
    assert differs(call(make_stage(method, seed=4, rank=1, world=2), v1, v2, epoch=2, step=2))  # another seed
    assert differs(call(fresh, v1, v2, epoch=3, step=2))  # another epoch


@pytest.mark.parametrize("method", METHODS)
def test_bf16_equals_float32_cast(method):
    v1, v2 = views(14, structured=method.startswith("saliency"))
    f = call(make_stage(method, dtype=torch.float32), v1, v2, step=1)
    b = call(make_stage(method, dtype=torch.bfloat16), v1, v2, step=1)
    tf, tb = batch_tensors(f), batch_tensors(b)
    for k in tf:
        if tf[k] is None:
            assert tb[k] is None, k
        elif k in ("x1", "x2", "hard_negative") or k.endswith(".x"):
            assert tb[k].dtype == torch.bfloat16 and tb[k].is_contiguous(memory_format=torch.channels_last), k
            assert torch.equal(tb[k], tf[k].to(torch.bfloat16)), k
        else:
            assert torch.equal(tb[k], tf[k]), k


# ----------------------------------------------------------------------------------------------------
# 5. MoCo v2's hard negative
# ----------------------------------------------------------------------------------------------------


def unit(g: torch.Generator, *shape) -> torch.Tensor:
    z = torch.randn(*shape, generator=g)
    return z / z.norm(dim=-1, keepdim=True)


def ref_info_nce_hard(q, k, queue, t, h=None, alpha=1.0):
    """-log( e^{q.k/T} / (e^{q.k/T} + sum_i e^{q.n_i/T} + alpha e^{q.h/T}) ), float64, explicit sums."""
    q, k, queue = q.double(), k.double(), queue.double()
    out = []
    for j in range(q.shape[0]):
        pos = torch.exp(q[j] @ k[j] / t)
        den = pos + sum(torch.exp(q[j] @ queue[:, i] / t) for i in range(queue.shape[1]))
        if h is not None:
            den = den + alpha * torch.exp(q[j] @ h[j].double() / t)
        out.append(-torch.log(pos / den))
    return torch.stack(out)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.3])
def test_info_nce_hard_matches_formula(alpha):
    g = torch.Generator().manual_seed(0)
    q, k, h = unit(g, N, 16), unit(g, N, 16), unit(g, N, 16)
    queue = unit(g, 32, 16).T
    got = info_nce(q, k, queue, 0.2, h, alpha)
    assert got.shape == (N,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_info_nce_hard(q, k, queue, 0.2, h, alpha), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(info_nce(q, k, queue, 0.2).double(), ref_info_nce_hard(q, k, queue, 0.2),
                               rtol=1e-5, atol=1e-6)
    assert (got > info_nce(q, k, queue, 0.2)).all()  # one more term in the denominator


def test_info_nce_hard_enters_once_per_sample():
    g = torch.Generator().manual_seed(1)
    q, k, h = unit(g, N, 16), unit(g, N, 16), unit(g, N, 16)
    queue = unit(g, 32, 16).T
    base = info_nce(q, k, queue, 0.2, h, 2.0)
    h2 = h.clone()
    h2[2] = q[2]  # the hardest possible negative for sample 2 only
    moved = info_nce(q, k, queue, 0.2, h2, 2.0)
    changed = moved != base
    assert changed.tolist() == [j == 2 for j in range(N)]
    assert moved[2] > base[2]

    # alpha = 1 and h_j a queue column: the same as that column appearing twice in the queue
    for col in (0, 17):
        hc = queue[:, col].expand(N, 16)
        once, twice = torch.cat([queue, queue[:, [col]]], 1), torch.cat([queue, queue[:, [col, col]]], 1)
        torch.testing.assert_close(info_nce(q, k, queue, 0.2, hc, 1.0), info_nce(q, k, once, 0.2), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(info_nce(q, k, queue, 0.2, hc, 2.0), info_nce(q, k, twice, 0.2), rtol=1e-6, atol=1e-6)
    # per sample: h_j appended to the queue of sample j alone
    per_sample = torch.cat([info_nce(q[j:j + 1], k[j:j + 1], torch.cat([queue, h[j][:, None]], 1), 0.2)
                            for j in range(N)])
    torch.testing.assert_close(info_nce(q, k, queue, 0.2, h, 1.0), per_sample, rtol=1e-6, atol=1e-6)


def tiny_moco(**kw) -> MoCoV2:
    torch.manual_seed(0)
    cfg = MoCoV2Config(**{"dim": 16, "mlp_hidden": 32, "queue": 32, "momentum": 0.9, "temperature": 0.2, **kw})
    return MoCoV2(cfg, arch="resnet10", stem="small", seed=0)


@pytest.mark.parametrize("shuffle_bn", [False, True])
def test_moco_forward_with_hard_negative(shuffle_bn):
    v1, v2 = views(15, structured=True)
    batch = call(make_stage("saliency", make_cfg("saliency")), v1, v2)
    assert batch.hard_negative is not None
    model = tiny_moco(shuffle_bn=shuffle_bn)
    plain = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    queue = model.queue.clone()
    out = model(batch)
    out_plain = plain(dataclasses.replace(batch, hard_negative=None))
    assert all(torch.isfinite(v) for v in out.values())
    assert "loss_mix" not in out and torch.equal(out["loss"], out["loss_clean"])
    assert out["loss"] > out_plain["loss"]  # the same q, k, queue and one more negative
    out["loss"].backward()
    assert model.encoder_q.backbone is not None and any(p.grad is not None for p in model.encoder_q.parameters())
    if not shuffle_bn:  # keys computed on the plain batch: recompute the loss from the sub-modules
        with torch.no_grad():
            unit64 = lambda z: torch.nn.functional.normalize(z.double(), dim=1)  # noqa: E731
            q = unit64(ref.encoder_q(batch.x1))
            k = unit64(ref.encoder_k(batch.x2))
            hn = unit64(ref.encoder_k(batch.hard_negative))
        expect = ref_info_nce_hard(q, k, queue, 0.2, hn, model.cfg.hard_alpha).mean()
        torch.testing.assert_close(out["loss"].double(), expect, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# 6. config errors
# ----------------------------------------------------------------------------------------------------


def test_section_of_an_unselected_method_names_the_key():
    with pytest.raises(ConfigError, match=r"saliency\.cap is set, but mask\.method='mixmask'"):
        load_config([], ["mask.method=mixmask", "saliency.cap=0.5"])
    with pytest.raises(ConfigError, match=r"saliency\.cap"):
        load_config([], ["saliency.cap=0.5"])  # the default method is mixmask
    with pytest.raises(ConfigError, match=r"mscn\.grid is set, but mask\.method='unmix'"):
        load_config([], ["mask.method=unmix", "mscn.grid=4"])
    with pytest.raises(ConfigError, match=r"unmix\.mixup_p.*mask\.enabled=false"):
        load_config([], ["mask.method=unmix", "mask.enabled=false", "unmix.mixup_p=0.2"])
    cfg = load_config([], ["mask.method=saliency", "saliency.cap=0.5", "mscn.grid=4"])
    assert cfg.saliency.cap == 0.5 and cfg.mscn.grid == 4


@pytest.mark.parametrize("method", ["saliency", "saliency_mixmask"])
@pytest.mark.parametrize("explicit", [True, False])
def test_hard_negative_needs_negatives(method, explicit):
    args = ["model.framework=byol", f"mask.method={method}"] + (["saliency.hard_negative=true"] if explicit else [])
    with pytest.raises(ConfigError, match=r"saliency\.hard_negative"):
        load_config([], args)
    cfg = load_config([], ["model.framework=byol", f"mask.method={method}", "saliency.hard_negative=false"])
    assert cfg.saliency.hard_negative is False
    assert load_config([], ["model.framework=moco_v2", f"mask.method={method}"]).saliency.hard_negative is True


def test_bad_range_names_the_key():
    with pytest.raises(ConfigError, match=r"mscn\.ratio must be \[lo, hi\]"):
        load_config([], ["mask.method=mscn", "mscn.ratio=[0.5, 0.1]"])
    assert load_config([], ["mask.method=mscn", "mscn.ratio=[0.1, 0.5]"]).mscn.ratio == (0.1, 0.5)
    with pytest.raises(ConfigError, match=r"unmix\.mixup_p"):
        load_config([], ["mask.method=unmix", "unmix.mixup_p=1.5"])
    with pytest.raises(ConfigError, match=r"saliency\.hard_ratio must be \[lo, hi\]"):
        load_config([], ["mask.method=saliency", "saliency.hard_ratio=[0.9, 0.2]"])
    assert load_config([], ["mask.method=saliency", "saliency.hard_ratio=[0.2, 0.9]"]).saliency.hard_ratio == (0.2, 0.9)


def test_unknown_method_lists_the_choices():
    with pytest.raises(ConfigError, match=r"mask\.method: 'cutout' is not one of .*'mixmask'.*'unmix'.*'mscn'"
                                          r".*'saliency_mixmask'"):
        load_config([], ["mask.method=cutout"])
