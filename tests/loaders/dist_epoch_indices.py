"""Run under `accelerate launch --cpu --num_processes 2`: each rank writes the sample indices its
training loader yields in epochs 0 and 1 to <out>/rank<r>.json (used by test_distributed.py)."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from mixmask.mixing import MixStage
from loaders.folder import index_split
from loaders.torchvision_backend import AugParams, TorchvisionTrainLoader

root, out = Path(sys.argv[1]), Path(sys.argv[2])
acc = Accelerator(cpu=True)
stage = MixStage((0.5,) * 3, (0.5,) * 3, rank=acc.process_index)
loader = TorchvisionTrainLoader(
    index_split(root, "train"), AugParams(16), stage, batch_size=8,
    rank=acc.process_index, world=acc.num_processes, workers=1,
)
seen = {}
for epoch in (0, 1):
    loader.set_epoch(epoch)
    seen[epoch] = [i for b in loader for i in b.index.tolist()]
# all ranks must have the same number of batches: gather the counts through the process group
counts = acc.gather(torch.tensor([len(seen[0]), len(seen[1])]))
(out / f"rank{acc.process_index}.json").write_text(json.dumps({"seen": seen, "counts": counts.tolist()}))
