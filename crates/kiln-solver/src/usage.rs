//! Disk usage and pruning of the worker's snapshots, and garbage-collection policies.
//!
//! Records come from [`Worker::usage`](kiln_worker::Worker::usage). [`Filter`] is BuildKit's
//! filter syntax (containerd's): each string is `sel,sel,…` with every selector required
//! (`key==value`, `key!=value`, `key~=regex`, or a bare boolean `key`), and a record matches a
//! list of strings when it matches any of them. [`Solver::prune`](crate::Solver::prune) follows
//! BuildKit's cache manager: records in use are never removed; without `all`, `internal` and
//! `frontend` records and records shared with an image store are kept; `keep_duration` keeps
//! what was used (or made) within it; with `max_used_space` or `min_free_space` the least
//! recently and least often used records go first, until the total fits, and never below
//! `reserved_space`; without either every matching record goes.

use std::path::Path;
use std::time::{Duration, SystemTime};

use kiln_worker::SnapshotUsage;

/// A usage record filter; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Alternatives (OR), each a list of selectors (AND).
    alternatives: Vec<Vec<Selector>>,
}

#[derive(Debug, Clone)]
enum Selector {
    Equal(String, String),
    NotEqual(String, String),
    Regex(String, regex::Regex),
    Present(String),
}

/// A filter string that cannot be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid filter {filter:?}: {reason}")]
pub struct FilterError {
    /// The filter string.
    pub filter: String,
    /// What is wrong.
    pub reason: String,
}

impl Filter {
    /// Parses BuildKit filter strings; an empty list matches everything.
    pub fn parse(filters: &[String]) -> Result<Self, FilterError> {
        let mut alternatives = Vec::new();
        for filter in filters.iter().filter(|f| !f.trim().is_empty()) {
            let error = |reason: String| FilterError {
                filter: filter.clone(),
                reason,
            };
            let mut selectors = Vec::new();
            for part in filter.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let selector = if let Some((key, value)) = part.split_once("==") {
                    Selector::Equal(field(key), unquote(value))
                } else if let Some((key, value)) = part.split_once("!=") {
                    Selector::NotEqual(field(key), unquote(value))
                } else if let Some((key, value)) = part.split_once("~=") {
                    let regex = regex::Regex::new(&unquote(value))
                        .map_err(|e| error(format!("bad regular expression: {e}")))?;
                    Selector::Regex(field(key), regex)
                } else if let Some((key, value)) = part.split_once('=') {
                    // buildctl accepts `key=value` as equality.
                    Selector::Equal(field(key), unquote(value))
                } else if part.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                    Selector::Present(field(part))
                } else {
                    return Err(error(format!("cannot parse selector {part:?}")));
                };
                selectors.push(selector);
            }
            alternatives.push(selectors);
        }
        Ok(Self { alternatives })
    }

    /// Whether `record` matches.
    pub fn matches(&self, record: &SnapshotUsage) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|all| all.iter().all(|s| selector_matches(s, record)))
    }
}

fn field(key: &str) -> String {
    key.trim().to_ascii_lowercase()
}

fn unquote(value: &str) -> String {
    let value = value.trim();
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
        .to_string()
}

/// The value of a field of a record, as BuildKit's filter adaptor names them.
fn value(record: &SnapshotUsage, key: &str) -> Option<String> {
    let flag = |b: bool| b.then(|| "true".to_string());
    match key {
        "id" => Some(record.id.clone()),
        "parent" | "parents" => record.parent.clone(),
        "description" => Some(record.description.clone()),
        "type" | "recordtype" | "record-type" => Some(record.record_type.as_str().to_string()),
        "inuse" | "in-use" => flag(record.in_use),
        "mutable" => flag(record.mutable),
        "immutable" => flag(!record.mutable),
        "shared" => flag(record.shared),
        "private" => flag(!record.shared),
        _ => None,
    }
}

fn selector_matches(selector: &Selector, record: &SnapshotUsage) -> bool {
    match selector {
        Selector::Equal(key, expected) => value(record, key).is_some_and(|v| &v == expected),
        Selector::NotEqual(key, expected) => value(record, key).is_none_or(|v| &v != expected),
        Selector::Regex(key, regex) => value(record, key).is_some_and(|v| regex.is_match(&v)),
        Selector::Present(key) => value(record, key).is_some(),
    }
}

/// What a prune (or one garbage-collection policy) removes; BuildKit's `PruneInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneOptions {
    /// Also remove `internal`/`frontend` records and shared ones.
    pub all: bool,
    /// BuildKit filter strings (OR of ANDs).
    pub filters: Vec<String>,
    /// Keep records used within this long.
    pub keep_duration: Option<Duration>,
    /// Never prune the total below this many bytes.
    pub reserved_space: u64,
    /// Prune until the total is at most this many bytes (0 = no limit).
    pub max_used_space: u64,
    /// Prune until the disk has this many bytes free (0 = no limit).
    pub min_free_space: u64,
}

