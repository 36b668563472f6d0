//! `kiln builder prune|du|info`: build-cache administration and a report of
//! how kiln finds its daemon and lands images.

use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use kiln_client::{UsageRecord, WorkerRecord};
use kiln_containerd::Containerd;

use crate::build::{find_daemon, plan_output, ContainerdView, Globals, Landing, DAEMON_TIMEOUT};
use crate::cli::{DaemonArgs, PruneArgs};
use crate::discovery::{self, DiscoveryEnv, Plan};

/// go-units' `BytesSize`: binary units, four significant digits (`1.5KiB`).
pub fn bytes_size(size: i64) -> String {
    custom_size(
        size,
        1024.0,
        &["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"],
    )
}

/// go-units' `HumanSize`: decimal units, four significant digits (`1.5kB`).
pub fn human_size(size: i64) -> String {
    custom_size(
        size,
        1000.0,
        &["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"],
    )
}

fn custom_size(size: i64, base: f64, units: &[&str]) -> String {
    let mut value = size.max(0) as f64;
    let mut unit = 0;
    while value >= base && unit < units.len() - 1 {
        value /= base;
        unit += 1;
    }
    format!("{}{}", four_significant(value), units[unit])
}

/// C's `%.4g` for values below 10000 (all `custom_size` produces).
fn four_significant(value: f64) -> String {
    if value == 0.0 {
        return "0".to_string();
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (3 - magnitude).max(0) as usize;
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// go-units' `HumanDuration`.
pub fn human_duration(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    let minutes = seconds / 60;
    let hours = ((elapsed.as_secs_f64() / 3600.0) + 0.5) as u64;
    if seconds < 1 {
        "Less than a second".to_string()
    } else if seconds == 1 {
        "1 second".to_string()
    } else if seconds < 60 {
        format!("{seconds} seconds")
    } else if minutes == 1 {
        "About a minute".to_string()
    } else if minutes < 60 {
        format!("{minutes} minutes")
    } else if hours == 1 {
        "About an hour".to_string()
    } else if hours < 48 {
        format!("{hours} hours")
    } else if hours < 24 * 7 * 2 {
        format!("{} days", hours / 24)
    } else if hours < 24 * 30 * 2 {
        format!("{} weeks", hours / 24 / 7)
    } else if hours < 24 * 365 * 2 {
        format!("{} months", hours / 24 / 30)
    } else {
        format!("{} years", hours / 24 / 365)
    }
}

/// The confirmation prompt of `nerdctl builder prune` (double period upstream).
pub fn prune_prompt(all: bool) -> String {
    let what = if all { "all" } else { "any dangling" };
    format!(
        "WARNING! This will remove {what} build cache..\nAre you sure you want to continue? [y/N] "
    )
}

/// `Total:  <size>` of the records a prune removed.
pub fn prune_total(removed: &[UsageRecord]) -> String {
    let total: i64 = removed.iter().map(|r| r.size).sum();
    format!("Total:  {}", bytes_size(total))
}

/// `buildctl du`'s table: `ID` (`*` = mutable), `RECLAIMABLE` (not in use),
/// `SIZE` (`*` = shared), `LAST ACCESSED`, then the reclaimable and total sums.
pub fn du_table(records: &[UsageRecord], now: SystemTime) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "RECLAIMABLE".to_string(),
        "SIZE".to_string(),
        "LAST ACCESSED".to_string(),
    ]];
    for record in records {
        let mut id = record.id.clone();
        if record.mutable {
            id.push('*');
        }
        let mut size = human_size(record.size);
        if record.shared {
            size.push('*');
        }
        let last = record
            .last_used_at
            .as_ref()
            .and_then(|t| SystemTime::try_from(*t).ok())
            .map(|t| {
                format!(
                    "{} ago",
                    human_duration(now.duration_since(t).unwrap_or_default())
                )
            })
            .unwrap_or_default();
        rows.push([id, (!record.in_use).to_string(), size, last]);
    }
    let mut out = tabulate(&rows);
    let reclaimable: i64 = records.iter().filter(|r| !r.in_use).map(|r| r.size).sum();
    let total: i64 = records.iter().map(|r| r.size).sum();
    out.push_str(&tabulate(&[
        ["Reclaimable:".to_string(), human_size(reclaimable)],
        ["Total:".to_string(), human_size(total)],
    ]));
    out
}

/// Left-aligned columns separated by at least one space (Go's tabwriter
/// with padding 1), no trailing spaces.
fn tabulate<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < N {
                let pad = widths[i] - cell.chars().count() + 1;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The daemon's status as a user-facing error: an `Unimplemented` answer
/// says the daemon cannot do this yet.
fn daemon_error(what: &str, host: &str, err: kiln_client::Error) -> anyhow::Error {
    if let Some(status) = err.status() {
        if status.code() == tonic_code_unimplemented() {
            return anyhow::anyhow!(
                "the build daemon at {host} does not support {what} yet: {}",
                status.message()
            );
        }
    }
    anyhow::Error::new(err).context(format!("{what} failed on {host}"))
}

fn tonic_code_unimplemented() -> kiln_client::Code {
    kiln_client::Code::Unimplemented
}

/// `kiln builder prune [-a] [-f]`.
pub async fn prune(globals: &Globals, args: &PruneArgs) -> anyhow::Result<()> {
    let host = find_daemon(args.daemon.buildkit_host.as_deref(), &globals.namespace).await?;
    if !args.force {
        eprint!("{}", prune_prompt(args.all));
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y") {
            return Ok(());
        }
    }
    let mut client = kiln_client::connect(&host, DAEMON_TIMEOUT).await?;
    let removed = kiln_client::prune(&mut client, args.all)
        .await
        .map_err(|e| daemon_error("prune", &host, e))?;
    println!("{}", prune_total(&removed));
    Ok(())
}

