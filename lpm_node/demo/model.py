"""The bundled phantom-trained nnU-Net v2 model: for tests and the demo only, never for patients."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL = "phantom_liver"
MODELS_DIR = Path(__file__).with_name("models")


def bundled_model_folder() -> Path:
    """The committed tiny phantom liver model (tests and demo only, not for patients)."""
    return MODELS_DIR / BUNDLED_MODEL
