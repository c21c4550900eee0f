"""The one functional-group reader, as the loader and the writers use it (PS3.3 C.7.6.16)."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from lpm_node.answer.source import frame_orientation, frame_pixel_spacing
from lpm_node.core.frames import frame_rescale, functional_group_value, number_of_frames


def _item(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _enhanced() -> Dataset:
    """Two frames: rescale per frame (frame 1's item lacks the intercept), orientation and spacing shared."""
    ds = Dataset()
    ds.NumberOfFrames = 2
    frame0 = _item(PixelValueTransformationSequence=Sequence([_item(RescaleSlope=1, RescaleIntercept=-1024)]))
    frame1 = _item(PixelValueTransformationSequence=Sequence([_item(RescaleSlope=2)]))
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame0, frame1])
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=[0.7, 0.8])]),
        PixelValueTransformationSequence=Sequence([_item(RescaleSlope=1, RescaleIntercept=-1000)]),
    )])
    return ds


def test_per_frame_first_then_shared_then_none() -> None:
    ds = _enhanced()
    assert functional_group_value(ds, 0, "PixelValueTransformationSequence", "RescaleIntercept") == -1024
    # frame 1's per-frame item has no intercept: the shared one is not hidden by it
    assert functional_group_value(ds, 1, "PixelValueTransformationSequence", "RescaleIntercept") == -1000
    assert functional_group_value(ds, 1, "PixelValueTransformationSequence", "RescaleSlope") == 2
    assert list(functional_group_value(ds, 1, "PixelMeasuresSequence", "PixelSpacing")) == [0.7, 0.8]
    assert functional_group_value(ds, 5, "PlanePositionSequence", "ImagePositionPatient") is None
    assert functional_group_value(Dataset(), 0, "PixelMeasuresSequence", "PixelSpacing") is None


def test_writers_read_enhanced_and_single_frame_alike() -> None:
    ds = _enhanced()
    assert frame_rescale(ds, 0) == (1.0, -1024.0) and frame_rescale(ds, 1) == (2.0, -1000.0)
    assert frame_orientation(ds, 1) == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert frame_pixel_spacing(ds, 0) == (0.7, 0.8)
    single = _item(RescaleSlope=1, RescaleIntercept=-1024, ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
                   PixelSpacing=[0.5, 0.5])
    assert frame_rescale(single, 0) == (1.0, -1024.0)
    assert frame_orientation(single, 0) == (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    assert frame_pixel_spacing(single, 0) == (0.5, 0.5)


def test_number_of_frames_of_any_header() -> None:
    assert number_of_frames(_enhanced()) == 2
    assert number_of_frames(Dataset()) == 1
    for bad in ("", "0", "-3"):
        ds = Dataset()
        ds.NumberOfFrames = bad
        assert number_of_frames(ds) == 1, bad
