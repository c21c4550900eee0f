"""Intake: the DICOM listener, the durable spool, series assembly and the eligibility rules."""
