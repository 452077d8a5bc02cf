"""Losses, one file each; all run in float32 under autocast (precision.py); the MixMask credit (credit.py)."""

from mixmask.losses.barlow_twins import barlow_twins, standardize
from mixmask.losses.cosine import negative_cosine, normalized_mse
from mixmask.losses.credit import area_credited
from mixmask.losses.info_nce import info_nce, info_nce_batch
from mixmask.losses.mae import masked_mse, position_ce
from mixmask.losses.nt_xent import nt_xent
from mixmask.losses.precision import float32, normalize

__all__ = ["area_credited", "barlow_twins", "float32", "info_nce", "info_nce_batch", "masked_mse", "negative_cosine", "normalize",
           "normalized_mse", "nt_xent", "position_ce", "standardize"]
