"""ContrastiveCrop's crop offsets (Peng et al., CVPR 2022, "Crafting Better Contrastive Views for
Siamese Representation Learning", arXiv 2202.03278), drawn from the counter-based generator.

Given the size (w, h) RandomResizedCrop accepted (kernels/views.py) and the sample's box
(y0, x0, y1, x1) in normalised image coordinates (the heat-map box of mixmask/crops.py), the paper
places the crop's top-left corner at

    ch0 = max(int(H y0) - h // 2, 0),   ch1 = min(int(H y1) - h // 2, H - h)
    cw0 = max(int(W x0) - w // 2, 0),   cw1 = min(int(W x1) - w // 2, W - w)
    top  = ch0 + int((ch1 - ch0) b_y),  left = cw0 + int((cw1 - cw0) b_x),   b_y, b_x ~ Beta(alpha, alpha) i.i.d.

so the crop's centre (top + h // 2) lies within the box and, for alpha < 1, leans towards its edges.
Guard (not in the paper, whose rule is undefined there): ch0 and ch1 are clamped into [0, H - h] and
ch1 >= ch0, so the window always lies inside the image (for a valid box this changes nothing where
the paper's rule already gives ch0 <= ch1).

Beta(alpha, alpha) as G1 / (G1 + G2) of two Gamma(alpha, 1) variates (computed from their logs:
b = 1 / (1 + exp(log G2 - log G1)), so tiny alphas neither underflow nor divide 0 by 0). Gamma by
Marsaglia & Tsang (ACM TOMS 2000): with a = alpha (alpha >= 1) or alpha + 1 (alpha < 1),
d = a - 1/3, c = 1 / sqrt(9 d), repeat

    x ~ N(0, 1), v = (1 + c x)^3, u ~ U(0, 1]:  accept d v  if v > 0 and
    (u < 1 - 0.0331 x^4  or  log u < x^2 / 2 + d (1 - v + log v))

and for alpha < 1 multiply by U^(1 / alpha) (Gamma(alpha) = Gamma(alpha + 1) U^(1/alpha)).

Every number is a pure function of (seed, epoch, slot, i, counter) (kernels/rng.py uniform4), so an
offset does not depend on thread count, batch layout or resume. Variate k (0, 1: G1, G2 of b_y;
2, 3: those of b_x) walks counters BETA_COUNTER + GAMMA_TRIES k + t, t = 0, 1, ...; try t uses
uniform4 -> (u0, u1, u2, u3): x = sqrt(-2 ln(1 - u0)) cos(2 pi u1) (Box-Muller, kernels/fill.py),
u = 1 - u2, and the alpha < 1 factor is (1 - u3 of try 0)^(1/alpha). Counters start at 16, clear of
the 0-12 that draw_one uses. A variate accepts with probability > 0.95 a try (d >= 2/3), so 64 tries
never run out in practice; if they did, the variate would be d (v = 1).

alpha <= 0 is not a Beta: kernels/views.draw_one then keeps RandomResizedCrop's uniform offsets.
"""
from __future__ import annotations

import math

from numba import njit

from kernels.fill import box_muller
from kernels.rng import uniform4, uniform4_reference

BETA_COUNTER = 16  # first counter of the Beta draws (draw_one uses 0-12)
GAMMA_TRIES = 64  # counters reserved per Gamma variate (4 variates: counters 16-271)

_box_muller = njit(inline="always")(box_muller)


def _log_gamma_source(u4, seed, epoch, slot, i, base, alpha):
    """log of a Gamma(alpha, 1) variate (Marsaglia-Tsang, module docstring), alpha > 0, from the
    counters base, base + 1, ...; u4 is uniform4 or its reference (same source, two backends)."""
    a = alpha if alpha >= 1.0 else alpha + 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    boost = 0.0  # log U^(1/alpha) for alpha < 1
    out = math.log(d)  # never used in practice (64 rejections in a row)
    for t in range(GAMMA_TRIES):
        u0, u1, u2, u3 = u4(seed, epoch, slot, i, base + t)
        if t == 0 and alpha < 1.0:
            boost = math.log(1.0 - u3) / alpha
        x = box_muller(u0, u1, u2, u3, 0)
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        u = 1.0 - u2  # (0, 1]
        if u < 1.0 - 0.0331 * (x * x) * (x * x) or math.log(u) < 0.5 * x * x + d * (1.0 - v + math.log(v)):
            out = math.log(d * v)
            break
    return out + boost