/// `kiln builder du`.
pub async fn du(globals: &Globals, args: &DaemonArgs) -> anyhow::Result<()> {
    let host = find_daemon(args.buildkit_host.as_deref(), &globals.namespace).await?;
    let mut client = kiln_client::connect(&host, DAEMON_TIMEOUT).await?;
    let records = kiln_client::disk_usage(&mut client)
        .await
        .map_err(|e| daemon_error("disk usage", &host, e))?;
    print!("{}", du_table(&records, SystemTime::now()));
    Ok(())
}

/// One discovery attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The address tried.
    pub host: String,
    /// `Ok(workers)` or the ping error.
    pub result: Result<Vec<WorkerRecord>, String>,
}

/// What `kiln builder info` found.
#[derive(Debug, Clone)]
pub struct InfoReport {
    /// Why these candidates (flag, environment, per-namespace sockets).
    pub source: String,
    /// Every candidate tried, in order.
    pub attempts: Vec<Attempt>,
    /// The landing decision for the chosen daemon, with its reason, or why
    /// it could not be made.
    pub landing: Option<Result<(Landing, String), String>>,
}

/// Renders the info report.
pub fn render_info(report: &InfoReport) -> String {
    let mut out = String::new();
    let chosen = report.attempts.iter().find(|a| a.result.is_ok());
    match chosen {
        Some(attempt) => out.push_str(&format!("Daemon: {}\n", attempt.host)),
        None => out.push_str("Daemon: none answered\n"),
    }
    out.push_str(&format!("  chosen from: {}\n", report.source));
    out.push_str("Candidates tried:\n");
    for attempt in &report.attempts {
        match &attempt.result {
            Ok(_) => out.push_str(&format!("  {}: ok\n", attempt.host)),
            Err(e) => out.push_str(&format!("  {}: {e}\n", attempt.host)),
        }
    }
    if let Some(Attempt {
        result: Ok(workers),
        ..
    }) = chosen
    {
        out.push_str("Workers:\n");
        for (i, worker) in workers.iter().enumerate() {
            out.push_str(&format!("  [{i}] {}\n", worker.id));
            let platforms: Vec<String> = worker
                .platforms
                .iter()
                .map(|p| {
                    let mut s = format!("{}/{}", p.os, p.architecture);
                    if !p.variant.is_empty() {
                        s.push('/');
                        s.push_str(&p.variant);
                    }
                    s
                })
                .collect();
            out.push_str(&format!("    platforms: {}\n", platforms.join(", ")));
            out.push_str("    labels:\n");
            for (key, value) in &worker.labels {
                out.push_str(&format!("      {key}={value}\n"));
            }
        }
    }
    match &report.landing {
        Some(Ok((Landing::Direct, reason))) => {
            out.push_str(&format!("Images land: directly in containerd ({reason})\n"))
        }
        Some(Ok((Landing::Store, reason))) => out.push_str(&format!(
            "Images land: written into containerd over the build session ({reason})\n"
        )),
        Some(Ok((_, reason))) => out.push_str(&format!(
            "Images land: via a docker tarball loaded into containerd by kiln ({reason})\n"
        )),
        Some(Err(e)) => out.push_str(&format!("Images land: unknown ({e})\n")),
        None => {}
    }
    out
}

async fn ping(host: &str) -> Result<Vec<WorkerRecord>, String> {
    kiln_client::ping_address(host, DAEMON_TIMEOUT)
        .await
        .map_err(|e| kiln_client::error_chain(&e))
}

/// `kiln builder info`.
pub async fn info(globals: &Globals, args: &DaemonArgs) -> anyhow::Result<()> {
    let env = DiscoveryEnv::from_process();
    let plan = discovery::plan(args.buildkit_host.as_deref(), &env, &globals.namespace)?;
    let (source, list) = match plan {
        Plan::Flag(host) => (
            "--buildkit-host (used as given, no fallback)".to_string(),
            vec![host],
        ),
        Plan::Env(host) => (
            "BUILDKIT_HOST (used as given, no fallback)".to_string(),
            vec![host],
        ),
        Plan::Candidates(list) => (
            format!(
                "the sockets for namespace {:?}, first one answering wins",
                globals.namespace
            ),
            list,
        ),
    };
    let mut attempts = Vec::new();
    for host in list {
        let result = ping(&host).await;
        let ok = result.is_ok();
        attempts.push(Attempt { host, result });
        if ok {
            break;
        }
    }
    let workers = attempts.iter().find_map(|a| a.result.as_ref().ok());
    let landing = match workers {
        None => None,
        Some(workers) => Some(landing_of(globals, workers).await),
    };
    let report = InfoReport {
        source,
        attempts,
        landing,
    };
    print!("{}", render_info(&report));
    if report.landing.is_none() {
        anyhow::bail!("no build daemon answered");
    }
    Ok(())
}

