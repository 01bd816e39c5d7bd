"""Teachers: frozen image networks whose embeddings a LipSim student is distilled into.

One interface (``Teacher``): ``forward(x)`` takes ``(B, 3, H, W)`` float RGB in **[0, 1]** (H, W >= 32)
and returns ``(B, dim)`` float32 embeddings; ``name`` and ``dim`` describe it.

==========================  =====  ==================================================================
name                        dim    what
==========================  =====  ==================================================================
mobilenet_v2                1280   MobileNetV2 (ImageNet), pooled last features, unit norm
mobilenet_v2-multistage     1432   pooled features 3/6/13/18, each unit norm, concatenated, unit norm
efficientnet_lite0 (1, 2)   1280   EfficientNet-Lite (ImageNet), pooled head features, unit norm
offline-ensemble            2712   multistage MobileNetV2 + Lite0, DreamSim-style concatenation
(alias ``ensemble``)
dreamsim[:type]             1792   adapter over the dreamsim package (weights must already be on disk)
<cache folder>              any    ``CachedTeacher``: precomputed embeddings, ``lookup(keys)``
==========================  =====  ==================================================================
"""

from .base import Teacher
from .cache import CachedTeacher, EmbeddingCache, build_embedding_cache
from .registry import available_teachers, get_teacher

__all__ = [
    "CachedTeacher",
    "EmbeddingCache",
    "Teacher",
    "available_teachers",
    "build_embedding_cache",
    "get_teacher",
]
