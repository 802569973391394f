//! Inbound security as Istio defines it: PeerAuthentication (whether a
//! workload accepts plaintext) and AuthorizationPolicy (who may connect),
//! compiled once per config change and evaluated per connection.
//!
//! Scopes: the root namespace (`istio-system`, mesh-wide), a namespace
//! (no selector), a workload (selector). PeerAuthentication: the narrowest
//! scope wins, `portLevelMtls` only at workload scope, UNSET inherits, the
//! default is PERMISSIVE. AuthorizationPolicy: any matching DENY denies;
//! then, if ALLOW policies apply to the workload, one must match; with none,
//! the connection is allowed. On a port the proxy carries as TCP, an
//! operation or condition naming HTTP fields (paths, methods, hosts,
//! request headers) never matches in an ALLOW rule and is ignored in a DENY
//! rule (so the DENY covers the whole connection), as Istio does for TCP
//! traffic; on an HTTP port every request is checked with all of them.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::pods::PodInfo;
use super::source_dir::{Documents, Problem};
use crate::identity::Identity;
use crate::net::Cidr;

/// Istio's root namespace: policies there without a selector are mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    fn parse(s: Option<&str>) -> Result<MtlsMode, String> {
        match s.unwrap_or("UNSET") {
            "UNSET" => Ok(MtlsMode::Unset),
            "DISABLE" => Ok(MtlsMode::Disable),
            "PERMISSIVE" => Ok(MtlsMode::Permissive),
            "STRICT" => Ok(MtlsMode::Strict),
            other => Err(format!("`{other}` is not a mode; use STRICT, PERMISSIVE, DISABLE or UNSET")),
        }
    }

    pub fn accepts_plaintext(self) -> bool {
        self != MtlsMode::Strict
    }
}

#[derive(Debug, Clone)]
struct PeerAuth {
    namespace: String,
    selector: Option<BTreeMap<String, String>>,
    mode: MtlsMode,
    ports: BTreeMap<u16, MtlsMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default)]
struct Source {
    principals: Vec<String>,
    not_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    ip_blocks: Vec<Cidr>,
    not_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Clone, Default)]
struct Operation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    paths: Vec<String>,
    not_paths: Vec<String>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    hosts: Vec<String>,
    not_hosts: Vec<String>,
}

/// A `when` condition, by key.
#[derive(Debug, Clone)]
enum ConditionKey {
    /// `request.headers[name]` (name lower-cased): HTTP only.
    Header(String),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
}

#[derive(Debug, Clone)]
struct Condition {
    key: ConditionKey,
    values: Vec<String>,
    not_values: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
    /// The rule names something this proxy cannot evaluate (a field or
    /// condition it does not implement, a value that does not parse): it
    /// fails closed, as ztunnel does. In ALLOW it never matches; in DENY
    /// it matches every connection and request of the workloads the
    /// policy selects.
    unevaluable: bool,
}

/// What a rule may look at in an HTTP request (destination-side L7).
pub struct RequestAttrs<'a> {
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    /// The Host (`:authority`), port included as the client sent it.
    pub host: &'a str,
    pub headers: &'a hyper::HeaderMap,
}

#[derive(Debug, Clone)]
struct Authz {
    namespace: String,
    name: String,
    selector: Option<BTreeMap<String, String>>,
    action: Action,
    rules: Vec<Rule>,
}

/// The compiled security policies.
#[derive(Debug, Clone, Default)]
pub struct Security {
    peer_auth: Vec<PeerAuth>,
    authz: Vec<Authz>,
}

fn selects(selector: &Option<BTreeMap<String, String>>, pod: &PodInfo) -> bool {
    selector.as_ref().is_none_or(|s| s.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
}

/// Istio's string match: exact, `*`, `prefix*` or `*suffix`.
fn matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(p) = pattern.strip_suffix('*') {
        return value.starts_with(p);
    }
    if let Some(s) = pattern.strip_prefix('*') {
        return value.ends_with(s);
    }
    pattern == value
}

impl Source {
    fn matches(&self, peer: Option<&Identity>, src: IpAddr) -> bool {
        // Principals are written without the spiffe:// scheme.
        let principal = peer.map(|p| p.to_string().trim_start_matches("spiffe://").to_string());
        let ns = peer.map(|p| p.namespace.as_str());
        let any = |list: &[String], v: Option<&str>| v.is_some_and(|v| list.iter().any(|p| matches(p, v)));
        (self.principals.is_empty() || any(&self.principals, principal.as_deref()))
            && !any(&self.not_principals, principal.as_deref())
            && (self.namespaces.is_empty() || any(&self.namespaces, ns))
            && !any(&self.not_namespaces, ns)
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|c| c.contains(src)))
            && !self.not_ip_blocks.iter().any(|c| c.contains(src))
    }
}

