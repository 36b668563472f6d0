//! The keys both `[worker.oci]` and `[worker.containerd]` share with buildkitd (reference §4.3):
//! `max-parallelism` and the garbage-collection settings (`reservedSpace`, `maxUsedSpace`,
//! `minFreeSpace`, the deprecated `gckeepstorage`, and `[[gcpolicy]]` tables).
//!
//! A disk space is an integer (bytes), a size string (`"512MB"`, binary units as buildkitd's
//! parser: `MB` = 2^20 bytes) or a percentage of the disk holding the root (`"20%"`). A
//! `keepDuration` is an integer (seconds) or a Go duration string (`"48h"`, `"1h30m"`).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use kiln_proto::moby::buildkit::v1::types::GcPolicy;
use kiln_solver::usage::percent_of_disk;
use kiln_solver::{DiskStat, GcLimits};
use serde::Deserialize;

/// The shared worker keys, flattened into each worker table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WorkerTuning {
    /// How many exec and file ops may run at once (unset or 0 = unbounded).
    #[serde(rename = "max-parallelism")]
    pub max_parallelism: Option<usize>,
    /// Deprecated alias of `reservedSpace`.
    pub gckeepstorage: Option<DiskSpace>,
    /// Never prune the cache below this.
    #[serde(rename = "reservedSpace")]
    pub reserved_space: Option<DiskSpace>,
    /// Prune the cache down to this.
    #[serde(rename = "maxUsedSpace")]
    pub max_used_space: Option<DiskSpace>,
    /// Prune while the disk has less free than this.
    #[serde(rename = "minFreeSpace")]
    pub min_free_space: Option<DiskSpace>,
    /// Explicit policies, replacing the default ones.
    pub gcpolicy: Vec<GcPolicyConfig>,
}

/// One `[[worker.*.gcpolicy]]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct GcPolicyConfig {
    /// Also prune internal and shared records.
    pub all: bool,
    /// BuildKit filter strings.
    pub filters: Vec<String>,
    /// Keep records used within this long.
    #[serde(rename = "keepDuration")]
    pub keep_duration: Option<KeepDuration>,
    /// Deprecated alias of `reservedSpace`.
    #[serde(rename = "keepBytes")]
    pub keep_bytes: Option<DiskSpace>,
    /// Never prune below this.
    #[serde(rename = "reservedSpace")]
    pub reserved_space: Option<DiskSpace>,
    /// Prune down to this.
    #[serde(rename = "maxUsedSpace")]
    pub max_used_space: Option<DiskSpace>,
    /// Prune while the disk has less free than this.
    #[serde(rename = "minFreeSpace")]
    pub min_free_space: Option<DiskSpace>,
}

/// A disk space as written in the TOML file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum DiskSpace {
    /// Bytes.
    Bytes(u64),
    /// `"512MB"` or `"20%"`.
    Text(String),
}

/// A keep duration as written in the TOML file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum KeepDuration {
    /// Seconds.
    Seconds(u64),
    /// A Go duration string.
    Text(String),
}

impl DiskSpace {
    /// The space in bytes on `disk`.
    pub fn bytes(&self, disk: DiskStat) -> anyhow::Result<u64> {
        let text = match self {
            DiskSpace::Bytes(bytes) => return Ok(*bytes),
            DiskSpace::Text(text) => text.trim(),
        };
        if let Some(percent) = text.strip_suffix('%') {
            let percent: u64 = percent
                .trim()
                .parse()
                .with_context(|| format!("invalid disk space {text:?}"))?;
            if percent > 100 {
                bail!("invalid disk space {text:?}: more than 100%");
            }
            return Ok(percent_of_disk(disk, percent));
        }
        parse_size(text)
    }
}

/// `"512MB"`, `"10g"`, `"1.5GiB"`, `"4096"`: binary multiples, case-insensitive, as buildkitd
/// (docker's `RAMInBytes`).
fn parse_size(text: &str) -> anyhow::Result<u64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("invalid disk space {text:?}"))?;
    let power = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 1,
        "m" | "mb" | "mib" => 2,
        "g" | "gb" | "gib" => 3,
        "t" | "tb" | "tib" => 4,
        "p" | "pb" | "pib" => 5,
        other => bail!("invalid disk space {text:?}: unknown unit {other:?}"),
    };
    Ok((number * 1024f64.powi(power)) as u64)
}

impl KeepDuration {
    /// The duration.
    pub fn duration(&self) -> anyhow::Result<Duration> {
        match self {
            KeepDuration::Seconds(seconds) => Ok(Duration::from_secs(*seconds)),
            KeepDuration::Text(text) => parse_go_duration(text),
        }
    }
}

