//! Prometheus metrics (`--metrics ADDR`): a small HTTP/1.1 responder on the process's tokio
//! runtime that answers `GET /metrics` with the text exposition format (version 0.0.4). One
//! request per connection (`Connection: close`); anything but `GET /metrics` gets 404 or 405.
//!
//! The numbers are read at scrape time from the same places QMP reads them: the device's
//! [`StatsHandle`] (per-queue counters and latency histograms) and the role's status and
//! [`ReplicationMetrics`](crate::replication::metrics::ReplicationMetrics). Metric names are
//! listed in docs/user-guide.md ("Operating colo-blk").

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::control::Role;
use crate::histogram::HistogramSnapshot;
use crate::replication::primary::Primary;
use crate::replication::secondary::Secondary;
use crate::vhost_user::StatsHandle;

/// What a scrape reads.
#[derive(Clone)]
pub struct MetricsSource {
    pub role: Role,
    pub stats: Option<StatsHandle>,
}

/// Largest request head accepted (request line and headers).
const MAX_HEAD: usize = 8192;

/// Writes Prometheus text: `# HELP`/`# TYPE` once per family, then its samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP colo_blk_{name} {help}");
        let _ = writeln!(self.0, "# TYPE colo_blk_{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "colo_blk_{name} {value}");
        } else {
            let _ = writeln!(self.0, "colo_blk_{name}{{{labels}}} {value}");
        }
    }

    /// One metric with a single unlabelled sample.
    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }

    /// The samples of one histogram (`labels` without braces, may be empty).
    fn histogram(&mut self, name: &str, labels: &str, h: &HistogramSnapshot) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, n) in h.bucket_le_us.iter().zip(&h.cumulative) {
            let le = *le as f64 / 1e6;
            self.sample(
                &format!("{name}_bucket"),
                &format!("{labels}{sep}le=\"{le}\""),
                n,
            );
        }
        self.sample(
            &format!("{name}_bucket"),
            &format!("{labels}{sep}le=\"+Inf\""),
            h.count,
        );
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count);
    }
}

fn opt_ts(v: Option<f64>) -> f64 {
    v.unwrap_or(0.0)
}

/// The metrics text of this process.
pub fn render(src: &MetricsSource) -> String {
    let mut o = Out(String::new());
    let current = src.role.effective();
    let role = match current {
        Role::Standalone => "standalone",
        Role::Primary(_) => "primary",
        Role::Secondary(_) => "secondary",
    };
    o.family("info", "gauge", "The process: role and version (always 1).");
    o.sample(
        "info",
        &format!("role=\"{role}\",version=\"{}\"", env!("CARGO_PKG_VERSION")),
        1,
    );
    if let Some(stats) = &src.stats {
        render_queues(&mut o, stats);
    }
    match &current {
        Role::Standalone => {}
        Role::Primary(p) => render_primary(&mut o, p),
        Role::Secondary(s) => render_secondary(&mut o, s),
    }
    o.0
}

/// A primary's families: its link, protection, stream and window, resync, then the common ones.
fn render_primary(o: &mut Out, p: &Primary) {
    let st = p.status();
    let m = p.metrics().snapshot();
    o.one(
        "replication_connected",
        "gauge",
        "1 while a secondary is connected.",
        u8::from(st.state == "connected"),
    );
    o.one(
        "replication_protected",
        "gauge",
        "1 while the guest's writes are protected (secondary connected and in sync).",
        u8::from(st.unprotected_since.is_none()),
    );
    o.one(
        "replication_unprotected_since_seconds",
        "gauge",
        "Unix time protection was lost (0 while protected).",
        opt_ts(st.unprotected_since),
    );
    o.one(
        "replication_epoch",
        "gauge",
        "Last completed checkpoint.",
        st.epoch,
    );
    o.one(
        "replication_sent_bytes_total",
        "counter",
        "Stream bytes queued to the secondary (frame headers included).",
        st.bytes_sent_total,
    );
    o.one(
        "replication_acked_bytes_total",
        "counter",
        "Stream bytes the secondary acknowledged.",
        st.bytes_acked_total,
    );
    o.one(
        "replication_in_flight_bytes",
        "gauge",
        "Stream bytes sent and not yet acknowledged.",
        st.bytes_in_flight,
    );
    o.one(
        "replication_window_bytes",
        "gauge",
        "Most bytes that may be in flight (--window).",
        st.window_bytes,
    );
    o.one(
        "replication_since_checkpoint_bytes",
        "gauge",
        "Stream bytes sent since the last checkpoint.",
        st.bytes_sent_since_checkpoint,
    );
    o.one(
        "replication_dirty_bytes",
        "gauge",
        "Bytes changed since the last checkpoint (what a resync would send).",
        st.dirty_bytes,
    );
    o.one(
        "replication_resync_total_bytes",
        "gauge",
        "Bytes the current session's resync had to send.",
        st.resync_total_bytes,
    );
    o.one(
        "replication_resync_remaining_bytes",
        "gauge",
        "Bytes the current resync still has to send.",
        st.resync_remaining_bytes,
    );
    render_common(o, &m);
}

