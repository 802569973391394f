//! Prometheus metrics with Istio's names and labels, served on 15020
//! (`/stats/prometheus`, as Istio's merged endpoint, and `/metrics`), so
//! existing dashboards and alerts work unchanged.

#![forbid(unsafe_code)]

pub mod connection;
pub mod logtime;

use std::borrow::Cow;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// One label value: Istio's fixed values ("unknown", "tcp", "-", ...) are
/// borrowed, so a connection's label set allocates only for what is its own
/// (workload names, principals, addresses).
pub type Label = Cow<'static, str>;

/// A label value from text: a fixed value stays borrowed.
pub fn label(s: &str) -> Label {
    const FIXED: [&str; 8] = ["unknown", "tcp", "http", "grpc", "-", "0", "none", "mutual_tls"];
    match FIXED.iter().find(|f| **f == s) {
        Some(f) => Cow::Borrowed(f),
        None => Cow::Owned(s.to_owned()),
    }
}

/// The labels of Istio's standard metrics. What the proxy cannot know yet
/// (the source workload's identity before issue-5's mTLS) is "unknown", as
/// Istio reports it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Labels {
    pub reporter: Label,
    pub source_workload: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub destination_workload: Label,
    pub destination_workload_namespace: Label,
    pub destination_version: Label,
    pub destination_service: Label,
    pub destination_service_name: Label,
    pub destination_service_namespace: Label,
    pub destination_principal: Label,
    pub request_protocol: Label,
    pub response_code: Label,
    pub response_flags: Label,
    pub connection_security_policy: Label,
}

const UNKNOWN: Label = Cow::Borrowed("unknown");

/// What Istio reports where nothing is known: a TCP connection from and to
/// unknown workloads, without mTLS. Every value borrowed; the label sets
/// below fill in what they know.
const NOTHING_KNOWN: Labels = Labels {
    reporter: Cow::Borrowed("source"),
    source_workload: UNKNOWN,
    source_workload_namespace: UNKNOWN,
    source_principal: UNKNOWN,
    destination_workload: UNKNOWN,
    destination_workload_namespace: UNKNOWN,
    destination_version: UNKNOWN,
    destination_service: UNKNOWN,
    destination_service_name: UNKNOWN,
    destination_service_namespace: UNKNOWN,
    destination_principal: UNKNOWN,
    request_protocol: Cow::Borrowed("tcp"),
    response_code: Cow::Borrowed("0"),
    response_flags: Cow::Borrowed("-"),
    connection_security_policy: Cow::Borrowed("none"),
};

impl Labels {
    /// Labels for traffic to `service` (FQDN or ServiceEntry host).
    pub fn to_service(service: &str, namespace: &str, workload: &str, version: &str, protocol: &str) -> Labels {
        let name = service.split('.').next().unwrap_or(service);
        let namespace = label(namespace);
        Labels {
            destination_workload: label(workload),
            destination_workload_namespace: namespace.clone(),
            destination_version: label(version),
            destination_service: label(service),
            destination_service_name: label(name),
            destination_service_namespace: namespace,
            request_protocol: label(protocol),
            ..NOTHING_KNOWN
        }
    }

