//! Istio's `exportTo`: which namespaces see a VirtualService, a
//! DestinationRule, a ServiceEntry or a Service. `.` is the object's own
//! namespace, `*` every namespace, `~` none, any other value a namespace
//! by name. An object without `exportTo` takes the mesh-wide default
//! (`mesh.defaultVirtualServiceExportTo`, ... in the agent settings),
//! which is `*` unless set, as in Istio.

#![forbid(unsafe_code)]

/// The namespaces an object is visible to, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub enum Export {
    /// Every namespace (`*`).
    #[default]
    All,
    /// These namespaces only (`.` resolved to the object's own); empty:
    /// none (`~`).
    Only(Vec<String>),
}

impl Export {
    /// Whether a client in namespace `ns` sees the object. A client whose
    /// namespace is not known (the node itself, a process outside any
    /// workload) sees only what is exported to every namespace.
    pub fn visible_to(&self, ns: Option<&str>) -> bool {
        match self {
            Export::All => true,
            Export::Only(list) => ns.is_some_and(|n| list.iter().any(|x| x == n)),
        }
    }

    /// Resolve `list` (an object's `exportTo`, or the default when it is
    /// empty) for an object in namespace `own`.
    pub fn resolve(list: &[String], default: &[String], own: &str) -> Export {
        let list = if list.is_empty() { default } else { list };
        if list.is_empty() || list.iter().any(|x| x == "*") {
            return Export::All;
        }
        let mut only: Vec<String> = list
            .iter()
            .filter(|x| x.as_str() != "~")
            .map(|x| if x == "." { own.to_string() } else { x.clone() })
            .collect();
        only.sort();
        only.dedup();
        Export::Only(only)
    }
}

/// Whether `x` is a namespace name (a DNS label: lower-case letters,
/// digits and `-`, at most 63, not starting or ending with `-`).
pub fn is_namespace_name(x: &str) -> bool {
    !x.is_empty()
        && x.len() <= 63
        && x.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !x.starts_with('-')
        && !x.ends_with('-')
}

/// What is wrong with an `exportTo` list, if anything: each value is `.`,
/// `*`, `~` or a namespace name, and `~` stands alone.
pub fn check(list: &[String]) -> Result<(), String> {
    for x in list {
        if !(is_namespace_name(x) || x == "." || x == "*" || x == "~") {
            return Err(format!("`{x}` is not `.`, `*`, `~` or a namespace name"));
        }
    }
    if list.len() > 1 && list.iter().any(|x| x == "~") {
        return Err("`~` (visible to no namespace) cannot be combined with other values".into());
    }
    Ok(())
}

/// The mesh-wide defaults for objects without `exportTo` (Istio's
/// MeshConfig fields of the same names); empty: `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportDefaults {
    pub services: Vec<String>,
    pub virtual_services: Vec<String>,
    pub destination_rules: Vec<String>,
}

/// The rules a client in `client_ns` sees (their VirtualService's
/// `exportTo`), its own namespace's first, as Istio orders a sidecar's
/// VirtualServices: another namespace's rules for a host cannot get ahead
/// of the client's own.
pub fn visible<'m, R: Exported>(rules: &'m [R], client_ns: Option<&str>) -> Vec<&'m R> {
    let mut seen: Vec<&R> = rules.iter().filter(|r| r.export().visible_to(client_ns)).collect();
    if let Some(ns) = client_ns {
        seen.sort_by_key(|r| r.namespace() != ns);
    }
    seen
}