/// A secondary's families: its link, failover, stream and layers, then the common ones.
fn render_secondary(o: &mut Out, s: &Secondary) {
    let st = s.status();
    let m = s.metrics().snapshot();
    o.one(
        "replication_connected",
        "gauge",
        "1 while a primary streams to this secondary.",
        u8::from(st.state == "connected"),
    );
    o.one(
        "replication_failed_over",
        "gauge",
        "1 once a failover began (the disk is the Secondary VM's own).",
        u8::from(st.state == "failed-over"),
    );
    o.one(
        "replication_epoch",
        "gauge",
        "Last completed checkpoint.",
        st.epoch,
    );
    o.one(
        "replication_received_bytes_total",
        "counter",
        "Stream data bytes applied.",
        st.bytes_received_total,
    );
    o.one(
        "replication_since_checkpoint_bytes",
        "gauge",
        "Stream data bytes applied since the last checkpoint.",
        st.bytes_received_since_checkpoint,
    );
    o.family(
        "layer_bytes",
        "gauge",
        "Bytes held by the secondary's layers (hidden: rollback data; active: the \
         Secondary VM's writes).",
    );
    o.sample("layer_bytes", "layer=\"hidden\"", st.hidden_bytes);
    o.sample("layer_bytes", "layer=\"active\"", st.active_bytes);
    o.one(
        "replication_failovers_total",
        "counter",
        "Failovers completed.",
        st.failovers,
    );
    o.one(
        "replication_failover_remaining_bytes",
        "gauge",
        "Layer bytes a running failover still has to commit.",
        st.failover_remaining_bytes,
    );
    o.one(
        "replication_last_failover_duration_seconds",
        "gauge",
        "How long the last failover took (0: none).",
        m.last_failover_seconds.unwrap_or(0.0),
    );
    render_common(o, &m);
}

/// The counters both replication roles have.
fn render_common(o: &mut Out, m: &crate::replication::metrics::MetricsSnapshot) {
    o.one(
        "replication_checkpoints_total",
        "counter",
        "Checkpoints completed.",
        m.checkpoints,
    );
    o.one(
        "replication_checkpoint_failures_total",
        "counter",
        "Checkpoints refused or failed.",
        m.checkpoint_failures,
    );
    o.family(
        "replication_checkpoint_duration_seconds",
        "histogram",
        "How long checkpoints took (primary: marker queued to acknowledged; secondary: \
         layers dropped).",
    );
    o.histogram(
        "replication_checkpoint_duration_seconds",
        "",
        &m.checkpoint_duration,
    );
    o.one(
        "replication_last_checkpoint_seconds",
        "gauge",
        "Unix time of the last checkpoint (0: none).",
        opt_ts(m.last_checkpoint_at),
    );
    o.one(
        "replication_sessions_total",
        "counter",
        "Replication sessions that passed their handshake.",
        m.sessions,
    );
    o.one(
        "replication_link_errors_total",
        "counter",
        "Sessions or handshakes that ended in an error, and refused peers.",
        m.link_errors,
    );
}

/// Reads one counter of a queue.
type QueueCounter = fn(&crate::vhost_user::QueueStatsSnapshot) -> u64;