/// Istio's string match on each of `list` (empty: anything).
fn any_matches(list: &[String], value: &str) -> bool {
    list.iter().any(|p| matches(p, value))
}

/// A Host matches with or without its port, case-insensitively, as
/// Istio's `hosts` do.
fn host_matches(list: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let bare = host.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map_or(host.as_str(), |(h, _)| h);
    list.iter().map(|p| p.to_ascii_lowercase()).any(|p| matches(&p, &host) || matches(&p, bare))
}

impl Operation {
    /// Names HTTP-only fields (paths, methods, hosts).
    fn http_only(&self) -> bool {
        !(self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }

    /// On a connection (`req` none), an operation with HTTP fields never
    /// matches in ALLOW and has them ignored in DENY (Istio for TCP).
    fn matches(&self, port: u16, action: Action, req: Option<&RequestAttrs<'_>>) -> bool {
        let ports = (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port);
        let Some(r) = req else {
            return ports && !(self.http_only() && action == Action::Allow);
        };
        ports
            && (self.paths.is_empty() || any_matches(&self.paths, r.path))
            && !any_matches(&self.not_paths, r.path)
            && (self.methods.is_empty() || any_matches(&self.methods, r.method))
            && !any_matches(&self.not_methods, r.method)
            && (self.hosts.is_empty() || host_matches(&self.hosts, r.host))
            && !host_matches(&self.not_hosts, r.host)
    }
}

impl Condition {
    fn parse(key: &str) -> Result<ConditionKey, String> {
        if let Some(name) = key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
            if name.is_empty() {
                return Err("`request.headers[]` names no header".into());
            }
            return Ok(ConditionKey::Header(name.to_ascii_lowercase()));
        }
        Ok(match key {
            "source.ip" | "remote.ip" => ConditionKey::SourceIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.port" => ConditionKey::DestinationPort,
            other => {
                return Err(format!(
                    "`{other}` is not a supported key; use request.headers[NAME], source.ip, remote.ip, source.namespace, source.principal or destination.port"
                ))
            }
        })
    }

    /// On a connection, a header condition is HTTP only: never true in
    /// ALLOW, ignored in DENY.
    fn matches(
        &self,
        peer: Option<&Identity>,
        src: IpAddr,
        port: u16,
        action: Action,
        req: Option<&RequestAttrs<'_>>,
    ) -> bool {
        let value: Option<String> = match &self.key {
            ConditionKey::Header(name) => match req {
                Some(r) => r.headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(str::to_string),
                None => return action == Action::Deny,
            },
            ConditionKey::SourceIp => {
                let ok = |list: &[String]| list.iter().any(|c| Cidr::parse(c).is_ok_and(|c| c.contains(src)));
                return (self.values.is_empty() || ok(&self.values)) && !ok(&self.not_values);
            }
            ConditionKey::SourceNamespace => peer.map(|p| p.namespace.clone()),
            ConditionKey::SourcePrincipal => peer.map(|p| p.to_string().trim_start_matches("spiffe://").to_string()),
            ConditionKey::DestinationPort => Some(port.to_string()),
        };
        let has = |list: &[String]| value.as_deref().is_some_and(|v| any_matches(list, v));
        (self.values.is_empty() || has(&self.values)) && !has(&self.not_values)
    }
}

impl Rule {
    fn matches(
        &self,
        peer: Option<&Identity>,
        src: IpAddr,
        port: u16,
        action: Action,
        req: Option<&RequestAttrs<'_>>,
    ) -> bool {
        if self.unevaluable {
            return action == Action::Deny;
        }
        (self.from.is_empty() || self.from.iter().any(|f| f.matches(peer, src)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.matches(port, action, req)))
            && self.when.iter().all(|w| w.matches(peer, src, port, action, req))
    }

    /// Names anything only an HTTP request has.
    fn http_only(&self) -> bool {
        self.to.iter().any(Operation::http_only) || self.when.iter().any(|w| matches!(w.key, ConditionKey::Header(_)))
    }
}

