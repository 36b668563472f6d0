//! kiln-session (being written).