fn render_queues(o: &mut Out, stats: &StatsHandle) {
    let queues = stats.queues();
    let lat = stats.latencies();
    let counters: [(&str, &str, QueueCounter); 5] = [
        (
            "queue_requests_total",
            "Well-formed requests completed.",
            |q| q.requests,
        ),
        (
            "queue_errors_total",
            "Requests completed with a status other than OK.",
            |q| q.errors,
        ),
        (
            "queue_malformed_total",
            "Malformed descriptor chains.",
            |q| q.malformed,
        ),
        (
            "queue_read_bytes_total",
            "Bytes of successful reads.",
            |q| q.bytes_read,
        ),
        (
            "queue_written_bytes_total",
            "Bytes of successful writes.",
            |q| q.bytes_written,
        ),
    ];
    for (name, help, get) in counters {
        o.family(name, "counter", help);
        for (i, q) in queues.iter().enumerate() {
            o.sample(name, &format!("queue=\"{i}\""), get(q));
        }
    }
    o.family(
        "queue_request_duration_seconds",
        "histogram",
        "Time from a request's execution start to its completion, per queue.",
    );
    for (i, h) in lat.iter().enumerate() {
        o.histogram(
            "queue_request_duration_seconds",
            &format!("queue=\"{i}\""),
            h,
        );
    }
}