/// A route rule's VirtualService namespace and export.
pub trait Exported {
    fn export(&self) -> &Export;
    fn namespace(&self) -> &str;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(x: &[&str]) -> Vec<String> {
        x.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn export_to_as_istio_reads_it() {
        assert_eq!(Export::resolve(&[], &[], "a"), Export::All);
        assert_eq!(Export::resolve(&[], &v(&["."]), "a"), Export::Only(v(&["a"])));
        assert_eq!(Export::resolve(&v(&["*"]), &v(&["."]), "a"), Export::All, "the object's own wins");
        assert_eq!(Export::resolve(&v(&[".", "b"]), &[], "a"), Export::Only(v(&["a", "b"])));
        assert_eq!(Export::resolve(&v(&["~"]), &[], "a"), Export::Only(vec![]));
        let only_a = Export::Only(v(&["a"]));
        assert!(only_a.visible_to(Some("a")) && !only_a.visible_to(Some("b")) && !only_a.visible_to(None));
        assert!(Export::All.visible_to(None));
        assert!(check(&v(&[".", "*", "team-1"])).is_ok());
        assert!(check(&v(&["Team"])).unwrap_err().contains("`Team`"));
        assert!(check(&v(&["~", "."])).is_err());
    }

    /// Namespace `evil` against `default`'s service `web`: a route it
    /// keeps to itself, or that the mesh default keeps to it, changes
    /// nothing for `default`'s clients; its exported route comes after
    /// `default`'s own; a mesh-bound `*` is rejected; its DestinationRule
    /// for `web` is left out; a ServiceEntry it keeps to itself is no name
    /// or service to others.
    #[test]
    fn a_namespace_cannot_take_another_namespaces_traffic() {
        use crate::mesh::model::{Action, Mesh, Scope};
        use crate::mesh::source_dir::{load_text, Documents};
        let base = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.5, ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: sink, namespace: evil}\nspec: {clusterIP: 10.96.0.6, ports: [{name: http, port: 80}]}\n";
        let vs = |ns: &str, export: &str| {
            format!("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: take-{ns}, namespace: {ns}}}\nspec:\n  hosts: [web.default.svc.cluster.local]\n  {export}\n  http: [{{route: [{{destination: {{host: {}}}}}]}}]\n", if ns == "evil" { "sink.evil.svc.cluster.local" } else { "web.default.svc.cluster.local" })
        };
        let compile = |yaml: &str, scope: &Scope| {
            let (mut docs, mut errors) = (Documents::default(), Vec::new());
            load_text(std::path::Path::new("m.yaml"), yaml, &mut docs, &mut errors);
            assert!(errors.is_empty(), "{errors:?}");
            Mesh::compile_in(&docs, scope)
        };
        let goes_to = |m: &Mesh, ns: &str| {
            let web = m.service_by_host("web.default.svc.cluster.local").unwrap();
            let rules = visible(m.http_routes.get(&web).map_or(&[][..], Vec::as_slice), Some(ns));
            match rules.first().map(|r| &r.action) {
                Some(Action::Route(d)) => m.services[d[0].service].hostname.clone(),
                _ => "web itself".to_string(),
            }
        };
        let scope = Scope::new("istio-system");
        let m = compile(&(base.to_string() + &vs("evil", "exportTo: ['.']")), &scope).unwrap();
        assert_eq!(goes_to(&m, "default"), "web itself");
        assert_eq!(goes_to(&m, "evil"), "sink.evil.svc.cluster.local");
        // Exported (Istio's default): default's own route, though newer,
        // comes first for default's clients.
        let m = compile(&(base.to_string() + &vs("evil", "") + &vs("default", "")), &scope).unwrap();
        assert_eq!(goes_to(&m, "default"), "web.default.svc.cluster.local");
        // The mesh default keeps evil's unexported route to evil.
        let mut kept = scope.clone();
        kept.exports.virtual_services = vec![".".into()];
        let m = compile(&(base.to_string() + &vs("evil", "")), &kept).unwrap();
        assert_eq!(goes_to(&m, "default"), "web itself");
        // A mesh-bound `*`.
        let star = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: all, namespace: evil}\nspec:\n  hosts: ['*']\n  tcp: [{route: [{destination: {host: sink}}]}]\n";
        let e = compile(&(base.to_string() + star), &scope).unwrap_err();
        assert!(e[0].field == "spec.hosts" && e[0].reason.contains("`*` is not allowed"), "{e:?}");
        // evil's DestinationRule for web.
        let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: evil}\nspec: {host: web.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: RANDOM}}}\n";
        let m = compile(&(base.to_string() + dr), &scope).unwrap();
        assert!(m.policies.is_empty(), "evil's DestinationRule applies to web");
        assert!(
            m.warnings.iter().any(|w| w.origin.name == "evil/web" && w.reason.contains("ignored")),
            "{:?}",
            m.warnings
        );
        // A ServiceEntry evil keeps to itself.
        let se = "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: evil}\nspec: {hosts: [api.example.com], addresses: [240.0.0.9], ports: [{number: 443, name: tls}], resolution: STATIC, endpoints: [{address: 198.18.9.9}], exportTo: ['.']}\n";
        let m = compile(&(base.to_string() + se), &scope).unwrap();
        assert_eq!(m.resolve_name("api.example.com", Some("default")), None);
        assert!(m.resolve_name("api.example.com", Some("evil")).is_some());
        let (svc, _) = m.service_at("240.0.0.9:443".parse().unwrap()).unwrap();
        assert!(!m.services[svc].export.visible_to(Some("default")));
    }
}