impl Security {
    fn applies<'a>(ns: &'a str, selector: &'a Option<BTreeMap<String, String>>, pod: &PodInfo) -> bool {
        (ns == ROOT_NAMESPACE || ns == pod.namespace) && selects(selector, pod)
    }

    /// The PeerAuthentication mode for `port` of `pod`.
    pub fn mtls_mode(&self, pod: &PodInfo, port: u16) -> MtlsMode {
        let workload = self
            .peer_auth
            .iter()
            .find(|p| p.selector.is_some() && p.namespace == pod.namespace && selects(&p.selector, pod));
        if let Some(w) = workload {
            if let Some(m) = w.ports.get(&port).filter(|m| **m != MtlsMode::Unset) {
                return *m;
            }
            if w.mode != MtlsMode::Unset {
                return w.mode;
            }
        }
        let scoped = |ns: &str| {
            self.peer_auth
                .iter()
                .find(|p| p.selector.is_none() && p.namespace == ns && p.mode != MtlsMode::Unset)
                .map(|p| p.mode)
        };
        scoped(&pod.namespace).or_else(|| scoped(ROOT_NAMESPACE)).unwrap_or(MtlsMode::Permissive)
    }

    /// Whether a connection from `peer` (`None`: plaintext) at `src` to
    /// `port` of `pod` is allowed; `Err` names the policy that refused it.
    /// This is the check for a port the proxy carries as TCP.
    pub fn authorize(&self, pod: &PodInfo, peer: Option<&Identity>, src: IpAddr, port: u16) -> Result<(), String> {
        self.decide(pod, peer, src, port, None)
    }

    /// The same for one HTTP request on an HTTP port (destination-side
    /// L7): every field of every rule applies.
    pub fn authorize_request(
        &self,
        pod: &PodInfo,
        peer: Option<&Identity>,
        src: IpAddr,
        port: u16,
        req: &RequestAttrs<'_>,
    ) -> Result<(), String> {
        self.decide(pod, peer, src, port, Some(req))
    }

    /// The policies of `pod` that name HTTP fields, `namespace/name` each:
    /// on a TCP port, Istio never matches them in ALLOW and applies a DENY
    /// to the whole connection (for `analyze`).
    pub fn http_policies(&self, pod: &PodInfo) -> Vec<String> {
        self.authz
            .iter()
            .filter(|a| Self::applies(&a.namespace, &a.selector, pod) && a.rules.iter().any(Rule::http_only))
            .map(|a| format!("{}/{}", a.namespace, a.name))
            .collect()
    }

    fn decide(
        &self,
        pod: &PodInfo,
        peer: Option<&Identity>,
        src: IpAddr,
        port: u16,
        req: Option<&RequestAttrs<'_>>,
    ) -> Result<(), String> {
        let applying: Vec<&Authz> =
            self.authz.iter().filter(|a| Self::applies(&a.namespace, &a.selector, pod)).collect();
        for a in applying.iter().filter(|a| a.action == Action::Deny) {
            if a.rules.iter().any(|r| r.matches(peer, src, port, Action::Deny, req)) {
                return Err(format!("denied by AuthorizationPolicy {}/{} (DENY)", a.namespace, a.name));
            }
        }
        let allows: Vec<&&Authz> = applying.iter().filter(|a| a.action == Action::Allow).collect();
        if allows.is_empty()
            || allows.iter().any(|a| a.rules.iter().any(|r| r.matches(peer, src, port, Action::Allow, req)))
        {
            return Ok(());
        }
        Err(format!(
            "no ALLOW rule matches (AuthorizationPolicy {})",
            allows.iter().map(|a| format!("{}/{}", a.namespace, a.name)).collect::<Vec<_>>().join(", ")
        ))
    }

    /// Compile the documents' PeerAuthentications and
    /// AuthorizationPolicies; bad values are errors naming the field.
    pub fn compile(docs: &Documents, errors: &mut Vec<Problem>, warnings: &mut Vec<Problem>) -> Security {
        let mut sec = Security::default();
        let err = |errors: &mut Vec<Problem>, origin: &super::source_dir::Origin, field: String, reason: String| {
            errors.push(Problem { origin: origin.clone(), field, reason });
        };
        let warn = err;
        for d in &docs.peer_authentications {
            // A mode that does not parse is taken as STRICT: the object is
            // reported, and its workloads do not lose mTLS over a typo.
            let mode = match MtlsMode::parse(d.spec.mtls.as_ref().and_then(|m| m.mode.as_deref())) {
                Ok(m) => m,
                Err(e) => {
                    err(errors, &d.origin, "spec.mtls.mode".into(), format!("{e}; STRICT applies until it is fixed"));
                    MtlsMode::Strict
                }
            };
            let mut ports = BTreeMap::new();
            for (p, m) in &d.spec.port_level_mtls {
                let m = MtlsMode::parse(m.mode.as_deref()).unwrap_or_else(|e| {
                    err(
                        errors,
                        &d.origin,
                        format!("spec.portLevelMtls.{p}.mode"),
                        format!("{e}; STRICT applies until it is fixed"),
                    );
                    MtlsMode::Strict
                });
                ports.insert(*p, m);
            }
            let selector = d.spec.selector.as_ref().map(|s| s.match_labels.clone()).filter(|s| !s.is_empty());
            if !ports.is_empty() && selector.is_none() {
                err(
                    errors,
                    &d.origin,
                    "spec.portLevelMtls".into(),
                    "needs a workload selector (Istio applies port-level mTLS only at workload scope)".into(),
                );
            }
            sec.peer_auth.push(PeerAuth { namespace: d.namespace().to_string(), selector, mode, ports });
        }
        for d in &docs.authorization_policies {
            // Fields of a rule the loader did not know (a newer Istio's):
            // that rule cannot be evaluated.
            let unknown: Vec<&str> = docs
                .warnings
                .iter()
                .filter(|w| w.origin == d.origin && w.field.starts_with("spec.rules["))
                .map(|w| w.field.as_str())
                .collect();
            let (action, mut rules): (Action, Vec<Rule>) = match d.spec.action.as_deref().unwrap_or("ALLOW") {
                "ALLOW" => (Action::Allow, Vec::new()),
                "DENY" => (Action::Deny, Vec::new()),
                // The external authorizer cannot be asked: what it would
                // decide on is denied.
                "CUSTOM" => {
                    warn(
                        warnings,
                        &d.origin,
                        "spec.action".into(),
                        "CUSTOM (an external authorizer) is not supported: the requests its rules select are denied"
                            .into(),
                    );
                    (Action::Deny, Vec::new())
                }
                // AUDIT decides nothing.
                "AUDIT" => {
                    warn(
                        warnings,
                        &d.origin,
                        "spec.action".into(),
                        "AUDIT is not supported; the policy changes no decision and is ignored".into(),
                    );
                    continue;
                }
                other => {
                    err(errors, &d.origin, "spec.action".into(), format!("`{other}` is not an action; use ALLOW or DENY. Until it is fixed the policy denies every connection to the workloads it selects"));
                    (Action::Deny, vec![Rule { unevaluable: true, ..Rule::default() }])
                }
            };
            let compiled: Vec<Rule> = d
                .spec
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| compile_rule(&d.origin, i, r, action, &unknown, errors, warnings))
                .collect();
            rules.extend(compiled);
            sec.authz.push(Authz {
                namespace: d.namespace().to_string(),
                name: d.meta.name.clone(),
                selector: d.spec.selector.as_ref().map(|s| s.match_labels.clone()).filter(|s| !s.is_empty()),
                action,
                rules,
            });
        }
        sec
    }
}

