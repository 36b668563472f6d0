//! kiln-testkit (being written).