/// Serves scrapes on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, src: Arc<MetricsSource>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let src = src.clone();
                tokio::spawn(async move {
                    let r = tokio::time::timeout(Duration::from_secs(10), answer(stream, &src));
                    match r.await {
                        Ok(Err(e)) => debug!("metrics connection: {e}"),
                        Err(_) => debug!("metrics connection: timed out"),
                        Ok(Ok(())) => {}
                    }
                });
            }
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, src: &MetricsSource) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                false,
            )
            .await;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(src);
            respond(&mut stream, "200 OK", &body, method == "HEAD").await
        }
        ("GET" | "HEAD", _) => respond(&mut stream, "404 Not Found", "try /metrics\n", false).await,
        _ => respond(&mut stream, "405 Method Not Allowed", "", false).await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        msg.push_str(body);
    }
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_text_has_queue_families_and_histogram_buckets() {
        let stats = StatsHandle::new(2);
        let text = render(&MetricsSource {
            role: Role::Standalone,
            stats: Some(stats),
        });
        assert!(text.contains("colo_blk_info{role=\"standalone\""), "{text}");
        assert!(text.contains("# TYPE colo_blk_queue_requests_total counter"));
        assert!(text.contains("colo_blk_queue_requests_total{queue=\"1\"} 0"));
        assert!(text.contains(
            "colo_blk_queue_request_duration_seconds_bucket{queue=\"0\",le=\"0.00001\"} 0"
        ));
        assert!(text
            .contains("colo_blk_queue_request_duration_seconds_bucket{queue=\"1\",le=\"+Inf\"} 0"));
        assert!(text.contains("colo_blk_queue_request_duration_seconds_count{queue=\"1\"} 0"));
        // Every sample line belongs to a family announced before it.
        let mut families = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                families.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|b| families.contains(*b))
                    .unwrap_or(name);
                assert!(families.contains(base), "{l}");
            }
        }
    }

    /// The whole text of each replication role, byte for byte (the unix time protection was
    /// lost and the version masked).
    #[test]
    fn role_texts_are_pinned() {
        use crate::qmp::EventSender;
        use crate::replication::layers::LayeredDisk;
        use crate::replication::metadata::MetaStore;
        use crate::replication::primary::{Primary, PrimaryOptions};
        use crate::replication::secondary::{Secondary, SecondaryOptions};
        use crate::replication::tls::LinkSecurity;
        use crate::storage::MemDisk;

        let disk = Arc::new(MemDisk::new(1 << 20));
        let opts = PrimaryOptions {
            peer: "127.0.0.1:1".into(),
            window_bytes: 1 << 20,
            sync: false,
            heartbeat_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(5),
            reconnect_interval: Duration::from_secs(1),
            dirty_granularity: 65536,
            block_size: 512,
            security: LinkSecurity::Insecure,
        };
        let meta = Arc::new(MetaStore::in_memory(1 << 20));
        let primary = Primary::open(disk, opts, EventSender::new(), meta, None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let base = Arc::new(MemDisk::new(1 << 20));
        let layered = Arc::new(LayeredDisk::new(base, tmp.path(), 4096).unwrap());
        let opts = SecondaryOptions {
            listen: "in-memory".into(),
            serves_vm: false,
            heartbeat_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(5),
            block_size: 512,
            allow_full_sync: false,
            security: LinkSecurity::Insecure,
        };
        let secondary = Secondary::in_memory(layered, opts, EventSender::new());
        let mut all = String::new();
        for role in [Role::Primary(primary), Role::Secondary(secondary)] {
            let text = render(&MetricsSource { role, stats: None });
            for l in text.lines() {
                let since = "colo_blk_replication_unprotected_since_seconds ";
                let l = match l.strip_prefix(since) {
                    Some(_) => format!("{since}T"),
                    None => l.replace(env!("CARGO_PKG_VERSION"), "V"),
                };
                all.push_str(&l);
                all.push('\n');
            }
        }
        assert_eq!(all, PINNED);
    }

    const PINNED: &str = r#"# HELP colo_blk_info The process: role and version (always 1).
# TYPE colo_blk_info gauge
colo_blk_info{role="primary",version="V"} 1
# HELP colo_blk_replication_connected 1 while a secondary is connected.
# TYPE colo_blk_replication_connected gauge
colo_blk_replication_connected 0
# HELP colo_blk_replication_protected 1 while the guest's writes are protected (secondary connected and in sync).
# TYPE colo_blk_replication_protected gauge
colo_blk_replication_protected 0
# HELP colo_blk_replication_unprotected_since_seconds Unix time protection was lost (0 while protected).
# TYPE colo_blk_replication_unprotected_since_seconds gauge
colo_blk_replication_unprotected_since_seconds T
# HELP colo_blk_replication_epoch Last completed checkpoint.
# TYPE colo_blk_replication_epoch gauge
colo_blk_replication_epoch 0
# HELP colo_blk_replication_sent_bytes_total Stream bytes queued to the secondary (frame headers included).
# TYPE colo_blk_replication_sent_bytes_total counter
colo_blk_replication_sent_bytes_total 0
# HELP colo_blk_replication_acked_bytes_total Stream bytes the secondary acknowledged.
# TYPE colo_blk_replication_acked_bytes_total counter
colo_blk_replication_acked_bytes_total 0
# HELP colo_blk_replication_in_flight_bytes Stream bytes sent and not yet acknowledged.
# TYPE colo_blk_replication_in_flight_bytes gauge
colo_blk_replication_in_flight_bytes 0
# HELP colo_blk_replication_window_bytes Most bytes that may be in flight (--window).
# TYPE colo_blk_replication_window_bytes gauge
colo_blk_replication_window_bytes 1048576
# HELP colo_blk_replication_since_checkpoint_bytes Stream bytes sent since the last checkpoint.
# TYPE colo_blk_replication_since_checkpoint_bytes gauge
colo_blk_replication_since_checkpoint_bytes 0
# HELP colo_blk_replication_dirty_bytes Bytes changed since the last checkpoint (what a resync would send).
# TYPE colo_blk_replication_dirty_bytes gauge
colo_blk_replication_dirty_bytes 0
# HELP colo_blk_replication_resync_total_bytes Bytes the current session's resync had to send.
# TYPE colo_blk_replication_resync_total_bytes gauge
colo_blk_replication_resync_total_bytes 0
# HELP colo_blk_replication_resync_remaining_bytes Bytes the current resync still has to send.
# TYPE colo_blk_replication_resync_remaining_bytes gauge
colo_blk_replication_resync_remaining_bytes 0
# HELP colo_blk_replication_checkpoints_total Checkpoints completed.
# TYPE colo_blk_replication_checkpoints_total counter
colo_blk_replication_checkpoints_total 0
# HELP colo_blk_replication_checkpoint_failures_total Checkpoints refused or failed.
# TYPE colo_blk_replication_checkpoint_failures_total counter
colo_blk_replication_checkpoint_failures_total 0
# HELP colo_blk_replication_checkpoint_duration_seconds How long checkpoints took (primary: marker queued to acknowledged; secondary: layers dropped).
# TYPE colo_blk_replication_checkpoint_duration_seconds histogram
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.00001"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.000025"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.00005"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.0001"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.00025"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.0005"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.001"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.0025"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.005"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.01"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.025"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.05"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.1"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.25"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="1"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="5"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="+Inf"} 0
colo_blk_replication_checkpoint_duration_seconds_sum 0
colo_blk_replication_checkpoint_duration_seconds_count 0
# HELP colo_blk_replication_last_checkpoint_seconds Unix time of the last checkpoint (0: none).
# TYPE colo_blk_replication_last_checkpoint_seconds gauge
colo_blk_replication_last_checkpoint_seconds 0
# HELP colo_blk_replication_sessions_total Replication sessions that passed their handshake.
# TYPE colo_blk_replication_sessions_total counter
colo_blk_replication_sessions_total 0
# HELP colo_blk_replication_link_errors_total Sessions or handshakes that ended in an error, and refused peers.
# TYPE colo_blk_replication_link_errors_total counter
colo_blk_replication_link_errors_total 0
# HELP colo_blk_info The process: role and version (always 1).
# TYPE colo_blk_info gauge
colo_blk_info{role="secondary",version="V"} 1
# HELP colo_blk_replication_connected 1 while a primary streams to this secondary.
# TYPE colo_blk_replication_connected gauge
colo_blk_replication_connected 0
# HELP colo_blk_replication_failed_over 1 once a failover began (the disk is the Secondary VM's own).
# TYPE colo_blk_replication_failed_over gauge
colo_blk_replication_failed_over 0
# HELP colo_blk_replication_epoch Last completed checkpoint.
# TYPE colo_blk_replication_epoch gauge
colo_blk_replication_epoch 0
# HELP colo_blk_replication_received_bytes_total Stream data bytes applied.
# TYPE colo_blk_replication_received_bytes_total counter
colo_blk_replication_received_bytes_total 0
# HELP colo_blk_replication_since_checkpoint_bytes Stream data bytes applied since the last checkpoint.
# TYPE colo_blk_replication_since_checkpoint_bytes gauge
colo_blk_replication_since_checkpoint_bytes 0
# HELP colo_blk_layer_bytes Bytes held by the secondary's layers (hidden: rollback data; active: the Secondary VM's writes).
# TYPE colo_blk_layer_bytes gauge
colo_blk_layer_bytes{layer="hidden"} 0
colo_blk_layer_bytes{layer="active"} 0
# HELP colo_blk_replication_failovers_total Failovers completed.
# TYPE colo_blk_replication_failovers_total counter
colo_blk_replication_failovers_total 0
# HELP colo_blk_replication_failover_remaining_bytes Layer bytes a running failover still has to commit.
# TYPE colo_blk_replication_failover_remaining_bytes gauge
colo_blk_replication_failover_remaining_bytes 0
# HELP colo_blk_replication_last_failover_duration_seconds How long the last failover took (0: none).
# TYPE colo_blk_replication_last_failover_duration_seconds gauge
colo_blk_replication_last_failover_duration_seconds 0
# HELP colo_blk_replication_checkpoints_total Checkpoints completed.
# TYPE colo_blk_replication_checkpoints_total counter
colo_blk_replication_checkpoints_total 0
# HELP colo_blk_replication_checkpoint_failures_total Checkpoints refused or failed.
# TYPE colo_blk_replication_checkpoint_failures_total counter
colo_blk_replication_checkpoint_failures_total 0
# HELP colo_blk_replication_checkpoint_duration_seconds How long checkpoints took (primary: marker queued to acknowledged; secondary: layers dropped).
# TYPE colo_blk_replication_checkpoint_duration_seconds histogram
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.00001"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.000025"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.00005"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.0001"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.00025"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.0005"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.001"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.0025"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.005"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.01"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.025"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.05"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.1"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="0.25"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="1"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="5"} 0
colo_blk_replication_checkpoint_duration_seconds_bucket{le="+Inf"} 0
colo_blk_replication_checkpoint_duration_seconds_sum 0
colo_blk_replication_checkpoint_duration_seconds_count 0
# HELP colo_blk_replication_last_checkpoint_seconds Unix time of the last checkpoint (0: none).
# TYPE colo_blk_replication_last_checkpoint_seconds gauge
colo_blk_replication_last_checkpoint_seconds 0
# HELP colo_blk_replication_sessions_total Replication sessions that passed their handshake.
# TYPE colo_blk_replication_sessions_total counter
colo_blk_replication_sessions_total 0
# HELP colo_blk_replication_link_errors_total Sessions or handshakes that ended in an error, and refused peers.
# TYPE colo_blk_replication_link_errors_total counter
colo_blk_replication_link_errors_total 0
"#;
}
