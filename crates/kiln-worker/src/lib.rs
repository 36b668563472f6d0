//! kiln-worker (being written).