/// Total and free bytes of a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskStat {
    /// Size of the filesystem.
    pub total: u64,
    /// Bytes available to unprivileged users.
    pub free: u64,
}

impl DiskStat {
    /// The filesystem holding `path`.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let stat = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
        let block = stat.fragment_size() as u64;
        Ok(Self {
            total: stat.blocks() as u64 * block,
            free: stat.blocks_available() as u64 * block,
        })
    }
}

/// How many bytes may stay after a prune with space limits; `None` = no limit (prune every
/// matching record). BuildKit's `calculateKeepBytes`.
pub fn keep_bytes(total_size: u64, disk: DiskStat, options: &PruneOptions) -> Option<u64> {
    if options.max_used_space == 0 && options.min_free_space == 0 {
        return None;
    }
    // Without a max, only a lack of free space prunes: enough free space keeps everything.
    let mut keep = match options.max_used_space {
        0 => total_size,
        max => max,
    };
    if options.min_free_space > disk.free {
        let excess = options.min_free_space - disk.free;
        keep = keep.min(total_size.saturating_sub(excess));
    }
    Some(keep.max(options.reserved_space))
}

/// BuildKit's conversion of a percentage of the disk to bytes: rounded up to whole GiB, then
/// counted in (decimal) gigabytes — `(total * pct / 100 / 2^30 + 1) * 10^9`.
pub fn percent_of_disk(disk: DiskStat, percent: u64) -> u64 {
    (disk.total * percent / 100 / (1 << 30) + 1) * 1_000_000_000
}

/// Space limits of the default policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcLimits {
    /// `reservedSpace`.
    pub reserved_space: u64,
    /// `maxUsedSpace`.
    pub max_used_space: u64,
    /// `minFreeSpace`.
    pub min_free_space: u64,
}

impl GcLimits {
    /// The defaults when none is configured: reserved = min(10% of the disk, 10 GB),
    /// max used = min(80% of the disk, 100 GB), min free = 20% of the disk.
    pub fn default_for(disk: DiskStat) -> Self {
        Self {
            reserved_space: percent_of_disk(disk, 10).min(10_000_000_000),
            max_used_space: percent_of_disk(disk, 80).min(100_000_000_000),
            min_free_space: percent_of_disk(disk, 20),
        }
    }
}

/// BuildKit's `DefaultGCPolicy`: (1) local sources, cache mounts and git checkouts unused for
/// 48 h beyond 512 MB; (2) anything unused for 60 days beyond the limits; (3) anything beyond
/// the limits; (4) with `all`, anything beyond the limits. `limits` of all zero take the
/// defaults of [`GcLimits::default_for`]. The type filters are separate strings (OR): upstream
/// joined them with commas (AND), which matched nothing (moby/buildkit#6856).
pub fn default_gc_policy(limits: GcLimits, disk: DiskStat) -> Vec<PruneOptions> {
    let limits = if limits == GcLimits::default() {
        GcLimits::default_for(disk)
    } else {
        limits
    };
    let with_limits = |all: bool, keep_duration: Option<Duration>| PruneOptions {
        all,
        filters: Vec::new(),
        keep_duration,
        reserved_space: limits.reserved_space,
        max_used_space: limits.max_used_space,
        min_free_space: limits.min_free_space,
    };
    vec![
        PruneOptions {
            filters: vec![
                "type==source.local".into(),
                "type==exec.cachemount".into(),
                "type==source.git.checkout".into(),
            ],
            keep_duration: Some(Duration::from_secs(48 * 3600)),
            max_used_space: 512_000_000,
            ..Default::default()
        },
        with_limits(false, Some(Duration::from_secs(60 * 24 * 3600))),
        with_limits(false, None),
        with_limits(true, None),
    ]
}