def _ratio(lg1, lg2):
    """G1 / (G1 + G2) from log G1, log G2, without overflow."""
    t = lg2 - lg1
    if t > 0.0:
        e = math.exp(-t)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(t))


_ratio_jit = njit(inline="always")(_ratio)


@njit(nogil=True, cache=True)
def log_gamma(seed, epoch, slot, i, base, alpha):
    """log of a Gamma(alpha, 1) variate keyed by (seed, epoch, slot, i) from counter `base` on."""
    a = alpha if alpha >= 1.0 else alpha + 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    boost = 0.0
    out = math.log(d)
    for t in range(GAMMA_TRIES):
        u0, u1, u2, u3 = uniform4(seed, epoch, slot, i, base + t)
        if t == 0 and alpha < 1.0:
            boost = math.log(1.0 - u3) / alpha
        x = _box_muller(u0, u1, u2, u3, 0)  # lane 0: sqrt(-2 ln(1 - u0)) cos(2 pi u1)
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        u = 1.0 - u2
        if u < 1.0 - 0.0331 * (x * x) * (x * x) or math.log(u) < 0.5 * x * x + d * (1.0 - v + math.log(v)):
            out = math.log(d * v)
            break
    return out + boost


@njit(nogil=True, cache=True)
def beta_pair(seed, epoch, slot, i, alpha):
    """(b_y, b_x), i.i.d. Beta(alpha, alpha) in [0, 1] (alpha > 0), keyed by (seed, epoch, slot, i)."""
    g = BETA_COUNTER
    by = _ratio_jit(log_gamma(seed, epoch, slot, i, g, alpha), log_gamma(seed, epoch, slot, i, g + GAMMA_TRIES, alpha))
    bx = _ratio_jit(log_gamma(seed, epoch, slot, i, g + 2 * GAMMA_TRIES, alpha),
                    log_gamma(seed, epoch, slot, i, g + 3 * GAMMA_TRIES, alpha))
    return by, bx


@njit(nogil=True, cache=True)
def offset_range(H, h, lo, hi):
    """ContrastiveCrop's range [c0, c1] of the crop's first row (or column) for an image of H px, a
    crop of h px and the box edges lo, hi (fractions): c0 = max(int(H lo) - h // 2, 0),
    c1 = min(int(H hi) - h // 2, H - h), then clamped so that 0 <= c0 <= c1 <= H - h."""
    c0 = max(int(H * lo) - h // 2, 0)
    c1 = min(int(H * hi) - h // 2, H - h)
    c0 = min(c0, H - h)
    c1 = max(c1, c0)
    return c0, c1


@njit(nogil=True, cache=True)
def ccrop_offset(seed, epoch, slot, i, W, H, w, h, box, alpha):
    """(top, left) of an h x w crop of a W x H image under ContrastiveCrop (module docstring); box
    (4,) float = (y0, x0, y1, x1) in normalised coordinates, alpha > 0."""
    by, bx = beta_pair(seed, epoch, slot, i, alpha)
    ch0, ch1 = offset_range(H, h, float(box[0]), float(box[2]))
    cw0, cw1 = offset_range(W, w, float(box[1]), float(box[3]))
    return ch0 + int((ch1 - ch0) * by), cw0 + int((cw1 - cw0) * bx)


# ---------------------------------------------------------------------------------------------
# Plain-Python reference (Python-int Philox, the formulas of the module docstring)

def beta_pair_reference(seed: int, epoch: int, slot: int, i: int, alpha: float) -> tuple[float, float]:
    """beta_pair with uniform4_reference and plain Python floats."""
    g = BETA_COUNTER
    lg = [_log_gamma_source(uniform4_reference, int(seed), epoch, slot, i, g + k * GAMMA_TRIES, float(alpha))
          for k in range(4)]
    return _ratio(lg[0], lg[1]), _ratio(lg[2], lg[3])


def ccrop_offset_reference(seed: int, epoch: int, slot: int, i: int, W: int, H: int, w: int, h: int, box,
                           alpha: float) -> tuple[int, int]:
    """ccrop_offset in plain Python."""
    by, bx = beta_pair_reference(seed, epoch, slot, i, alpha)

    def rng(n, k, lo, hi):
        c0 = min(max(int(n * float(lo)) - k // 2, 0), n - k)
        c1 = max(min(int(n * float(hi)) - k // 2, n - k), c0)
        return c0, c1
    ch0, ch1 = rng(H, h, box[0], box[2])
    cw0, cw1 = rng(W, w, box[1], box[3])
    return ch0 + int((ch1 - ch0) * by), cw0 + int((cw1 - cw0) * bx)
