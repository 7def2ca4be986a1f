"""fedseg: federated BraTS-style brain-tumour segmentation with Flower and MONAI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedseg")
except PackageNotFoundError:  # running from a Flower app bundle, not an installed package
    __version__ = "0+bundle"
