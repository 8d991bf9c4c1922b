//! The agent's Prometheus metrics (`ferry agent --metrics ADDR`): what it
//! does for migrations and HA, in the OpenMetrics text format on
//! `GET /metrics`. The exposition is prometheus-client's; the HTTP server
//! is a bounded one-request-per-connection loop of ferry's own (it serves
//! nothing else, reads at most [`REQUEST_MAX`] bytes and gives each client
//! [`CLIENT_TIMEOUT`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Largest request read (one request line and headers).
const REQUEST_MAX: usize = 8 * 1024;
/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// committed, aborted, failed.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// restore (CRIU's restore, left stopped), final (from the final
    /// images' arrival to the commit: the frozen time as the destination
    /// sees it), session (begin to end).
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TakeoverLabel {
    pub service: String,
    /// checkpoint (restored from the newest held), fresh (started anew),
    /// running (the copy a move brought).
    pub from: &'static str,
}

type SecondsGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the agent keeps.
pub struct Metrics {
    pub migrations: Family<OutcomeLabel, Counter>,
    pub migration_phase_seconds: HistogramFamily<PhaseLabel>,
    pub sessions_active: Gauge,
    pub received_bytes: Counter,
    pub lease_renewal_seconds: Histogram,
    pub lease_renewal_failures: Counter,
    pub checkpoints: Family<ServiceLabel, Counter>,
    pub checkpoint_frozen_seconds: HistogramFamily<ServiceLabel>,
    pub checkpoint_failures: Family<ServiceLabel, Counter>,
    pub replication_lag_seconds: Family<ServiceLabel, SecondsGauge>,
    pub replication_failures: Family<ServiceLabel, Counter>,
    pub takeovers: Family<TakeoverLabel, Counter>,
    pub page_store_pages: Gauge,
    registry: Registry,
}

/// 1 ms to about 65 s.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            migrations: Family::default(),
            migration_phase_seconds: Family::new_with_constructor(seconds_histogram),
            sessions_active: Gauge::default(),
            received_bytes: Counter::default(),
            lease_renewal_seconds: seconds_histogram(),
            lease_renewal_failures: Counter::default(),
            checkpoints: Family::default(),
            checkpoint_frozen_seconds: Family::new_with_constructor(seconds_histogram),
            checkpoint_failures: Family::default(),
            replication_lag_seconds: Family::default(),
            replication_failures: Family::default(),
            takeovers: Family::default(),
            page_store_pages: Gauge::default(),
            registry: Registry::with_prefix("ferry"),
        };
        let r = &mut m.registry;
        r.register(
            "migrations",
            "Migrations received, by outcome",
            m.migrations.clone(),
        );
        r.register(
            "migration_phase_seconds",
            "Time of a received migration's phases",
            m.migration_phase_seconds.clone(),
        );
        r.register(
            "migration_received_bytes",
            "Page and image bytes received for migrations (uncompressed)",
            m.received_bytes.clone(),
        );
        r.register(
            "sessions_active",
            "Migrations being received now",
            m.sessions_active.clone(),
        );
        r.register(
            "ha_lease_renewal_seconds",
            "etcd lease renewal round trips that counted (renewed and vouched)",
            m.lease_renewal_seconds.clone(),
        );
        r.register(
            "ha_lease_renewal_failures",
            "Lease renewals that did not count",
            m.lease_renewal_failures.clone(),
        );
        r.register(
            "ha_checkpoints",
            "HA checkpoints taken by this host as leader",
            m.checkpoints.clone(),
        );
        r.register(
            "ha_checkpoint_frozen_seconds",
            "Time the service was frozen per HA checkpoint (CRIU's statistics)",
            m.checkpoint_frozen_seconds.clone(),
        );
        r.register(
            "ha_checkpoint_failures",
            "HA checkpoints that failed (the service kept running)",
            m.checkpoint_failures.clone(),
        );
        r.register(
            "ha_replication_lag_seconds",
            "From a checkpoint's instant to a standby having verified it (the newest)",
            m.replication_lag_seconds.clone(),
        );
        r.register(
            "ha_replication_failures",
            "Checkpoint replications to a standby that failed",
            m.replication_failures.clone(),
        );
        r.register(
            "ha_takeovers",
            "Services this host took over as new leader, by what it started from",
            m.takeovers.clone(),
        );
        r.register(
            "page_store_pages",
            "Pages held in the agent's content-addressed store",
            m.page_store_pages.clone(),
        );
        m
    }

    /// The exposition, OpenMetrics text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The agent's metrics (one set per process).
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Serves `GET /metrics` on `addr` from a thread of its own; `refresh`
/// updates the gauges read at scrape time. Returns the bound address.
pub fn serve(addr: SocketAddr, refresh: impl Fn() + Send + 'static) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("ferry-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer(s, &refresh) {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(local)
}

fn answer(mut s: TcpStream, refresh: &dyn Fn()) -> std::io::Result<()> {
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = vec![0u8; REQUEST_MAX];
    let mut len = 0;
    while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let mut words = request.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, kind, body) = match (method, path) {
        ("GET", "/metrics") => {
            refresh();
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                get().render(),
            )
        }
        ("GET", _) => ("404 Not Found", "text/plain", "only /metrics\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".into(),
        ),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family_and_ends_as_openmetrics_does() {
        let m = get();
        m.migrations
            .get_or_create(&OutcomeLabel {
                outcome: "committed",
            })
            .inc();
        m.checkpoint_frozen_seconds
            .get_or_create(&ServiceLabel {
                service: "web".into(),
            })
            .observe(0.012);
        let text = m.render();
        assert!(
            text.contains("ferry_migrations_total{outcome=\"committed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferry_ha_checkpoint_frozen_seconds_count{service=\"web\"} 1"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
