-- cxr-reid gallery on PostgreSQL, version 1: the SQLite schema of index/store.py with PostgreSQL
-- types, plus what many writers need: uniqueness the database enforces, and the change log
-- replicas follow (index/follow.py).
CREATE TABLE gallery_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE images (
    image_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- never reused
    patient_id TEXT,
    collection TEXT NOT NULL,
    source_path TEXT,
    blob_sha256 TEXT,                 -- set when the original is in the blob store
    sha256 TEXT,
    sop_instance_uid TEXT,
    study_instance_uid TEXT,
    view TEXT,
    study_date TEXT,
    split TEXT,
    tags TEXT NOT NULL DEFAULT '{}',  -- JSON object
    model_id TEXT NOT NULL,
    created_at TEXT NOT NULL,         -- ISO-8601 UTC
    vector BYTEA NOT NULL             -- float32 little-endian, unit norm
);
CREATE INDEX images_patient ON images (patient_id);
CREATE INDEX images_collection ON images (collection);
CREATE INDEX images_sha256 ON images (sha256);
CREATE INDEX images_blob ON images (blob_sha256);
-- a DICOM instance is stored once per collection, whichever replica or feed sends it
CREATE UNIQUE INDEX images_sop_instance ON images (collection, sop_instance_uid)
    WHERE sop_instance_uid IS NOT NULL;

CREATE TABLE reindex_staging (image_id BIGINT PRIMARY KEY, vector BYTEA NOT NULL);

CREATE TABLE calibrations (
    calibration_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1
);

CREATE TABLE alerts (
    alert_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    image_id BIGINT NOT NULL,
    collection TEXT NOT NULL,
    patient_id TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    other_patient_id TEXT,
    other_image_id BIGINT,
    own_best_score DOUBLE PRECISION,
    own_images INTEGER NOT NULL DEFAULT 0,
    operating_point TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'open',
    created_at TEXT NOT NULL,
    resolved_at TEXT,
    resolved_by TEXT,
    note TEXT,
    new_patient_id TEXT
);
CREATE INDEX alerts_state ON alerts (state, collection);
CREATE INDEX alerts_image ON alerts (image_id);

-- Every committed change a replica must apply to its in-memory index, in commit order: each
-- writer bumps the generation row of gallery_meta before it appends here, so the row lock orders
-- the appends and seq never lets a reader pass a change still being committed.
CREATE TABLE changes (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    generation BIGINT NOT NULL,
    kind TEXT NOT NULL,               -- add | delete | relabel | calibration | reindex
    image_ids BIGINT[] NOT NULL DEFAULT '{}',
    collections TEXT[] NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
