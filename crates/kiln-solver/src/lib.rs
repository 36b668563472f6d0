//! kiln-solver (being written).
