"""Dataset layouts: one reader class per layout, all implementing `SegmentationSource`.

`open_source(root, split)` detects the layout of `root` (or takes the one named) and returns a
source whose items are read from disk when asked; `LAYOUTS` is the registry, so adding a layout
touches its own module and one line here.
"""

from noisyseg.data.datasets.base import (
    LAYOUTS,
    SegmentationSource,
    detect_layout,
    open_source,
    resolve_layout,
)

# Importing a layout registers it, so this order is `detect_layout`'s order.
# isort: off
from noisyseg.data.datasets.folder import FolderSource
from noisyseg.data.datasets.cityscapes import CityscapesSource
from noisyseg.data.datasets.voc import VocSource

# isort: on

__all__ = [
    "LAYOUTS",
    "CityscapesSource",
    "FolderSource",
    "SegmentationSource",
    "VocSource",
    "detect_layout",
    "open_source",
    "resolve_layout",
]
