//! Multi-valued gRPC metadata the way BuildKit's filesync sends it: when any
//! value is not plain ASCII, every value is URL-query-escaped and
//! `<key>-encoded: 1` is added.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};

use crate::Error;

/// Characters Go's `url.QueryEscape` leaves alone are `A-Za-z0-9-_.~`; space
/// becomes `+` (handled separately).
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn query_escape(value: &str) -> String {
    utf8_percent_encode(value, QUERY)
        .to_string()
        .replace("%20", "+")
}

fn query_unescape(value: &str) -> String {
    let plus_as_space = value.replace('+', " ");
    percent_decode_str(&plus_as_space)
        .decode_utf8_lossy()
        .into_owned()
}

fn needs_encoding(value: &str) -> bool {
    !value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn key(name: &str) -> Result<AsciiMetadataKey, Error> {
    AsciiMetadataKey::from_bytes(name.as_bytes()).map_err(|_| Error::InvalidMetadata {
        key: name.to_string(),
    })
}

/// Appends one value per entry of `values` under `name`, escaping them all
/// when one of them is not printable ASCII.
pub(crate) fn append_values(
    map: &mut MetadataMap,
    name: &str,
    values: &[String],
) -> Result<(), Error> {
    let encode = values.iter().any(|v| needs_encoding(v));
    let metadata_key = key(name)?;
    for value in values {
        let text = if encode {
            query_escape(value)
        } else {
            value.clone()
        };
        let value: AsciiMetadataValue = text.parse().map_err(|_| Error::InvalidMetadata {
            key: name.to_string(),
        })?;
        map.append(metadata_key.clone(), value);
    }
    if encode {
        map.insert(
            key(&format!("{name}-encoded"))?,
            AsciiMetadataValue::from_static("1"),
        );
    }
    Ok(())
}

/// Inserts one printable-ASCII value.
pub(crate) fn insert_value(map: &mut MetadataMap, name: &str, value: &str) -> Result<(), Error> {
    let parsed: AsciiMetadataValue = value.parse().map_err(|_| Error::InvalidMetadata {
        key: name.to_string(),
    })?;
    map.insert(key(name)?, parsed);
    Ok(())
}

/// All values under `name`, decoded when `<name>-encoded: 1` is present.
/// Values that are not text are skipped.
pub(crate) fn read_values(map: &MetadataMap, name: &str) -> Vec<String> {
    let encoded = map
        .get(format!("{name}-encoded").as_str())
        .and_then(|v| v.to_str().ok())
        == Some("1");
    map.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| {
            if encoded {
                query_unescape(v)
            } else {
                v.to_string()
            }
        })
        .collect()
}

/// The first value under `name`, if it is text.
pub(crate) fn first_value(map: &MetadataMap, name: &str) -> Option<String> {
    map.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_are_sent_as_is() {
        let mut map = MetadataMap::new();
        append_values(&mut map, "include-patterns", &["a b".into(), "*.rs".into()]).unwrap();
        assert!(map.get("include-patterns-encoded").is_none());
        assert_eq!(read_values(&map, "include-patterns"), ["a b", "*.rs"]);
    }

    #[test]
    fn non_ascii_values_are_query_escaped_and_decoded() {
        let mut map = MetadataMap::new();
        let values = ["héllo wörld".to_string(), "x+y".to_string()];
        append_values(&mut map, "followpaths", &values).unwrap();
        assert_eq!(map.get("followpaths-encoded").unwrap(), "1");
        let raw: Vec<_> = map
            .get_all("followpaths")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert_eq!(raw, ["h%C3%A9llo+w%C3%B6rld", "x%2By"]);
        assert_eq!(read_values(&map, "followpaths"), values);
    }
}
