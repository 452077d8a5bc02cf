"""kernels/color.py: the affine colour map (jitter + grayscale) and the Gaussian blur, compiled and
as plain Python, against numpy references written from the formulas."""
import math

import numpy as np
import pytest

from kernels.color import (
    YIQ,
    colour_affine,
    colour_affine_hwc,
    colour_affine_reference,
    colour_matrix,
    gaussian_blur,
    gaussian_blur_hwc,
    gaussian_blur_reference,
)

SHAPES = [(1, 1), (2, 3), (7, 5), (32, 48), (224, 224)]


@pytest.mark.parametrize("jit", [True, False], ids=["njit", "python"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_colour_affine_matches_reference(shape, jit):
    if not jit and shape[0] * shape[1] > 2000:
        pytest.skip("plain Python: small shapes only")
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    for s, h, gray, b, c in [(1.3, 20.0, False, 1.2, 0.7), (0.6, -36.0, True, 0.6, 1.4), (1.0, 0.0, False, 1.0, 1.0)]:
        m, cb = colour_matrix(s, h, gray), np.array([c * b, (1 - c) * b], np.float32)
        out = np.full_like(img, 7)
        (colour_affine if jit else colour_affine_hwc)(out, img, m, cb)
        ref = colour_affine_reference(img, m, cb)
        diff = np.abs(out.astype(int) - ref)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float32 vs float64 at .5 boundaries


def test_colour_matrix_properties():
    rgb = np.random.default_rng(0).uniform(0, 255, (100, 3))
    for s, h in [(0.6, 0), (1.4, 36), (1.0, -20)]:
        a = colour_matrix(s, h, False).astype(np.float64)
        assert np.allclose(a @ np.ones(3), 1, atol=1e-5)          # gray stays gray
        assert np.allclose((rgb @ a.T) @ YIQ[0], rgb @ YIQ[0], atol=1e-3)  # luma kept
        iq, iq2 = rgb @ YIQ[1:].T, (rgb @ a.T) @ YIQ[1:].T       # chroma scaled by s, rotated by h
        assert np.allclose(np.hypot(*iq2.T), s * np.hypot(*iq.T), atol=1e-3)
        ang = np.angle(iq2[:, 0] + 1j * iq2[:, 1]) - np.angle(iq[:, 0] + 1j * iq[:, 1])
        assert np.allclose(np.angle(np.exp(1j * (ang - math.radians(h)))), 0, atol=1e-3)
    g = colour_matrix(1.3, 20, True).astype(np.float64)
    out = rgb @ g.T
    assert np.allclose(out[:, 0], out[:, 1], atol=1e-3) and np.allclose(out[:, 1], out[:, 2], atol=1e-3)
    assert np.allclose(out[:, 0], rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-3)  # PIL "L" weights
    assert np.allclose(colour_matrix(1.0, 0.0, False), np.eye(3), atol=1e-6)


def test_contrast_blends_with_the_mean_gray_level():
    img = np.random.default_rng(1).integers(40, 200, (16, 16, 3), dtype=np.uint8)
    mu = (img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).mean()
    out = np.empty_like(img)
    colour_affine(out, img, np.eye(3, dtype=np.float32), np.array([0.0, 1.0], np.float32))  # contrast 0
    assert np.abs(out.astype(float) - mu).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("jit", [True, False], ids=["njit", "python"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0, 5.0])
def test_gaussian_blur_matches_reference(shape, sigma, jit):
    if not jit and shape[0] * shape[1] > 2000:
        pytest.skip("plain Python: small shapes only")
    rng = np.random.default_rng(int(sigma * 10) + shape[1])
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = np.full_like(img, 7)
    (gaussian_blur if jit else gaussian_blur_hwc)(out, img, np.array([sigma], np.float32))
    ref = gaussian_blur_reference(img, sigma)
    diff = np.abs(out.astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_gaussian_blur_smooths_and_keeps_constants():
    flat = np.full((20, 30, 3), 93, np.uint8)
    out = np.empty_like(flat)
    gaussian_blur(out, flat, np.array([1.5], np.float32))
    assert (out == 93).all()  # weights sum to one, edges replicated
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    gaussian_blur(out := np.empty_like(noise), noise, np.array([2.0], np.float32))
    assert out.std() < 0.3 * noise.std() and abs(out.mean() - noise.mean()) < 1.0
    # sigma 0.1: the neighbours' weights are ~1e-22, the image is unchanged
    gaussian_blur(out, noise, np.array([0.1], np.float32))
    assert np.array_equal(out, noise)
