"""Philox4x32-10 counter-based RNG (kernels/rng.py): known answers and backend agreement."""
import numpy as np
import pytest

from kernels import rng

U = np.uint64

# Random123 tests/kat_vectors, "philox4x32 10": counter (4 words), key (2 words) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

KEYS = [(0, 0, 0, 0, 0), (1, 2, 3, 4, 5), (2 ** 64 - 1, 2 ** 32 - 1, 2 ** 32 - 1, 255, 10 ** 6),
        (2 ** 40 + 3, 7, 0, 1023, 3)]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want, backend):
    fn = rng.philox4x32 if backend == "njit" else rng.philox4x32.py_func
    got = fn(*(U(w) for w in ctr), *(U(w) for w in key))
    assert tuple(int(w) for w in got) == want
    assert rng.philox4x32_reference(ctr, key) == want


@pytest.mark.parametrize("keys", KEYS)
def test_uniform4_matches_reference(keys, backend):
    fn = rng.uniform4 if backend == "njit" else rng.uniform4.py_func
    got = fn(U(keys[0]), *keys[1:])
    want = rng.uniform4_reference(*keys)
    assert got == want
    assert all(0.0 <= u < 1.0 for u in got)


def test_keys_change_the_stream():
    base = rng.uniform4(U(5), 1, 2, 3, 4)
    for i in range(5):
        keys = [5, 1, 2, 3, 4]
        keys[i] += 1
        assert rng.uniform4(U(keys[0]), *keys[1:]) != base, f"key {i} has no effect"


def test_uniform4_looks_uniform():
    u = np.array([rng.uniform4(U(9), 0, 0, s, c) for s in range(50) for c in range(50)]).ravel()  # 10k
    assert abs(u.mean() - 0.5) < 0.01
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert hist.min() > 900 and hist.max() < 1100
