"""WSOL data: wsolevaluation metadata, protocol transforms and data sets.

The synthetic data sets live in :mod:`mnpo.data.synthetic` (import it directly).
"""

from mnpo.data.metadata import MetadataError, SplitMetadata, read_split, write_split

__all__ = [
    "MetadataError",
    "SplitMetadata",
    "read_split",
    "write_split",
]
