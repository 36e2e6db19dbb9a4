"""Data access: datastores (local and DICOMweb), DICOM-SEG, image and label files, dataset archives."""
