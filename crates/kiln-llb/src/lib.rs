//! kiln-llb (being written).
