"""PACS integration beyond STOW-RS: pulling from a DICOMweb archive or an Orthanc change feed."""
