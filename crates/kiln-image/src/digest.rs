//! Content digests (`sha256:<hex>`) and hashing helpers.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A content digest. Only `sha256` is supported for now.
///
/// The textual form is `sha256:` followed by 64 lowercase hex digits; it is also the serde form.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest {
    hex: String,
}

/// A string that is not a valid digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The algorithm prefix is missing or not `sha256`.
    #[error(
        "invalid digest {value:?}: unsupported or missing algorithm (only sha256 is supported)"
    )]
    Algorithm {
        /// The rejected input.
        value: String,
    },
    /// The hex part is not 64 lowercase hex digits.
    #[error("invalid digest {value:?}: expected 64 lowercase hex digits")]
    Hex {
        /// The rejected input.
        value: String,
    },
}

impl Digest {
    /// The only algorithm supported.
    pub const ALGORITHM: &'static str = "sha256";

    /// The sha256 digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self::from_sha256(Sha256::digest(data).into())
    }

    /// A digest from its 64 lowercase hex digits (without the `sha256:` prefix).
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Hex {
                value: hex.to_owned(),
            });
        }
        Ok(Self {
            hex: hex.to_owned(),
        })
    }

    fn from_sha256(bytes: [u8; 32]) -> Self {
        Self {
            hex: hex::encode(bytes),
        }
    }

    /// The algorithm name (`sha256`).
    pub fn algorithm(&self) -> &'static str {
        Self::ALGORITHM
    }

    /// The 64 lowercase hex digits.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestError::Algorithm {
                value: s.to_owned(),
            })?;
        Self::from_hex(hex).map_err(|_| DigestError::Hex {
            value: s.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest(sha256:{})", self.hex)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental sha256 hasher that also counts the bytes it saw.
#[derive(Clone, Default)]
pub struct Hasher {
    sha: Sha256,
    size: u64,
}

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.size += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest of everything fed so far (the hasher can keep going).
    pub fn digest(&self) -> Digest {
        Digest::from_sha256(self.sha.clone().finalize().into())
    }

    /// The digest and size of everything fed.
    pub fn finish(self) -> (Digest, u64) {
        (Digest::from_sha256(self.sha.finalize().into()), self.size)
    }
}

/// A `Write` wrapper that hashes and counts every byte written through it to `inner`.
pub struct DigestWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> DigestWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.hasher.size()
    }

    /// The digest of the bytes written so far.
    pub fn digest(&self) -> Digest {
        self.hasher.digest()
    }

    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Returns the inner writer with the digest and size of everything written.
    pub fn finish(self) -> (W, Digest, u64) {
        let (digest, size) = self.hasher.finish();
        (self.inner, digest, size)
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_empty_input() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY);
    }

    #[test]
    fn parse_round_trips_and_validates() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(Digest::from_hex(&EMPTY[7..]).unwrap(), d);
        assert!(matches!(
            "sha512:abcd".parse::<Digest>(),
            Err(DigestError::Algorithm { .. })
        ));
        assert!(matches!(
            EMPTY
                .to_uppercase()
                .replace("SHA256", "sha256")
                .parse::<Digest>(),
            Err(DigestError::Hex { .. })
        ));
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!(Digest::from_hex(&"g".repeat(64)).is_err());
    }

    #[test]
    fn serde_is_a_string() {
        let d = Digest::of(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:00\"").is_err());
    }

    #[test]
    fn digest_writer_hashes_and_counts() {
        let mut w = DigestWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        assert_eq!(w.digest(), Digest::of(b"hello world"));
        let (inner, digest, size) = w.finish();
        assert_eq!(inner, b"hello world");
        assert_eq!(digest, Digest::of(b"hello world"));
        assert_eq!(size, 11);
    }
}
