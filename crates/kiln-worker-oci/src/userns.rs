//! Whether this process runs in a user namespace other than the initial one (RootlessKit's
//! child, a rootless container), as BuildKit's `userns.RunningInUserNS` decides it.

use std::sync::OnceLock;

/// The `/proc/self/uid_map` of the initial user namespace: every uid mapped onto itself.
const INITIAL_UID_MAP: (u64, u64, u64) = (0, 0, 4_294_967_295);

/// Whether `uid_map` (the text of `/proc/self/uid_map`) describes a namespace other than the
/// initial one. An unreadable or empty map counts as the initial namespace.
pub fn uid_map_is_user_namespace(uid_map: &str) -> bool {
    let lines: Vec<&str> = uid_map.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return false;
    }
    if lines.len() > 1 {
        return true;
    }
    let fields: Vec<u64> = lines[0]
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.as_slice() != [INITIAL_UID_MAP.0, INITIAL_UID_MAP.1, INITIAL_UID_MAP.2]
}

/// Whether this process runs in a non-initial user namespace (read once, then remembered).
pub fn running_in_user_namespace() -> bool {
    static IN_USERNS: OnceLock<bool> = OnceLock::new();
    *IN_USERNS.get_or_init(|| {
        std::fs::read_to_string("/proc/self/uid_map")
            .map(|map| uid_map_is_user_namespace(&map))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_and_nested_maps() {
        assert!(!uid_map_is_user_namespace(
            "         0          0 4294967295\n"
        ));
        assert!(uid_map_is_user_namespace("0 1000 1\n"));
        assert!(uid_map_is_user_namespace("0 1000 1\n1 200000 65536\n"));
        assert!(!uid_map_is_user_namespace(""));
    }
}
