"""The frameworks registry: ``model.framework`` -> the framework class (docs/methods.md §4).

Each class is built as ``FRAMEWORKS[name](section, arch=..., stem=..., seed=..., group=...)`` where
``section`` is its config dataclass (``cls.Config``, defined beside its code and aggregated into
mixmask.config.Config under the same name). Nothing else names a framework.
"""

from mixmask.frameworks.barlow_twins import BarlowTwins
from mixmask.frameworks.base import Framework
from mixmask.frameworks.byol import BYOL
from mixmask.frameworks.cmae import CMAE
from mixmask.frameworks.moco_v2 import MoCoV2
from mixmask.frameworks.simclr import SimCLR
from mixmask.frameworks.simsiam import SimSiam

FRAMEWORKS: dict[str, type[Framework]] = {
    "moco_v2": MoCoV2,
    "simclr": SimCLR,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlow_twins": BarlowTwins,
    "cmae": CMAE,
}

__all__ = ["FRAMEWORKS", "Framework"]
