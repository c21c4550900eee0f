"""lpm-node: a DICOM node that measures liver attenuation on unenhanced chest CT."""

__version__ = "0.1.0"

ALGORITHM_NAME = "lpm-node DL-parenchymal"
