"""Dataset readers (one module per folder layout) and the synthetic 2AFC generator.

Every 2AFC dataset (``NightDataset``, ``BappsDataset``) yields the same item dict:
``{"ref", "x0", "x1"}`` -> (3, S, S) float32 tensors in [0, 1], ``"y"`` -> float64 scalar tensor
(fraction of judges preferring ``x1``), ``"id"``, ``"group"``, ``"family"`` -> str.
Nothing here touches the network.
"""

from .bapps import BAPPS_CATEGORIES, BappsDataset
from .errors import DatasetError
from .folders import ImageFolderDataset, list_images
from .night import NIGHT_SPLITS, NightDataset
from .synthetic import FAMILIES, SyntheticTriplet, make_2afc
from .views import VIEW_MODES, DistillDataset, DistillViews

__all__ = [
    "BAPPS_CATEGORIES",
    "BappsDataset",
    "DatasetError",
    "DistillDataset",
    "DistillViews",
    "FAMILIES",
    "ImageFolderDataset",
    "NIGHT_SPLITS",
    "NightDataset",
    "SyntheticTriplet",
    "VIEW_MODES",
    "list_images",
    "make_2afc",
]
