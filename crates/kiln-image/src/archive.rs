//! Archive (stub).
#[derive(Debug, thiserror::Error)]
/// An archive failure.
pub enum Error {}
