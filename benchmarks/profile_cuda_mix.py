"""Launch the CUDA fused-mix kernels once each on an ImageNet-shaped batch, for a profiler
(Nsight Compute) to read, and print their resource use (registers, local memory per thread).

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python3 -m benchmarks.profile_cuda_mix [--dtype float16] [--layout channels_last]
"""
import argparse

import numpy as np
import torch

from kernels import mix_cuda
from kernels.masks import sample_masks

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--layout", default="channels_last")
    a = ap.parse_args()
    dev = torch.device("cuda")
    shape = (a.n, a.size, a.size, 3)
    v1 = torch.randint(0, 256, shape, dtype=torch.uint8, device=dev)
    v2 = torch.randint(0, 256, shape, dtype=torch.uint8, device=dev)
    masks = torch.from_numpy(sample_masks("block", 1, 8, 0.5, 0, 0, 0)).to(dev)
    perm = torch.roll(torch.arange(a.n, device=dev), 1)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.int16}[a.dtype]
    oshape = shape if a.layout == "channels_last" else (a.n, 3, a.size, a.size)
    outs = [torch.empty(oshape, dtype=tdt, device=dev) for _ in range(3)]
    for vec in (True, False):
        mix_cuda.fused_mix_cuda(v1, v2, masks, perm, MEAN, STD, *outs, layout=a.layout, vectorize=vec)
    torch.cuda.synchronize()
    for k in (mix_cuda._nhwc_vec, mix_cuda._nchw_vec, mix_cuda._nhwc_mix, mix_cuda._nchw_mix):
        for kern in k.overloads.values():
            print(k.__name__, "registers/thread", getattr(kern, "regs_per_thread", "?"),
                  "local bytes/thread", getattr(kern, "local_mem_per_thread", "?"),
                  "shared bytes/block", getattr(kern, "shared_mem_per_block", "?"))


if __name__ == "__main__":
    main()
