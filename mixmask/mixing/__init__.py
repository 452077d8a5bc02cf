"""The masking family inside the input pipeline (docs/methods.md §2, §7): one file per method, selected
by ``mask.method``; MIXERS maps each name to its class (``from_config(cfg)`` builds it from the config
sections it lists in ``sections``). MixStage (stage.py) is what every loader backend calls."""

from mixmask.mixing.base import Keys, Mixer, Pixels, Views
from mixmask.mixing.mixmask import MixMask
from mixmask.mixing.mscn import MSCN, MSCNConfig
from mixmask.mixing.saliency import Saliency, SaliencyConfig, SaliencyMixMask
from mixmask.mixing.stage import MixStage, TokenMasking
from mixmask.mixing.unmix import UnMix, UnMixConfig, UnMixMixMask

MIXERS: dict[str, type[Mixer]] = {
    "mixmask": MixMask,
    "unmix": UnMix,
    "unmix_mixmask": UnMixMixMask,
    "mscn": MSCN,
    "saliency": Saliency,
    "saliency_mixmask": SaliencyMixMask,
}

__all__ = ["MIXERS", "Keys", "Mixer", "Pixels", "Views", "MixStage", "TokenMasking", "MixMask", "UnMix", "UnMixConfig", "UnMixMixMask",
           "MSCN", "MSCNConfig", "Saliency", "SaliencyConfig", "SaliencyMixMask"]
