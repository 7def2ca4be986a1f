"""BraTS evaluation regions from canonical labels, declared as data.

Canonical labels (BraTS 2023): 1 NETC, 2 SNFH, 3 ET. The regions nest: ET within TC within WT.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

REGIONS: dict[str, tuple[int, ...]] = {
    "WT": (1, 2, 3),  # whole tumour
    "TC": (1, 3),  # tumour core
    "ET": (3,),  # enhancing tumour
}
REGION_NAMES: tuple[str, ...] = tuple(REGIONS)


def region_masks(labels: NDArray[np.integer]) -> NDArray[np.bool_]:
    """Stack the region masks of a canonical label map: shape ``(3, *labels.shape)``."""
    return np.stack([np.isin(labels, values) for values in REGIONS.values()])


def regions_to_labels(masks: NDArray[np.bool_]) -> NDArray[np.uint8]:
    """Turn (possibly inconsistent) WT/TC/ET masks into one canonical label map.

    Nesting is enforced the BraTS way: TC only inside WT, ET only inside TC, so the result
    is always a valid label map whatever the three independent sigmoid outputs said.
    """
    wt, tc, et = (masks[i].astype(bool) for i in range(3))
    labels = np.zeros(wt.shape, dtype=np.uint8)
    labels[wt] = 2
    labels[wt & tc] = 1
    labels[wt & tc & et] = 3
    return labels
