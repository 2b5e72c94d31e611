"""PACS integration beyond STOW-RS: pulling from a DICOMweb archive or an Orthanc change feed
(:mod:`app.pacs.sync`), and receiving DICOM C-STORE beside the HTTP service (:mod:`app.pacs.dimse`)."""
