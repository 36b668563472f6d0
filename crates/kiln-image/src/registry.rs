//! Registry pull (stub).
#[derive(Debug, thiserror::Error)]
/// A registry failure.
pub enum Error {}