/// Go's `time.ParseDuration` forms: `48h`, `1h30m`, `90s`, `1.5h`, `500ms`.
fn parse_go_duration(text: &str) -> anyhow::Result<Duration> {
    let invalid = || anyhow::anyhow!("invalid duration {text:?}");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let number: f64 = rest[..split].parse().map_err(|_| invalid())?;
        rest = &rest[split..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

impl WorkerTuning {
    /// The garbage-collection policies for the disk holding `root`: the configured ones, or
    /// buildkitd's defaults with the configured limits.
    pub fn gc_policy(&self, root: &Path) -> anyhow::Result<Vec<GcPolicy>> {
        let disk = DiskStat::of(root).unwrap_or_default();
        let space = |value: &Option<DiskSpace>| -> anyhow::Result<u64> {
            value.as_ref().map_or(Ok(0), |v| v.bytes(disk))
        };
        if self.gcpolicy.is_empty() {
            let reserved = match &self.reserved_space {
                Some(_) => space(&self.reserved_space)?,
                None => space(&self.gckeepstorage)?,
            };
            let limits = GcLimits {
                reserved_space: reserved,
                max_used_space: space(&self.max_used_space)?,
                min_free_space: space(&self.min_free_space)?,
            };
            return Ok(crate::usage::default_gc_policy(root, limits));
        }
        self.gcpolicy
            .iter()
            .map(|p| {
                let reserved = match &p.reserved_space {
                    Some(_) => space(&p.reserved_space)?,
                    None => space(&p.keep_bytes)?,
                };
                let keep = match &p.keep_duration {
                    Some(keep) => keep.duration()?,
                    None => Duration::ZERO,
                };
                Ok(GcPolicy {
                    all: p.all,
                    filters: p.filters.clone(),
                    keep_duration: i64::try_from(keep.as_nanos()).unwrap_or(i64::MAX),
                    reserved_space: signed(reserved),
                    max_used_space: signed(space(&p.max_used_space)?),
                    min_free_space: signed(space(&p.min_free_space)?),
                })
            })
            .collect()
    }
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuning(toml_text: &str) -> WorkerTuning {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn sizes_and_durations_as_buildkitd_reads_them() {
        let disk = DiskStat {
            total: 100 << 30,
            free: 50 << 30,
        };
        let cases = [
            (DiskSpace::Bytes(4096), 4096),
            (DiskSpace::Text("512MB".into()), 512 << 20),
            (DiskSpace::Text("10g".into()), 10 << 30),
            (DiskSpace::Text("1.5GiB".into()), 3 << 29),
            // 10% of 100 GiB = 10 GiB → (10 + 1) decimal GB.
            (DiskSpace::Text("10%".into()), 11_000_000_000),
        ];
        for (space, bytes) in cases {
            assert_eq!(space.bytes(disk).unwrap(), bytes, "{space:?}");
        }
        assert!(DiskSpace::Text("12 parsecs".into()).bytes(disk).is_err());
        assert!(DiskSpace::Text("120%".into()).bytes(disk).is_err());
        assert_eq!(
            parse_go_duration("1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_go_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert!(parse_go_duration("48 hours").is_err());
    }

    #[test]
    fn configured_policies_replace_the_defaults() {
        let root = tempfile::tempdir().unwrap();
        let config = tuning(
            r#"
max-parallelism = 3
[[gcpolicy]]
filters = ["type==source.local"]
keepDuration = "48h"
maxUsedSpace = "512MB"
[[gcpolicy]]
all = true
keepDuration = 3600
reservedSpace = 1000
"#,
        );
        assert_eq!(config.max_parallelism, Some(3));
        let policy = config.gc_policy(root.path()).unwrap();
        assert_eq!(policy.len(), 2);
        assert_eq!(policy[0].filters, vec!["type==source.local"]);
        assert_eq!(policy[0].keep_duration, 48 * 3600 * 1_000_000_000);
        assert_eq!(policy[0].max_used_space, 512 << 20);
        assert!(policy[1].all);
        assert_eq!(policy[1].keep_duration, 3600 * 1_000_000_000);
        assert_eq!(policy[1].reserved_space, 1000);
    }

    #[test]
    fn limits_feed_the_default_policies() {
        let root = tempfile::tempdir().unwrap();
        let policy = tuning("gckeepstorage = 2000\nmaxUsedSpace = 9000\n")
            .gc_policy(root.path())
            .unwrap();
        assert_eq!(policy.len(), 4, "buildkitd's four default policies");
        assert_eq!(policy[3].reserved_space, 2000);
        assert_eq!(policy[3].max_used_space, 9000);
        assert!(policy[3].all);
        let defaults = WorkerTuning::default().gc_policy(root.path()).unwrap();
        assert_ne!(defaults[3].max_used_space, 9000);
    }
}
