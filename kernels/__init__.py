"""Numba kernels of the MixMask project (numpy + numba only; never imports torch).

MixMask (Vishniakov, Xing, Shen, arXiv 2210.11456): the mixed view
    x~_j = M_j * x1_j + (1 - M_j) * x1_perm(j),   lam_j = mean(up(M_j)),
with M_j a binary g x g grid upsampled nearest-neighbour (cell_row(y) = (y*g)//H).

    sample_masks(kind, n, g, ratio, seed, epoch, batch_index) -> (n, g, g) uint8   kernels/masks.py
    realised_lam(masks, H, W) -> (M,) float32                                       kernels/masks.py
    fused_mix(v1, v2, masks, perm, mean, std, out1, out2, outm=None, layout=...)    kernels/mix.py
    fused_mix_reference(same arguments)                                             kernels/mix.py
    fused_mix_cuda(..., layout=..., stream=0)          kernels/mix_cuda.py, imported lazily
    uniform4 / Philox4x32-10 counter-based RNG                                      kernels/rng.py

Debugging switches (numba's own): NUMBA_DISABLE_JIT=1 runs every CPU kernel as plain Python;
NUMBA_ENABLE_CUDASIM=1 (before numba.cuda is imported) runs the CUDA kernels in the simulator.
"""
from kernels.masks import realised_lam, sample_masks
from kernels.mix import fused_mix, fused_mix_reference

__all__ = ["sample_masks", "realised_lam", "fused_mix", "fused_mix_reference", "fused_mix_cuda"]


def __getattr__(name):
    # numba.cuda is imported only when the CUDA entry is first used.
    if name == "fused_mix_cuda":
        from kernels.mix_cuda import fused_mix_cuda
        return fused_mix_cuda
    if name == "mix_cuda":
        import importlib
        return importlib.import_module("kernels.mix_cuda")
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