    /// A connection to no mesh service (Istio's PassthroughCluster). The
    /// destination address is not a label: a pod that dials many
    /// addresses would grow one series per address, for good (the access
    /// log names it).
    pub fn passthrough() -> Labels {
        Labels {
            destination_service: Cow::Borrowed("unknown"),
            destination_service_name: Cow::Borrowed("PassthroughCluster"),
            ..NOTHING_KNOWN
        }
    }
}

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// What distinguishes one request series from another, cheaply hashed:
/// (source workload, destination service, workload, version, response
/// code, flags).
/// A request series' key: source workload, destination service, workload
/// and version, response code and flags, and the peer's identity when the
/// request went over mutual TLS.
pub type RequestKey = (String, String, String, String, u16, &'static str, Option<crate::identity::Identity>);

/// The metric handles of one request series, kept so a request costs a
/// small map lookup and a few atomic updates, not a label set hashed four
/// times.
#[derive(Clone)]
pub struct RequestSeries {
    pub requests: Counter,
    pub duration_ms: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

/// The handles of one TCP series (Istio's four `istio_tcp_*` metrics),
/// kept per label set so a connection hashes its labels once, not four
/// times.
#[derive(Clone)]
pub struct TcpSeries {
    pub opened: Counter,
    pub closed: Counter,
    pub sent: Counter,
    pub received: Counter,
}

/// The workload a series is about, as the labels name it.
#[derive(Clone, Copy)]
pub struct Workload<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub identity: Option<&'a crate::identity::Identity>,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<Labels, Counter>,
    pub duration_ms: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    pub tcp_sent: Family<Labels, Counter>,
    pub tcp_received: Family<Labels, Counter>,
    pub tcp_opened: Family<Labels, Counter>,
    pub tcp_closed: Family<Labels, Counter>,
    /// HBONE connections refused before any stream (bad handshake, no
    /// identity, CONNECT to an address that is not the workload's).
    pub hbone_refused_total: Family<ReasonLabel, Counter>,
    /// Connections refused by PeerAuthentication or AuthorizationPolicy.
    pub denied_total: Family<DeniedLabels, Counter>,
    /// Connections and CONNECTs to a pod's address on one of the proxy's
    /// own ports, refused (by listener: `inbound` plaintext, `hbone`).
    pub self_calls_total: Family<ListenerLabel, Counter>,
    /// Connections closed as they arrived: a listener's cap, or a peer's
    /// (by listener: `inbound`, `hbone`, `hbone_handshakes`).
    pub over_limit_total: Family<ListenerLabel, Counter>,
    /// Objects of the config in force that were rejected (left out, or
    /// compiled failing closed); set when metrics are read.
    pub config_rejected: prometheus_client::metrics::gauge::Gauge,
    encode_lock: Mutex<()>,
    series: Mutex<std::collections::HashMap<RequestKey, RequestSeries>>,
    tcp: Mutex<std::collections::HashMap<Labels, TcpSeries>>,
}

fn duration_buckets() -> Histogram {
    // Istio's default buckets for istio_request_duration_milliseconds.
    Histogram::new([
        0.5,
        1.0,
        5.0,
        10.0,
        25.0,
        50.0,
        100.0,
        250.0,
        500.0,
        1_000.0,
        2_500.0,
        5_000.0,
        10_000.0,
        30_000.0,
        60_000.0,
        300_000.0,
        600_000.0,
        1_800_000.0,
        3_600_000.0,
    ])
}

fn byte_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 10.0, 9))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let duration_ms: HistogramFamily = Family::new_with_constructor(duration_buckets);
        let request_bytes: HistogramFamily = Family::new_with_constructor(byte_buckets);
        let response_bytes: HistogramFamily = Family::new_with_constructor(byte_buckets);
        let tcp_sent = Family::<Labels, Counter>::default();
        let tcp_received = Family::<Labels, Counter>::default();
        let tcp_opened = Family::<Labels, Counter>::default();
        let tcp_closed = Family::<Labels, Counter>::default();
        registry.register("istio_requests", "Requests proxied", requests.clone());
        registry.register("istio_request_duration_milliseconds", "Request duration", duration_ms.clone());
        registry.register("istio_request_bytes", "Request body sizes", request_bytes.clone());
        registry.register("istio_response_bytes", "Response body sizes", response_bytes.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes sent to the destination", tcp_sent.clone());
        registry.register("istio_tcp_received_bytes", "Bytes received from the destination", tcp_received.clone());
        registry.register("istio_tcp_connections_opened", "TCP connections opened", tcp_opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", tcp_closed.clone());
        let hbone_refused_total = Family::<ReasonLabel, Counter>::default();
        let denied_total = Family::<DeniedLabels, Counter>::default();
        let self_calls_total = Family::<ListenerLabel, Counter>::default();
        let over_limit_total = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "redirector_connections_over_limit",
            "Connections to a pod closed as they arrived: over the listener's cap, or over one peer's",
            over_limit_total.clone(),
        );
        let config_rejected = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "redirector_config_rejected_objects",
            "Objects of the config in force rejected for an error (left out, or policies compiled failing closed)",
            config_rejected.clone(),
        );
        registry.register(
            "redirector_self_calls_refused",
            "Connections to a pod's address on one of the proxy's own ports, refused",
            self_calls_total.clone(),
        );
        registry.register(
            "redirector_hbone_refused",
            "HBONE connections refused before a stream opened",
            hbone_refused_total.clone(),
        );
        registry.register(
            "redirector_policy_denied",
            "Connections denied by PeerAuthentication or AuthorizationPolicy",
            denied_total.clone(),
        );
        Metrics {
            registry,
            requests,
            duration_ms,
            request_bytes,
            response_bytes,
            tcp_sent,
            tcp_received,
            tcp_opened,
            tcp_closed,
            hbone_refused_total,
            denied_total,
            self_calls_total,
            over_limit_total,
            config_rejected,
            encode_lock: Mutex::new(()),
            series: Mutex::new(std::collections::HashMap::new()),
            tcp: Mutex::new(std::collections::HashMap::new()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub source_principal: String,
}

impl Metrics {
    pub fn over_limit(&self, listener: &'static str) -> Counter {
        self.over_limit_total.get_or_create(&ListenerLabel { listener }).clone()
    }

    pub fn self_call(&self, listener: &'static str) -> Counter {
        self.self_calls_total.get_or_create(&ListenerLabel { listener }).clone()
    }

    pub fn hbone_refused(&self, reason: &str) -> Counter {
        self.hbone_refused_total.get_or_create(&ReasonLabel { reason: reason.into() }).clone()
    }

    pub fn denied(&self, w: Workload<'_>, peer: Option<&crate::identity::Identity>) -> Counter {
        self.denied_total
            .get_or_create(&DeniedLabels {
                destination_workload: w.name.to_string(),
                destination_workload_namespace: w.namespace.to_string(),
                source_principal: peer.map_or_else(|| "unknown".into(), std::string::ToString::to_string),
            })
            .clone()
    }

    /// Labels of a connection a workload received (reporter destination).
    pub fn inbound_labels(
        &self,
        w: Workload<'_>,
        peer: Option<&crate::identity::Identity>,
        security: &'static str,
    ) -> Labels {
        let namespace = label(w.namespace);
        Labels {
            reporter: Cow::Borrowed("destination"),
            source_workload_namespace: peer.map_or(UNKNOWN, |p| label(&p.namespace)),
            source_principal: peer.map_or(UNKNOWN, |p| Cow::Owned(p.to_string())),
            destination_workload: label(w.name),
            destination_workload_namespace: namespace.clone(),
            destination_service_namespace: namespace,
            destination_principal: w.identity.map_or(UNKNOWN, |id| Cow::Owned(id.to_string())),
            connection_security_policy: Cow::Borrowed(security),
            ..NOTHING_KNOWN
        }
    }
    /// The handles of a request series; `labels` builds its label set the
    /// first time.
    pub fn request_series(&self, key: RequestKey, labels: impl FnOnce() -> Labels) -> RequestSeries {
        cached(&self.series, key, |_| {
            let l = labels();
            RequestSeries {
                requests: self.requests.get_or_create(&l).clone(),
                duration_ms: self.duration_ms.get_or_create(&l).clone(),
                request_bytes: self.request_bytes.get_or_create(&l).clone(),
                response_bytes: self.response_bytes.get_or_create(&l).clone(),
            }
        })
    }

    /// The handles of the TCP series with `labels`.
    pub fn tcp_series(&self, labels: Labels) -> TcpSeries {
        cached(&self.tcp, labels, |l| TcpSeries {
            opened: self.tcp_opened.get_or_create(l).clone(),
            closed: self.tcp_closed.get_or_create(l).clone(),
            sent: self.tcp_sent.get_or_create(l).clone(),
            received: self.tcp_received.get_or_create(l).clone(),
        })
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let _g = self.encode_lock.lock().expect("metrics lock");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The value cached under `key`, made by `make` the first time.
fn cached<K: std::hash::Hash + Eq, V: Clone>(
    map: &Mutex<std::collections::HashMap<K, V>>,
    key: K,
    make: impl FnOnce(&K) -> V,
) -> V {
    let mut map = map.lock().expect("metrics lock");
    if let Some(v) = map.get(&key) {
        return v.clone();
    }
    let v = make(&key);
    map.insert(key, v.clone());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_and_labels_are_exposed() {
        let m = Metrics::default();
        let mut l = Labels::to_service("httpbin.default.svc.cluster.local", "default", "httpbin", "v1", "http");
        l.response_code = "200".into();
        m.requests.get_or_create(&l).inc();
        m.duration_ms.get_or_create(&l).observe(3.0);
        let text = m.encode();
        assert!(text.contains("istio_requests_total{reporter=\"source\""), "{text}");
        assert!(text.contains("destination_service_name=\"httpbin\""), "{text}");
        assert!(text.contains("istio_request_duration_milliseconds_bucket{"), "{text}");
        assert!(text.contains("response_code=\"200\""), "{text}");
    }
}
