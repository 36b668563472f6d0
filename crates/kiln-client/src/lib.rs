//! kiln-client (being written).
