//! kiln-containerd (being written).
