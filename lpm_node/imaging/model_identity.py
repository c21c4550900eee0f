"""Which model produced a result: named in every output (SR, SEG, key image, audit row, JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelIdentity:
    """The identity of a segmentation model: what a result's provenance and its output UIDs depend on."""

    name: str  # e.g. the model folder's dataset name ("Dataset001_Liver") or "phantom_liver"
    version: str  # e.g. "nnU-Net v2 3d_fullres fold 0, nnUNetTrainer, nnUNetPlans"
    weights_sha256: str  # checksum of the checkpoint file(s), hex
    test_model: bool = False  # True for the bundled phantom-trained model: never for clinical use

    def short(self) -> str:
        """One line for logs, SR text and the key image."""
        text = f"{self.name} ({self.version}, weights {self.weights_sha256[:12]})"
        return f"{text}, TEST MODEL, not for clinical use" if self.test_model else text

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return asdict(self)
