"""Imaging: DICOM to an HU volume, resampling to the method grid, liver segmentation and the measurement."""
