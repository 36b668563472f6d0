//! kiln-dockerfile (being written).
