//! kiln-worker-oci (being written).