/// One AuthorizationPolicy rule (`spec.rules[i]`); bad values are errors
/// naming the field. A rule with a bad value, a field this proxy does not
/// evaluate (`unknown`: fields the loader did not know) or a condition key
/// it does not implement fails closed ([`Rule::unevaluable`]), with a
/// warning saying what that does.
fn compile_rule(
    origin: &super::source_dir::Origin,
    i: usize,
    r: &super::resources::AuthzRule,
    action: Action,
    unknown: &[&str],
    errors: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Rule {
    let err = |errors: &mut Vec<Problem>, origin: &super::source_dir::Origin, field: String, reason: String| {
        errors.push(Problem { origin: origin.clone(), field, reason });
    };
    let errors_before = errors.len();
    let prefix = format!("spec.rules[{i}]");
    let mut unsupported: Vec<String> = unknown
        .iter()
        .filter(|f| f.starts_with(&prefix) && f[prefix.len()..].starts_with(['.', '[']))
        .map(ToString::to_string)
        .collect();
    for (j, f) in r.from.iter().enumerate() {
        let s = &f.source;
        for (name, list) in [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ] {
            if !list.is_empty() {
                unsupported.push(format!("{prefix}.from[{j}].source.{name}"));
            }
        }
    }
    let mut rule = Rule::default();
    for (j, f) in r.from.iter().enumerate() {
        let cidrs = |list: &[String], name: &str, errors: &mut Vec<Problem>| -> Vec<Cidr> {
            list.iter()
                .filter_map(|c| match Cidr::parse(c) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        err(errors, origin, format!("spec.rules[{i}].from[{j}].source.{name}"), e);
                        None
                    }
                })
                .collect()
        };
        rule.from.push(Source {
            principals: f.source.principals.clone(),
            not_principals: f.source.not_principals.clone(),
            namespaces: f.source.namespaces.clone(),
            not_namespaces: f.source.not_namespaces.clone(),
            ip_blocks: cidrs(&f.source.ip_blocks, "ipBlocks", errors),
            not_ip_blocks: cidrs(&f.source.not_ip_blocks, "notIpBlocks", errors),
        });
    }
    for (j, t) in r.to.iter().enumerate() {
        let ports = |list: &[String], name: &str, errors: &mut Vec<Problem>| -> Vec<u16> {
            list.iter()
                .filter_map(|p| match p.parse::<u16>() {
                    Ok(p) if p > 0 => Some(p),
                    _ => {
                        err(
                            errors,
                            origin,
                            format!("spec.rules[{i}].to[{j}].operation.{name}"),
                            format!("`{p}` is not a port"),
                        );
                        None
                    }
                })
                .collect()
        };
        let o = &t.operation;
        rule.to.push(Operation {
            ports: ports(&o.ports, "ports", errors),
            not_ports: ports(&o.not_ports, "notPorts", errors),
            paths: o.paths.clone(),
            not_paths: o.not_paths.clone(),
            methods: o.methods.clone(),
            not_methods: o.not_methods.clone(),
            hosts: o.hosts.clone(),
            not_hosts: o.not_hosts.clone(),
        });
    }
    for (j, w) in r.when.iter().enumerate() {
        match Condition::parse(&w.key) {
            Ok(key) => rule.when.push(Condition { key, values: w.values.clone(), not_values: w.not_values.clone() }),
            Err(e) => {
                warnings.push(Problem { origin: origin.clone(), field: format!("{prefix}.when[{j}].key"), reason: e });
                unsupported.push(format!("{prefix}.when[{j}].key"));
            }
        }
    }
    if !unsupported.is_empty() || errors.len() > errors_before {
        rule.unevaluable = true;
        let what =
            if unsupported.is_empty() { "a value that does not parse".to_string() } else { unsupported.join(", ") };
        let effect = match action {
            Action::Allow => "in ALLOW this rule never matches",
            Action::Deny => "in DENY this rule denies every connection and request to the workloads the policy selects",
        };
        warnings.push(Problem {
            origin: origin.clone(),
            field: prefix,
            reason: format!("names {what}, which this proxy cannot evaluate: {effect} (fail closed)"),
        });
    }
    rule
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(yaml: &str) -> Security {
        let dir = std::env::temp_dir().join(format!("redirector-sec-{}-{}", std::process::id(), yaml.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.yaml"), yaml).unwrap();
        let docs = crate::mesh::source_dir::load_dir(&dir).unwrap();
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        let s = Security::compile(&docs, &mut errors, &mut warnings);
        assert!(errors.is_empty(), "{errors:?}");
        let _ = std::fs::remove_dir_all(&dir);
        s
    }

    fn pod(ns: &str, app: &str) -> PodInfo {
        PodInfo {
            name: app.into(),
            namespace: ns.into(),
            uid: None,
            node_name: None,
            service_account: app.into(),
            ips: vec![],
            host_ip: None,
            labels: [("app".to_string(), app.to_string())].into(),
            netns: None,
            cgroup: None,
            until_ready: Default::default(),
            enrolled: true,
        }
    }

    #[test]
    fn the_narrowest_peer_authentication_wins() {
        let s = compile(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ns, namespace: legacy}\nspec: {mtls: {mode: PERMISSIVE}}\n---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: web, namespace: legacy}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n",
        );
        assert_eq!(s.mtls_mode(&pod("default", "a"), 80), MtlsMode::Strict);
        assert_eq!(s.mtls_mode(&pod("legacy", "a"), 80), MtlsMode::Permissive);
        assert_eq!(s.mtls_mode(&pod("legacy", "web"), 80), MtlsMode::Strict);
        assert_eq!(s.mtls_mode(&pod("legacy", "web"), 8080), MtlsMode::Disable);
        assert_eq!(Security::default().mtls_mode(&pod("x", "y"), 1), MtlsMode::Permissive);
    }

    #[test]
    fn deny_wins_over_allow_and_no_allow_means_allow() {
        let s = compile(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-a, namespace: default}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/a]}}]\n    to: [{operation: {ports: [\"8080\"]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-ip, namespace: default}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {ipBlocks: [198.18.9.0/24]}}]\n",
        );
        let a = Identity::new("cluster.local", "default", "a");
        let b = Identity::new("cluster.local", "default", "b");
        let ip = "198.18.1.2".parse().unwrap();
        let web = pod("default", "web");
        assert!(s.authorize(&web, Some(&a), ip, 8080).is_ok());
        assert!(s.authorize(&web, Some(&b), ip, 8080).unwrap_err().contains("no ALLOW rule"));
        assert!(s.authorize(&web, Some(&a), ip, 9090).is_err());
        assert!(s.authorize(&web, None, ip, 8080).is_err());
        let denied = s.authorize(&web, Some(&a), "198.18.9.1".parse().unwrap(), 8080).unwrap_err();
        assert!(denied.contains("deny-ip"), "{denied}");
        // No ALLOW policy selects this workload: allowed unless denied.
        assert!(s.authorize(&pod("default", "other"), None, ip, 1).is_ok());
    }

    #[test]
    fn http_only_operations_never_allow_and_always_deny_at_l4() {
        let s = compile(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: default}\nspec:\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: default}\nspec:\n  selector: {matchLabels: {app: admin}}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin]}}]\n",
        );
        let ip = "198.18.1.2".parse().unwrap();
        assert!(s.authorize(&pod("default", "web"), None, ip, 80).is_err());
        assert!(s.authorize(&pod("default", "admin"), None, ip, 80).unwrap_err().contains("no-admin"));
    }

    /// On an HTTP port every field of a rule applies to each request; on a
    /// TCP port the same policies act as Istio's do for TCP: the ALLOW
    /// with HTTP fields never matches, the DENY with them covers the
    /// connection.
    #[test]
    fn http_fields_apply_per_request_and_as_istio_on_tcp() {
        let sec = compile(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: default}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin*], notMethods: [HEAD]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: readers, namespace: default}\nspec:\n  selector: {matchLabels: {app: web}}\n  rules:\n  - from: [{source: {namespaces: [default]}}]\n    to: [{operation: {methods: [GET], hosts: [web.default.svc.cluster.local], notPaths: [/private]}}]\n    when: [{key: 'request.headers[X-Team]', values: [blue, 'green*']}]\n",
        );
        let web = pod("default", "web");
        let a = Identity::new("cluster.local", "default", "a");
        let src: IpAddr = "10.0.0.1".parse().unwrap();
        let check = |method: &str, path: &str, host: &str, team: Option<&str>| {
            let mut headers = hyper::HeaderMap::new();
            if let Some(t) = team {
                headers.insert("x-team", t.parse().unwrap());
            }
            let req = RequestAttrs { method, path, host, headers: &headers };
            sec.authorize_request(&web, Some(&a), src, 8080, &req)
        };
        let host = "web.default.svc.cluster.local:8080";
        assert!(check("GET", "/items", host, Some("blue")).is_ok());
        assert!(check("GET", "/items", "WEB.default.svc.cluster.local", Some("greenish")).is_ok());
        assert!(check("GET", "/items", host, Some("red")).unwrap_err().contains("readers"), "when on a header");
        assert!(check("GET", "/items", host, None).is_err(), "a missing header matches no value");
        assert!(check("POST", "/items", host, Some("blue")).is_err(), "methods");
        assert!(check("GET", "/private", host, Some("blue")).is_err(), "notPaths");
        assert!(check("GET", "/items", "other.default.svc.cluster.local", Some("blue")).is_err(), "hosts");
        assert!(check("GET", "/admin/users", host, Some("blue")).unwrap_err().contains("no-admin"), "DENY by path");
        assert!(check("HEAD", "/admin/users", host, Some("blue")).is_err(), "HEAD is not GET: no ALLOW matches");
        // As TCP: the DENY's HTTP fields are ignored, so it denies the
        // connection; the ALLOW could not have matched anyway.
        let tcp = sec.authorize(&web, Some(&a), src, 8080);
        assert!(tcp.unwrap_err().contains("no-admin"));
        assert_eq!(sec.http_policies(&web), ["default/no-admin", "default/readers"]);
    }

    /// H1: what the proxy cannot evaluate fails closed. Each field:
    /// `requestPrincipals`, `notRequestPrincipals`, `remoteIpBlocks`,
    /// `notRemoteIpBlocks`, a condition key it does not implement, a field
    /// the loader does not know, and a value that does not parse. In ALLOW
    /// the rule never matches (Istio's "require a JWT" policy does not
    /// become "allow everyone"); in DENY it denies everything it could.
    #[test]
    fn what_the_proxy_cannot_evaluate_never_allows_and_always_denies() {
        let a = Identity::new("cluster.local", "default", "a");
        let src: IpAddr = "10.0.0.1".parse().unwrap();
        let web = pod("default", "web");
        let fields = [
            "from: [{source: {requestPrincipals: ['*']}}]",
            "from: [{source: {notRequestPrincipals: ['*']}}]",
            "from: [{source: {remoteIpBlocks: [10.0.0.0/8]}}]",
            "from: [{source: {notRemoteIpBlocks: [192.0.2.0/24]}}]",
            "when: [{key: 'request.auth.claims[iss]', values: [x]}]",
            "from: [{source: {principals: ['*'], serviceAccounts: [a]}}]",
            "from: [{source: {ipBlocks: [not-a-cidr]}}]",
            "to: [{operation: {ports: [http]}}]",
        ];
        for f in fields {
            for action in ["ALLOW", "DENY"] {
                let yaml = format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: default}}\nspec:\n  action: {action}\n  rules:\n  - {f}\n");
                let dir = std::env::temp_dir().join(format!("redirector-sec-h1-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("p.yaml"), &yaml).unwrap();
                let docs = crate::mesh::source_dir::load_dir(&dir).unwrap();
                let _ = std::fs::remove_dir_all(&dir);
                let (mut errors, mut warnings) = (Vec::new(), docs.warnings.clone());
                let sec = Security::compile(&docs, &mut errors, &mut warnings);
                let headers = hyper::HeaderMap::new();
                let req = RequestAttrs { method: "GET", path: "/", host: "web", headers: &headers };
                let (conn, request) =
                    (sec.authorize(&web, Some(&a), src, 8080), sec.authorize_request(&web, Some(&a), src, 8080, &req));
                assert!(conn.is_err() && request.is_err(), "{action} with `{f}` must refuse: {conn:?} {request:?}");
                let said =
                    warnings.iter().find(|w| w.field == "spec.rules[0]").unwrap_or_else(|| panic!("{f}: {warnings:?}"));
                let effect = if action == "ALLOW" { "never matches" } else { "denies every connection" };
                assert!(said.reason.contains(effect) && said.reason.contains("fail closed"), "{said}");
            }
        }
    }

    /// A PeerAuthentication whose mode does not parse is reported and
    /// taken as STRICT; an unknown action denies until it is fixed;
    /// CUSTOM denies what its rules select; AUDIT decides nothing.
    #[test]
    fn broken_security_objects_fail_closed() {
        let dir = std::env::temp_dir().join(format!("redirector-sec-broken-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("p.yaml"),
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRIKT}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: default}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENNY\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: default}\nspec:\n  selector: {matchLabels: {app: api}}\n  action: CUSTOM\n  provider: {name: opa}\n  rules: [{to: [{operation: {ports: ['9000']}}]}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit, namespace: default}\nspec:\n  action: AUDIT\n  rules: [{}]\n",
        )
        .unwrap();
        let docs = crate::mesh::source_dir::load_dir(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        let sec = Security::compile(&docs, &mut errors, &mut warnings);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.mtls.mode", "spec.action"], "{errors:?}");
        assert_eq!(sec.mtls_mode(&pod("default", "x"), 80), MtlsMode::Strict);
        let src: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(sec.authorize(&pod("default", "web"), None, src, 80).unwrap_err().contains("typo"));
        assert!(sec.authorize(&pod("default", "api"), None, src, 9000).unwrap_err().contains("ext"));
        assert!(sec.authorize(&pod("default", "api"), None, src, 9001).is_ok());
        assert!(sec.authorize(&pod("default", "other"), None, src, 80).is_ok(), "AUDIT decides nothing");
    }
}