/// Orders prune candidates: least recently used and least often used first (BuildKit sums
/// each record's rank in both orders).
pub(crate) fn sort_for_deletion(records: &mut [SnapshotUsage]) {
    let n = records.len();
    let last = |r: &SnapshotUsage| r.last_used.unwrap_or(r.created);
    let mut by_time: Vec<usize> = (0..n).collect();
    by_time.sort_by_key(|&i| last(&records[i]));
    let mut by_count: Vec<usize> = (0..n).collect();
    by_count.sort_by_key(|&i| records[i].usage_count);
    let mut rank = vec![0usize; n];
    for (position, &i) in by_time.iter().enumerate() {
        rank[i] += position;
    }
    for (position, &i) in by_count.iter().enumerate() {
        rank[i] += position;
    }
    let mut order: Vec<(usize, SystemTime, SnapshotUsage)> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (rank[i], last(r), r.clone()))
        .collect();
    order.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    for (slot, (_, _, r)) in records.iter_mut().zip(order) {
        *slot = r;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_worker::RecordType;

    fn record(id: &str, kind: RecordType, description: &str) -> SnapshotUsage {
        SnapshotUsage {
            id: id.into(),
            parent: None,
            size: 1,
            created: SystemTime::UNIX_EPOCH,
            last_used: None,
            usage_count: 0,
            in_use: false,
            record_type: kind,
            description: description.into(),
            mutable: kind == RecordType::ExecCacheMount,
            shared: false,
        }
    }

    #[test]
    fn filters_as_a_table() {
        let local = record("a1", RecordType::SourceLocal, "local source for context");
        let run = record(
            "b2",
            RecordType::Regular,
            "mount / from exec /bin/sh -c make",
        );
        let cache = record(
            "c3",
            RecordType::ExecCacheMount,
            "cached mount /root/.cache",
        );
        let cases: &[(&[&str], [bool; 3])] = &[
            (&[], [true, true, true]),
            (&["type==source.local"], [true, false, false]),
            (
                &["type==source.local", "type==exec.cachemount"],
                [true, false, true],
            ),
            (
                &["type==source.local,type==exec.cachemount"],
                [false, false, false],
            ),
            (&["id==b2"], [false, true, false]),
            (&["id!=b2"], [true, false, true]),
            (&["description~=^mount .*make$"], [false, true, false]),
            (&["description~=cache"], [false, false, true]),
            (&["mutable"], [false, false, true]),
            (&["immutable,type==regular"], [false, true, false]),
            (&["id=\"a1\""], [true, false, false]),
        ];
        for (filters, expected) in cases {
            let filter =
                Filter::parse(&filters.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
            let got = [&local, &run, &cache].map(|r| filter.matches(r));
            assert_eq!(&got, expected, "{filters:?}");
        }
        assert!(Filter::parse(&["description~=(".into()]).is_err());
        assert!(Filter::parse(&["a b".into()]).is_err());
    }

    #[test]
    fn keep_bytes_as_a_table() {
        let disk = DiskStat {
            total: 100,
            free: 30,
        };
        let opts = |reserved, max, min_free| PruneOptions {
            reserved_space: reserved,
            max_used_space: max,
            min_free_space: min_free,
            ..Default::default()
        };
        let cases = [
            (opts(0, 0, 0), None),
            (opts(50, 0, 0), None),
            (opts(0, 40, 0), Some(40)),
            (opts(0, 0, 50), Some(60 - 20)),
            (opts(0, 30, 50), Some(30)),
            (opts(0, 0, 20), Some(60)),
            (opts(45, 30, 50), Some(45)),
        ];
        for (options, expected) in cases {
            assert_eq!(keep_bytes(60, disk, &options), expected, "{options:?}");
        }
    }

    #[test]
    fn default_policy_as_a_table() {
        const GB: u64 = 1 << 30;
        // (disk total, reserved, max used, min free)
        let cases = [
            (50 * GB, 6_000_000_000, 41_000_000_000, 11_000_000_000),
            (500 * GB, 10_000_000_000, 100_000_000_000, 101_000_000_000),
            (GB, 1_000_000_000, 1_000_000_000, 1_000_000_000),
        ];
        for (total, reserved, max_used, min_free) in cases {
            let disk = DiskStat { total, free: 0 };
            let policy = default_gc_policy(GcLimits::default(), disk);
            assert_eq!(policy.len(), 4);
            assert_eq!(policy[0].max_used_space, 512_000_000);
            assert_eq!(policy[0].keep_duration, Some(Duration::from_secs(172_800)));
            assert_eq!(policy[0].filters.len(), 3);
            assert_eq!(
                policy[1].keep_duration,
                Some(Duration::from_secs(5_184_000))
            );
            assert!(!policy[2].all && policy[2].keep_duration.is_none());
            assert!(policy[3].all);
            for p in &policy[1..] {
                assert_eq!(
                    (p.reserved_space, p.max_used_space, p.min_free_space),
                    (reserved, max_used, min_free),
                    "disk {total}"
                );
            }
        }
        // Configured limits are kept as given.
        let limits = GcLimits {
            reserved_space: 1,
            max_used_space: 2,
            min_free_space: 3,
        };
        let policy = default_gc_policy(limits, DiskStat::default());
        assert_eq!(policy[3].max_used_space, 2);
        assert_eq!(policy[3].min_free_space, 3);
    }

    #[test]
    fn deletion_order_is_lru_then_least_used() {
        let mut a = record("old", RecordType::Regular, "");
        a.last_used = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(10));
        let mut b = record("new", RecordType::Regular, "");
        b.last_used = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000));
        b.usage_count = 5;
        let mut c = record("mid", RecordType::Regular, "");
        c.last_used = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(500));
        c.usage_count = 1;
        let mut records = vec![b, c, a];
        sort_for_deletion(&mut records);
        let ids: Vec<_> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["old", "mid", "new"]);
    }
}
