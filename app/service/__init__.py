"""The service layer: decode, embed, score, decide, enrol, search; the API, the CLI, PACS sync and the
analysis commands all call it, and it knows nothing of HTTP (``app.api.status`` maps its errors to
status codes). One module per job: ``errors``, ``scoring`` (cosine, AS-norm scorer, operating
points), ``decoding`` (uploads, the decode budget), ``batcher``, ``results``, ``reid``
(``ReidService``) with ``alerts`` (alert review) and ``duplicates`` (the duplicates report) mixed in,
``ingest`` (one DICOM instance, for STOW-RS and PACS sync), ``enrollment`` (bulk enrol, reindex),
``webhook`` (alert notifications), ``keys`` (API keys), ``phi`` (what is stored of a DICOM file),
``clientargs`` and ``wiring`` (building the service from settings)."""