async fn landing_of(
    globals: &Globals,
    workers: &[WorkerRecord],
) -> Result<(Landing, String), String> {
    let Some(worker) = workers.first() else {
        return Err("the daemon has no worker".to_string());
    };
    let containerd = Containerd::connect(&globals.address)
        .await
        .with_context(|| format!("failed to connect to containerd at {}", globals.address))
        .map_err(|e| format!("{e:#}"))?;
    let uuid = containerd
        .server_uuid()
        .await
        .context("failed to read containerd's UUID")
        .map_err(|e| format!("{e:#}"))?;
    let plan = plan_output(
        None,
        &[],
        &[],
        &worker.labels,
        &ContainerdView {
            uuid: &uuid,
            namespace: &globals.namespace,
            snapshotter: &globals.snapshotter,
        },
    );
    Ok((plan.landing, plan.reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, size: i64, in_use: bool, mutable: bool) -> UsageRecord {
        UsageRecord {
            id: id.to_string(),
            size,
            in_use,
            mutable,
            ..Default::default()
        }
    }

    #[test]
    fn sizes_like_go_units() {
        assert_eq!(bytes_size(0), "0B");
        assert_eq!(bytes_size(512), "512B");
        assert_eq!(bytes_size(1536), "1.5KiB");
        assert_eq!(bytes_size(1_258_291), "1.2MiB");
        assert_eq!(bytes_size(1024 * 1024 * 1024), "1GiB");
        assert_eq!(human_size(1500), "1.5kB");
        assert_eq!(human_size(123_456_789), "123.5MB");
        assert_eq!(human_size(999), "999B");
    }

    #[test]
    fn durations_like_go_units() {
        assert_eq!(
            human_duration(Duration::from_millis(10)),
            "Less than a second"
        );
        assert_eq!(human_duration(Duration::from_secs(5)), "5 seconds");
        assert_eq!(human_duration(Duration::from_secs(90)), "About a minute");
        assert_eq!(human_duration(Duration::from_secs(600)), "10 minutes");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600)), "3 hours");
        assert_eq!(human_duration(Duration::from_secs(3 * 86400)), "3 days");
    }

    #[test]
    fn prune_prompt_and_total() {
        assert_eq!(
            prune_prompt(false),
            "WARNING! This will remove any dangling build cache..\nAre you sure you want to continue? [y/N] "
        );
        assert!(prune_prompt(true).starts_with("WARNING! This will remove all build cache.."));
        let removed = [
            record("a", 1024, false, false),
            record("b", 512, false, false),
        ];
        assert_eq!(prune_total(&removed), "Total:  1.5KiB");
        assert_eq!(prune_total(&[]), "Total:  0B");
    }

    #[test]
    fn du_table_columns_and_sums() {
        let now = SystemTime::now();
        let mut used = record("sha256:aaaa", 2000, true, true);
        used.last_used_at = Some(prost_types::Timestamp::from(now - Duration::from_secs(120)));
        let free = record("sha256:bb", 500, false, false);
        let table = du_table(&[used, free], now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "ID           RECLAIMABLE SIZE LAST ACCESSED");
        assert_eq!(lines[1], "sha256:aaaa* false       2kB  2 minutes ago");
        assert_eq!(lines[2], "sha256:bb    true        500B");
        assert_eq!(lines[3], "Reclaimable: 500B");
        assert_eq!(lines[4], "Total:       2.5kB");
    }

    #[test]
    fn info_report_lists_every_attempt() {
        let worker = WorkerRecord {
            id: "w1".into(),
            labels: [(
                "org.mobyproject.buildkit.worker.executor".to_string(),
                "oci".to_string(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let report = InfoReport {
            source: "the sockets for namespace \"default\"".into(),
            attempts: vec![
                Attempt {
                    host: "unix:///a.sock".into(),
                    result: Err("connection refused".into()),
                },
                Attempt {
                    host: "unix:///b.sock".into(),
                    result: Ok(vec![worker]),
                },
            ],
            landing: Some(Ok((Landing::Load, "worker label x is \"oci\"".into()))),
        };
        let text = render_info(&report);
        assert!(text.starts_with("Daemon: unix:///b.sock\n"), "{text}");
        assert!(
            text.contains("  unix:///a.sock: connection refused\n"),
            "{text}"
        );
        assert!(text.contains("  unix:///b.sock: ok\n"), "{text}");
        assert!(text.contains("  [0] w1\n"), "{text}");
        assert!(text.contains("      org.mobyproject.buildkit.worker.executor=oci\n"));
        assert!(text.contains("Images land: via a docker tarball"), "{text}");
    }
}
