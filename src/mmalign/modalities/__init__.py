"""Built-in modalities; importing this package registers them. A new modality is one file that calls
`register_modality` (see base.py)."""

from mmalign.modalities import audio, depth, image, imu, point, signal, video  # noqa: F401
from mmalign.modalities.base import MODALITIES, MediaError, Modality, get_modality, register_modality

__all__ = ["MODALITIES", "MediaError", "Modality", "get_modality", "register_modality"]
