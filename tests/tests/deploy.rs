//! The files under `deploy/` that users run as they are: they must stay consistent.

use std::collections::BTreeSet;

fn yaml(path: &str) -> serde_json::Value {
    let full = concat!(env!("CARGO_MANIFEST_DIR"), "/../").to_string() + path;
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{full} is not valid YAML: {e}"))
}

fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn the_collector_config_receives_otlp_and_every_pipeline_part_is_defined() {
    let c = yaml("deploy/otel/otel-collector.yaml");
    let grpc = c["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
        .as_str()
        .unwrap();
    assert!(
        grpc.ends_with(":4317"),
        "OTLP/gRPC on 4317, where mode exports"
    );
    let pipeline = &c["service"]["pipelines"]["traces"];
    for (part, defined) in [
        ("receivers", keys(&c["receivers"])),
        ("processors", keys(&c["processors"])),
        ("exporters", keys(&c["exporters"])),
    ] {
        let used: Vec<String> = serde_json::from_value(pipeline[part].clone()).unwrap();
        assert!(!used.is_empty(), "the traces pipeline has {part}");
        for u in used {
            assert!(
                defined.contains(&u),
                "{part}: '{u}' is used but not defined"
            );
        }
    }
    // The exporter points at the Jaeger service of the compose file.
    let compose = yaml("deploy/otel/docker-compose.yaml");
    let jaeger = c["exporters"]["otlp/jaeger"]["endpoint"].as_str().unwrap();
    let host = jaeger.split(':').next().unwrap();
    assert!(
        keys(&compose["services"]).contains(host),
        "no '{host}' service in the compose file"
    );
    let mounted = compose["services"]["otel-collector"]["volumes"][0]
        .as_str()
        .unwrap();
    assert!(mounted.starts_with("./otel-collector.yaml:"));
}

/// The Kubernetes manifests, the compose cluster and the systemd units: what each node is told
/// goes through mode-node's own flag parsing and checks, and what the platforms need is
/// checked where no schema can (selectors, DNS names, certificates, ports).
mod deployments {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use clap::{CommandFactory as _, Parser as _};
    use mode::daemon::NodeArgs;
    use serde::Deserialize as _;
    use serde_json::Value;

    use super::keys;

    const KUBERNETES: &str = "deploy/kubernetes";
    const KUBERNETES_BASE: &str = "deploy/kubernetes/base";
    const CERT_MANAGER: &str = "deploy/kubernetes/components/cert-manager";
    /// Checks manifests against the Kubernetes API's JSON schemas, which it carries: no network.
    const VALIDATOR: &str = "kubernetes-validate";
    const VALIDATOR_INSTALL: &str = "pip install kubernetes-validate==1.37.0";
    /// The oldest Kubernetes release the manifests are for, and the newest the validator knows.
    const KUBERNETES_RELEASES: [&str; 2] = ["1.33.0", "1.37.0"];

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Every document of a YAML file, with merge keys (`<<: *anchor`) applied as compose does.
    fn documents(path: &Path) -> Vec<Value> {
        let text = read(path);
        serde_norway::Deserializer::from_str(&text)
            .map(|document| {
                let value = serde_norway::Value::deserialize(document)
                    .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
                let mut value = serde_json::to_value(value)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                merge(&mut value);
                value
            })
            .filter(|v| !v.is_null())
            .collect()
    }

    /// Applies merge keys, those of merged mappings too (which serde_norway's apply_merge
    /// leaves in place); keys the mapping has itself win.
    fn merge(value: &mut Value) {
        match value {
            Value::Object(mapping) => {
                while let Some(merged) = mapping.remove("<<") {
                    let sources = match merged {
                        Value::Array(sources) => sources,
                        one => vec![one],
                    };
                    for source in sources {
                        let Value::Object(source) = source else {
                            panic!("a merge key takes mappings, not {source}")
                        };
                        for (k, v) in source {
                            mapping.entry(k).or_insert(v);
                        }
                    }
                }
                mapping.values_mut().for_each(merge);
            }
            Value::Array(items) => items.iter_mut().for_each(merge),
            _ => {}
        }
    }

    /// The YAML files under `dir`, at any depth.
    fn yaml_files(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                found.extend(yaml_files(&path));
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                found.push(path);
            }
        }
        found.sort();
        found
    }

    fn is_kustomization(path: &Path) -> bool {
        path.file_name().is_some_and(|n| n == "kustomization.yaml")
    }

    /// The files kustomizations use as patches: partial objects, not manifests.
    fn patch_files() -> BTreeSet<PathBuf> {
        let mut patches = BTreeSet::new();
        for kustomization in yaml_files(&root().join(KUBERNETES))
            .into_iter()
            .filter(|p| is_kustomization(p))
        {
            let k = &documents(&kustomization)[0];
            // Inline patches (`patch:`) have no file.
            for path in k["patches"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["path"].as_str())
            {
                patches.insert(kustomization.parent().unwrap().join(path));
            }
        }
        patches
    }

    fn text(v: &Value) -> &str {
        v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
    }

    /// The objects of a kustomization directory (its manifests and patches).
    struct Resources(Vec<Value>);

    impl Resources {
        fn load(dir: &str) -> Resources {
            let files = yaml_files(&root().join(dir));
            Resources(
                files
                    .iter()
                    .filter(|p| !is_kustomization(p) && p.parent() == Some(&root().join(dir)))
                    .flat_map(|p| documents(p))
                    .collect(),
            )
        }

        fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Value> + 'a {
            let kind = kind.to_string();
            self.0.iter().filter(move |o| o["kind"] == kind.as_str())
        }

        fn get(&self, kind: &str, name: &str) -> &Value {
            self.of_kind(kind)
                .find(|o| o["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("no {kind} named {name}"))
        }
    }

    /// Whether a label selector picks pods with these labels.
    fn selects(selector: &Value, labels: &Value) -> bool {
        let selector = selector.as_object().expect("a selector of labels");
        !selector.is_empty() && selector.iter().all(|(k, v)| labels[k] == *v)
    }

    /// mode-node's variables: MODE_PEERS → ("peers", whether it takes a value).
    fn node_variables() -> BTreeMap<String, (String, bool)> {
        NodeArgs::command()
            .get_arguments()
            .filter_map(|a| {
                let env = a.get_env()?.to_str()?.to_string();
                let long = a.get_long()?.to_string();
                Some((env, (long, a.get_action().takes_values())))
            })
            .collect()
    }

    /// What mode-node makes of an environment (its MODE_* variables) on host `hostname`.
    fn node_args(env: &BTreeMap<String, String>, hostname: &str, what: &str) -> NodeArgs {
        let variables = node_variables();
        let mut argv = vec!["mode-node".to_string()];
        for (name, value) in env.iter().filter(|(k, _)| k.starts_with("MODE_")) {
            let (long, takes_value) = variables.get(name).unwrap_or_else(|| {
                panic!("{what}: mode-node reads no variable {name} (see mode-node --help)")
            });
            match (*takes_value, value.as_str()) {
                (true, _) => argv.push(format!("--{long}={value}")),
                (false, "true") => argv.push(format!("--{long}")),
                (false, "false") => {}
                (false, other) => panic!("{what}: {name}={other}: say true or false"),
            }
        }
        let mut args = NodeArgs::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{what}: mode-node refuses {argv:?}:\n{e}"));
        args.resolve(Some(hostname))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        args.transport_checks()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        args
    }

    /// A container's environment as the kubelet makes it for pod `pod`: the image's, then the
    /// container's with `$(VAR)` replaced by the variables before it and the pod's name where
    /// a fieldRef asks for it.
    fn pod_env(container: &Value, pod: &str) -> BTreeMap<String, String> {
        let mut env = image_env();
        for e in container["env"].as_array().into_iter().flatten() {
            let value = if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                pod.to_string()
            } else {
                let mut value = text(&e["value"]).to_string();
                for (name, earlier) in &env {
                    value = value.replace(&format!("$({name})"), earlier);
                }
                value
            };
            assert!(
                !value.contains("$("),
                "{pod}: {} refers to an undefined variable: {value}",
                e["name"]
            );
            env.insert(text(&e["name"]).to_string(), value);
        }
        env
    }

    /// A pod of a StatefulSet as its manifests make it: its node's id and peer address.
    struct Pod {
        id: u64,
        advertise_peer: String,
    }

    /// Checks one StatefulSet of the base; its pods (and the one a scale-up by one would add).
    fn statefulset_pods(base: &Resources, sts: &Value) -> (Vec<Pod>, NodeArgs) {
        let name = text(&sts["metadata"]["name"]);
        let spec = &sts["spec"];
        let replicas = spec["replicas"].as_u64().expect("replicas");
        let labels = &spec["template"]["metadata"]["labels"];
        let pod_spec = &spec["template"]["spec"];
        assert!(
            selects(&spec["selector"]["matchLabels"], labels),
            "{name}: its selector does not match its pods' labels"
        );
        assert_eq!(
            spec["podManagementPolicy"], "Parallel",
            "{name}: pods must start together: none is ready before a quorum runs"
        );
        for spread in pod_spec["topologySpreadConstraints"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert!(
                selects(&spread["labelSelector"]["matchLabels"], labels),
                "{name}: a topology spread that counts other pods"
            );
        }

        // The headless Service that gives each pod its stable name.
        let headless_name = text(&spec["serviceName"]);
        let headless = base.get("Service", headless_name);
        assert_eq!(
            headless["spec"]["clusterIP"], "None",
            "{headless_name} must be headless: one DNS name per pod"
        );
        assert_eq!(
            headless["spec"]["publishNotReadyAddresses"], true,
            "{headless_name}: peers must resolve each other before any is ready"
        );
        assert!(
            selects(&headless["spec"]["selector"], labels),
            "{headless_name} does not select {name}'s pods"
        );

        let containers = pod_spec["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "{name}: one container, the node");
        let container = &containers[0];
        let ports: BTreeMap<String, u64> = container["ports"]
            .as_array()
            .expect("declared ports")
            .iter()
            .map(|p| {
                (
                    text(&p["name"]).to_string(),
                    p["containerPort"].as_u64().unwrap(),
                )
            })
            .collect();
        let port_named = |port: &Value, what: &str| -> u64 {
            match port {
                Value::String(n) => *ports.get(n).unwrap_or_else(|| {
                    panic!("{name}: {what} uses port '{n}', which the container does not declare")
                }),
                Value::Number(n) => {
                    let n = n.as_u64().unwrap();
                    assert!(
                        ports.values().any(|p| *p == n),
                        "{name}: {what} uses port {n}, which the container does not declare"
                    );
                    n
                }
                other => panic!("{name}: {what}: port {other}"),
            }
        };

        // Restricted: what the Pod Security Standard asks, container settings over the pod's.
        let effective = |key: &str| -> Value {
            let own = &container["securityContext"][key];
            if own.is_null() {
                pod_spec["securityContext"][key].clone()
            } else {
                own.clone()
            }
        };
        for (key, wanted) in [
            ("runAsNonRoot", Value::from(true)),
            ("runAsUser", Value::from(65532)),
            ("readOnlyRootFilesystem", Value::from(true)),
            ("allowPrivilegeEscalation", Value::from(false)),
        ] {
            assert_eq!(effective(key), wanted, "{name}: securityContext.{key}");
        }
        assert_eq!(
            effective("capabilities")["drop"],
            serde_json::json!(["ALL"]),
            "{name}: capabilities must drop ALL"
        );
        assert_eq!(
            effective("seccompProfile")["type"],
            "RuntimeDefault",
            "{name}: seccompProfile"
        );
        assert_eq!(
            pod_spec["automountServiceAccountToken"], false,
            "{name}: the node has no use for an API token"
        );
        assert_eq!(
            pod_spec["enableServiceLinks"], false,
            "{name}: Service links would set MODE_* variables"
        );

        let mounts: BTreeMap<String, String> = container["volumeMounts"]
            .as_array()
            .expect("volume mounts")
            .iter()
            .map(|m| {
                (
                    text(&m["name"]).to_string(),
                    text(&m["mountPath"]).to_string(),
                )
            })
            .collect();
        let claims: Vec<&str> = spec["volumeClaimTemplates"]
            .as_array()
            .expect("a volume per pod")
            .iter()
            .map(|c| text(&c["metadata"]["name"]))
            .collect();
        let data_mount = claims
            .iter()
            .find_map(|c| mounts.get(*c))
            .unwrap_or_else(|| panic!("{name}: no claimed volume is mounted"));

        let mut pods = Vec::new();
        let mut last = None;
        for ordinal in 0..=replicas {
            let pod = format!("{name}-{ordinal}");
            let what = format!("{name} pod {pod}");
            let env = pod_env(container, &pod);
            let args = node_args(&env, &pod, &what);
            let id = args.id;
            let peer_port = args.peer_listen().unwrap().port();
            assert_eq!(
                u64::from(peer_port),
                ports["peer"],
                "{what}: the peer API listens on {peer_port}, the container declares {}",
                ports["peer"]
            );
            let advertise_peer = args
                .advertise_peer()
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                advertise_peer,
                format!("{pod}.{headless_name}:{peer_port}"),
                "{what}: its peer address must be its stable DNS name"
            );
            let http = args
                .http_listen
                .unwrap_or_else(|| panic!("{what}: no side port for the probes"));
            assert_eq!(
                u64::from(http.port()),
                ports["http"],
                "{what}: the side port listens on {http}, the container declares {}",
                ports["http"]
            );
            if args.is_agent() {
                args.agent_checks()
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            } else {
                assert_eq!(
                    u64::from(args.listen.port()),
                    ports["grpc"],
                    "{what}: the API listens on {}, the container declares {}",
                    args.listen,
                    ports["grpc"]
                );
                let config = args
                    .cluster_config()
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                if ordinal < replicas {
                    assert_eq!(
                        config.peers.get(&id),
                        Some(&advertise_peer),
                        "{what}: MODE_PEERS must list node {id} at {advertise_peer}"
                    );
                } else {
                    assert!(
                        !config.join_seeds.is_empty(),
                        "{what}: a pod past the first replicas must join (MODE_JOIN_IF_NEW)"
                    );
                }
            }
            let data = args
                .data_dir
                .clone()
                .unwrap_or_else(|| panic!("{what}: no data directory"));
            assert!(
                data.starts_with(data_mount) && data != Path::new(data_mount),
                "{what}: data in {}: it must be a directory inside the volume at {data_mount} (its root holds lost+found)",
                data.display()
            );
            let tls = args.tls_files().unwrap_or_else(|| panic!("{what}: no TLS"));
            for file in [&tls.ca, &tls.cert, &tls.key] {
                assert!(
                    mounts.values().any(|m| file.starts_with(m)),
                    "{what}: {} is on no mounted volume",
                    file.display()
                );
            }
            assert_eq!(
                tls.cert.file_name().unwrap().to_str().unwrap(),
                format!("node-{id}.pem"),
                "{what}: modectl's file name for its certificate"
            );
            assert_eq!(
                tls.key.file_name().unwrap().to_str().unwrap(),
                format!("node-{id}-key.pem"),
                "{what}: modectl's file name for its key"
            );

            let probe_scheme = if args.tls_files().is_some() {
                "HTTPS"
            } else {
                "HTTP"
            };
            for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
                let get = &container[probe]["httpGet"];
                assert_eq!(get["path"], path, "{name}: {probe}");
                assert_eq!(
                    port_named(&get["port"], probe),
                    u64::from(http.port()),
                    "{name}: {probe} must ask the side port"
                );
                assert_eq!(
                    get["scheme"], probe_scheme,
                    "{name}: {probe}: the side port speaks {probe_scheme}"
                );
            }
            if ordinal < replicas {
                pods.push(Pod { id, advertise_peer });
            }
            last = Some(args);
        }
        (pods, last.unwrap())
    }

    #[test]
    fn kubernetes_pods_get_a_working_node_configuration_from_their_manifests() {
        let base = Resources::load(KUBERNETES_BASE);
        let servers = base.get("StatefulSet", "mode");
        let agents = base.get("StatefulSet", "mode-agent");
        let (server_pods, _) = statefulset_pods(&base, servers);
        let (agent_pods, agent_args) = statefulset_pods(&base, agents);

        let server_ids: BTreeSet<u64> = server_pods.iter().map(|p| p.id).collect();
        assert_eq!(
            server_ids.len(),
            server_pods.len(),
            "servers with the same id"
        );
        assert!(
            agent_pods.iter().all(|a| !server_ids.contains(&a.id)),
            "agents take ids of servers"
        );
        let server_peers: BTreeSet<&String> =
            server_pods.iter().map(|p| &p.advertise_peer).collect();
        let agent_servers: BTreeSet<&String> = agent_args.servers.iter().collect();
        assert_eq!(
            agent_servers, server_peers,
            "the agents' MODE_SERVERS must be the servers' peer addresses"
        );

        // Every Service and budget selects the pods of exactly one StatefulSet, by ports they have.
        let statefulsets: Vec<&Value> = base.of_kind("StatefulSet").collect();
        let owner = |selector: &Value, what: &str| -> &Value {
            let picked: Vec<&&Value> = statefulsets
                .iter()
                .filter(|s| selects(selector, &s["spec"]["template"]["metadata"]["labels"]))
                .collect();
            assert_eq!(
                picked.len(),
                1,
                "{what} must select the pods of one StatefulSet, not {}",
                picked.len()
            );
            picked[0]
        };
        for service in base.of_kind("Service") {
            let what = format!("Service {}", service["metadata"]["name"]);
            let sts = owner(&service["spec"]["selector"], &what);
            let declared: Vec<&Value> = sts["spec"]["template"]["spec"]["containers"][0]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|p| [&p["name"], &p["containerPort"]])
                .collect();
            for port in service["spec"]["ports"].as_array().unwrap() {
                assert!(
                    declared.contains(&&port["targetPort"]),
                    "{what}: targetPort {} is no port of its pods",
                    port["targetPort"]
                );
            }
        }
        let client = base.get("Service", "mode");
        assert!(
            client["spec"]["clusterIP"].is_null(),
            "the client Service balances over ready servers"
        );
        assert!(std::ptr::eq(
            owner(&client["spec"]["selector"], "Service mode"),
            servers
        ));
        for pdb in base.of_kind("PodDisruptionBudget") {
            let sts = owner(
                &pdb["spec"]["selector"]["matchLabels"],
                "the PodDisruptionBudget",
            );
            assert!(
                std::ptr::eq(sts, servers),
                "the budget protects the servers' quorum"
            );
            let replicas = sts["spec"]["replicas"].as_u64().unwrap();
            let unavailable = pdb["spec"]["maxUnavailable"]
                .as_u64()
                .expect("maxUnavailable as a number");
            assert!(
                replicas - unavailable > replicas / 2,
                "{replicas} servers, {unavailable} away: no quorum left"
            );
        }
        // The manifests run the version they ship with.
        for sts in statefulsets {
            let image = text(&sts["spec"]["template"]["spec"]["containers"][0]["image"]);
            assert_eq!(
                image,
                format!("mode:{}", env!("CARGO_PKG_VERSION")),
                "{}: the image of this version",
                sts["metadata"]["name"]
            );
        }
    }

    #[test]
    fn cert_manager_issues_each_node_the_certificate_its_pod_reads() {
        let base = Resources::load(KUBERNETES_BASE);
        let cm = Resources::load(CERT_MANAGER);
        let issuers: Vec<&Value> = cm.of_kind("Issuer").collect();
        assert_eq!(issuers.len(), 1);
        let issuer = issuers[0];
        let certificates: Vec<&Value> = cm.of_kind("Certificate").collect();
        let mut covered = BTreeSet::new();
        for sts in base.of_kind("StatefulSet") {
            let name = text(&sts["metadata"]["name"]);
            let headless = text(&sts["spec"]["serviceName"]);
            let container = &sts["spec"]["template"]["spec"]["containers"][0];
            let patch = cm
                .of_kind("StatefulSet")
                .find(|p| p["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("the component does not give {name} its certificates"));
            let volume = patch["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "tls")
                .expect("the tls volume");
            assert!(
                volume["secret"].is_null() && volume.as_object().unwrap().contains_key("secret"),
                "{name}: the patch must remove the Secret mode-tls (secret: null)"
            );
            // path in the volume → (Secret, key)
            let projected: BTreeMap<&str, (&str, &str)> = volume["projected"]["sources"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| {
                    let secret = text(&s["secret"]["name"]);
                    s["secret"]["items"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(move |i| (text(&i["path"]), (secret, text(&i["key"]))))
                })
                .collect();
            let (ca_secret, _) = projected
                .get("ca.pem")
                .unwrap_or_else(|| panic!("{name}: no ca.pem"));
            assert_eq!(
                issuer["spec"]["ca"]["secretName"], *ca_secret,
                "{name}: ca.pem must be the issuing CA's certificate"
            );
            let replicas = sts["spec"]["replicas"].as_u64().unwrap();
            for ordinal in 0..replicas {
                let pod = format!("{name}-{ordinal}");
                let args = node_args(&pod_env(container, &pod), &pod, &pod);
                let id = args.id;
                let certificate = certificates
                    .iter()
                    .find(|c| c["spec"]["commonName"] == format!("mode:node:{id}"))
                    .unwrap_or_else(|| {
                        panic!("no Certificate with commonName mode:node:{id} for {pod}")
                    });
                let spec = &certificate["spec"];
                assert_eq!(
                    spec["subject"]["organizations"],
                    serde_json::json!(["mode:nodes"]),
                    "node {id}"
                );
                let usages: BTreeSet<&str> = spec["usages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(text)
                    .collect();
                assert!(
                    usages.contains("server auth") && usages.contains("client auth"),
                    "node {id}: nodes both serve and call"
                );
                let dns: BTreeSet<&str> = spec["dnsNames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(text)
                    .collect();
                let (host, _) = args
                    .advertise_peer()
                    .unwrap()
                    .rsplit_once(':')
                    .map(|(h, p)| (h.to_string(), p.to_string()))
                    .unwrap();
                assert!(
                    dns.contains(host.as_str()),
                    "node {id}: peers dial {host}, which its certificate must name"
                );
                assert_eq!(host, format!("{pod}.{headless}"));
                assert_eq!(
                    spec["issuerRef"]["name"], issuer["metadata"]["name"],
                    "node {id}"
                );
                let secret = text(&spec["secretName"]);
                let tls = args.tls_files().unwrap();
                for (file, key) in [(&tls.cert, "tls.crt"), (&tls.key, "tls.key")] {
                    let file = file.file_name().unwrap().to_str().unwrap();
                    assert_eq!(
                        projected.get(file),
                        Some(&(secret, key)),
                        "{name}: {file} must be {key} of {secret}"
                    );
                }
                covered.insert(id);
            }
        }
        assert_eq!(
            covered.len(),
            certificates.len(),
            "a Certificate for a node no pod is"
        );
    }

    #[test]
    fn every_kustomization_lists_every_manifest_beside_it() {
        let kustomizations: Vec<PathBuf> = yaml_files(&root().join(KUBERNETES))
            .into_iter()
            .filter(|p| is_kustomization(p))
            .collect();
        assert!(kustomizations.len() >= 3, "base, component, overlay");
        for kustomization in kustomizations {
            let dir = kustomization.parent().unwrap();
            let k = &documents(&kustomization)[0];
            let mut listed = BTreeSet::new();
            let entries = ["resources", "components"]
                .iter()
                .flat_map(|f| k[*f].as_array().cloned().unwrap_or_default())
                .chain(
                    k["patches"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| p["path"].clone())
                        .filter(|path| !path.is_null()),
                );
            for entry in entries {
                let entry = text(&entry).to_string();
                let path = dir.join(&entry);
                assert!(
                    path.exists(),
                    "{} lists {entry}, which does not exist",
                    kustomization.display()
                );
                listed.insert(path);
            }
            for file in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
                if file.extension().is_some_and(|e| e == "yaml") && !is_kustomization(&file) {
                    assert!(
                        listed.contains(&file),
                        "{} is not in {}: kubectl apply -k would leave it out",
                        file.display(),
                        kustomization.display()
                    );
                }
            }
        }
    }

    #[test]
    fn kubernetes_manifests_follow_the_api_schema_of_each_supported_release() {
        let patches = patch_files();
        let manifests: Vec<PathBuf> = yaml_files(&root().join(KUBERNETES))
            .into_iter()
            .filter(|p| !is_kustomization(p) && !patches.contains(p))
            .collect();
        // cert-manager's kinds are not Kubernetes': the cert-manager test checks them.
        let documents: usize = manifests
            .iter()
            .flat_map(|p| documents(p))
            .filter(|d| !text(&d["apiVersion"]).starts_with("cert-manager.io/"))
            .count();
        for release in KUBERNETES_RELEASES {
            let out = Command::new(VALIDATOR)
                .args(["--kubernetes-version", release, "--strict"])
                .args(&manifests)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {VALIDATOR} ({e}): install it with `{VALIDATOR_INSTALL}` (.ci/test does); it carries the Kubernetes schemas and needs no network"));
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "{VALIDATOR} -k {release} --strict refuses the manifests:\n{said}"
            );
            for line in said.lines() {
                let expected_warning =
                    line.starts_with("WARN") && line.contains("api version cert-manager.io/");
                assert!(
                    !line.starts_with("ERROR") && (!line.starts_with("WARN") || expected_warning),
                    "{VALIDATOR} -k {release}: {line}"
                );
            }
            let passed = said
                .lines()
                .filter(|l| l.contains(" passed for resource "))
                .count();
            assert_eq!(
                passed, documents,
                "{VALIDATOR} -k {release} checked {passed} of {documents} objects:\n{said}"
            );
        }
    }

    /// The environment the image sets (its Dockerfile's ENV): compose nodes start from it.
    fn image_env() -> BTreeMap<String, String> {
        let dockerfile = read(&root().join("deploy/image/Dockerfile")).replace("\\\n", " ");
        dockerfile
            .lines()
            .filter_map(|l| l.strip_prefix("ENV "))
            .flat_map(|l| l.split_whitespace())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn scalar(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    #[test]
    fn the_compose_cluster_is_what_its_nodes_and_certs_sh_expect() {
        let dir = root().join("deploy/compose");
        let compose = &documents(&dir.join("docker-compose.yaml"))[0];
        let services = compose["services"].as_object().expect("services");
        // certs.sh's nodes=(ID=SERVICE ...): the certificates it makes.
        let certs_sh = read(&dir.join("certs.sh"));
        let certified: BTreeMap<u64, String> = certs_sh
            .lines()
            .find_map(|l| l.strip_prefix("nodes=("))
            .expect("certs.sh lists its nodes as nodes=(ID=SERVICE ...)")
            .trim_end_matches(')')
            .split_whitespace()
            .map(|n| {
                let (id, service) = n.split_once('=').unwrap();
                (id.parse().unwrap(), service.to_string())
            })
            .collect();
        assert!(
            certs_sh.contains("MODE_GID=$(id -g)"),
            "certs.sh writes the group the nodes read their keys with"
        );

        let declared_volumes = keys(&compose["volumes"]);
        let mut nodes: BTreeMap<u64, (&String, NodeArgs)> = BTreeMap::new();
        let mut host_ports = BTreeSet::new();
        let mut data_volumes = BTreeSet::new();
        for (name, service) in services.iter().filter(|(_, s)| {
            s["environment"]
                .as_object()
                .is_some_and(|e| e.keys().any(|k| k.starts_with("MODE_")))
        }) {
            let what = format!("compose service {name}");
            let mut env = image_env();
            for (k, v) in service["environment"].as_object().unwrap() {
                env.insert(k.clone(), scalar(v));
            }
            let args = node_args(&env, name, &what);
            assert!(
                text(&service["user"]).starts_with("65532:${MODE_GID"),
                "{what}: the node's uid with the group certs.sh writes to .env"
            );
            // "SOURCE:TARGET[:MODE]"
            let volumes: Vec<(String, String)> = service["volumes"]
                .as_array()
                .unwrap_or_else(|| panic!("{what}: no volumes"))
                .iter()
                .map(|v| {
                    let mut parts = text(v).split(':');
                    (
                        parts.next().unwrap().to_string(),
                        parts.next().unwrap().to_string(),
                    )
                })
                .collect();
            let tls = args.tls_files().unwrap_or_else(|| panic!("{what}: no TLS"));
            for file in [&tls.ca, &tls.cert, &tls.key] {
                let (source, target) = volumes
                    .iter()
                    .find(|(_, target)| file.starts_with(target))
                    .unwrap_or_else(|| {
                        panic!("{what}: {} is on no mounted volume", file.display())
                    });
                assert_eq!(source, "./tls", "{what}: certs.sh writes into ./tls");
                let name_in_tls = file
                    .strip_prefix(target)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                let made = name_in_tls == "ca.pem"
                    || name_in_tls == format!("node-{}.pem", args.id)
                    || name_in_tls == format!("node-{}-key.pem", args.id);
                assert!(
                    made,
                    "{what}: certs.sh makes no {name_in_tls} for node {}",
                    args.id
                );
            }
            assert_eq!(
                certified.get(&args.id),
                Some(name),
                "{what}: certs.sh must make node {}'s certificate for {name}",
                args.id
            );
            let data = args.data_dir.clone().expect("the image's MODE_DATA_DIR");
            let (volume, _) = volumes
                .iter()
                .find(|(_, t)| data.starts_with(t))
                .unwrap_or_else(|| {
                    panic!("{what}: its data in {} is on no volume", data.display())
                });
            assert!(
                declared_volumes.contains(volume),
                "{what}: {volume} is not a named volume"
            );
            assert!(
                data_volumes.insert(volume.clone()),
                "{what}: shares its data volume {volume}"
            );
            let listening: BTreeSet<u16> = [
                args.http_listen.map(|a| a.port()),
                (!args.is_agent()).then_some(args.listen.port()),
            ]
            .into_iter()
            .flatten()
            .collect();
            for port in service["ports"].as_array().into_iter().flatten() {
                let port = text(port);
                let parts: Vec<&str> = port.split(':').collect();
                assert_eq!(
                    (parts.len(), parts[0]),
                    (3, "127.0.0.1"),
                    "{what}: publish {port} on loopback only"
                );
                assert!(
                    host_ports.insert(parts[1].to_string()),
                    "{what}: host port {} is taken twice",
                    parts[1]
                );
                assert!(
                    listening.contains(&parts[2].parse().unwrap()),
                    "{what}: publishes {port}, where the node does not listen"
                );
            }
            let advertise_peer = args.advertise_peer().unwrap();
            assert_eq!(
                advertise_peer,
                format!("{name}:{}", args.peer_listen().unwrap().port()),
                "{what}: peers reach it by its service name"
            );
            if args.is_agent() {
                args.agent_checks()
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            } else {
                let config = args
                    .cluster_config()
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(
                    config.peers.get(&args.id),
                    Some(&advertise_peer),
                    "{what}: its own entry in MODE_PEERS"
                );
            }
            assert!(
                nodes.insert(args.id, (name, args)).is_none(),
                "{what}: node id taken twice"
            );
        }
        assert_eq!(
            certified.keys().collect::<Vec<_>>(),
            nodes.keys().collect::<Vec<_>>(),
            "certs.sh certifies exactly the compose nodes"
        );
        // Every server's MODE_PEERS names the servers, at their peer addresses; agents know them all.
        let servers: BTreeMap<u64, String> = nodes
            .iter()
            .filter(|(_, (_, a))| !a.is_agent())
            .map(|(id, (_, a))| (*id, a.advertise_peer().unwrap()))
            .collect();
        assert!(servers.len() >= 3, "three servers: a quorum survives one");
        for (name, args) in nodes.values() {
            if args.is_agent() {
                let named: BTreeSet<&String> = args.servers.iter().collect();
                assert_eq!(
                    named,
                    servers.values().collect(),
                    "{name}: MODE_SERVERS must be the servers' peer addresses"
                );
            } else {
                assert_eq!(
                    args.peers.iter().cloned().collect::<BTreeMap<_, _>>(),
                    servers,
                    "{name}: MODE_PEERS must be every server at its peer address"
                );
            }
        }
        // --profile otel: the Collector of deploy/otel, reached by the name the compose file gives.
        let collector = &services["otel-collector"];
        assert_eq!(collector["profiles"], serde_json::json!(["otel"]));
        assert_eq!(services["jaeger"]["profiles"], serde_json::json!(["otel"]));
        let config = text(&collector["volumes"][0])
            .split(':')
            .next()
            .unwrap()
            .to_string();
        assert!(
            dir.join(&config).exists(),
            "the collector's configuration {config} is missing"
        );
        let header = read(&dir.join("docker-compose.yaml"));
        assert!(
            header.contains("OTLP_ENDPOINT=http://otel-collector:4317"),
            "the compose file says how to export to its collector"
        );
    }

    /// `[Section]` → `Key=Value` lines of a systemd unit, in order.
    fn unit(path: &Path) -> Vec<(String, String, String)> {
        let mut section = String::new();
        let mut entries = Vec::new();
        for line in read(path)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
            } else {
                let (key, value) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{}: {line}", path.display()));
                entries.push((section.clone(), key.to_string(), value.to_string()));
            }
        }
        entries
    }

    #[test]
    fn the_systemd_units_verify_and_their_environment_files_start_a_node() {
        let dir = root().join("deploy/systemd");
        let mut hardening = Vec::new();
        for (file, env_file, agent) in [
            ("mode-node.service", "node.env", false),
            ("mode-agent.service", "agent.env", true),
        ] {
            let entries = unit(&dir.join(file));
            let service: BTreeMap<&str, Vec<&str>> = entries
                .iter()
                .filter(|(s, _, _)| s == "Service")
                .fold(BTreeMap::new(), |mut m, (_, k, v)| {
                    m.entry(k.as_str()).or_default().push(v.as_str());
                    m
                });
            let one = |key: &str| -> &str {
                match service.get(key).map(Vec::as_slice) {
                    Some([v]) => v,
                    other => panic!("{file}: {key}= must be set once, not {other:?}"),
                }
            };
            assert_eq!(
                one("Type"),
                "notify",
                "{file}: the node says READY=1 when it serves"
            );
            assert_eq!(one("NotifyAccess"), "main", "{file}");
            assert_eq!(one("ExecStart"), "/usr/local/bin/mode-node", "{file}");
            assert_eq!(
                one("EnvironmentFile"),
                format!("/etc/mode/{env_file}"),
                "{file}: its example is {env_file}"
            );
            // The environment: the unit's, then the file's (which wins), %S being /var/lib.
            let mut env: BTreeMap<String, String> = service
                .get("Environment")
                .into_iter()
                .flatten()
                .map(|kv| kv.split_once('=').unwrap())
                .map(|(k, v)| (k.to_string(), v.replace("%S", "/var/lib")))
                .collect();
            for line in read(&dir.join(env_file))
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            {
                let (k, v) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{env_file}: {line}"));
                env.insert(k.to_string(), v.to_string());
            }
            let what = format!("{file} with {env_file}");
            let args = node_args(&env, "mode-1.example.com", &what);
            assert_eq!(args.is_agent(), agent, "{what}: MODE_ROLE");
            if agent {
                args.agent_checks()
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            } else {
                args.cluster_config()
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            let state = Path::new("/var/lib").join(one("StateDirectory"));
            assert!(
                args.data_dir
                    .as_ref()
                    .is_some_and(|d| d.starts_with(&state)),
                "{what}: the data must be in the StateDirectory, the only place it may write"
            );
            // Both units are hardened alike: what differs is named here.
            hardening.push(
                entries
                    .iter()
                    .filter(|(s, k, _)| {
                        s == "Service" && !["EnvironmentFile"].contains(&k.as_str())
                    })
                    .cloned()
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(hardening[0], hardening[1], "mode-node.service and mode-agent.service differ in [Service] beyond their EnvironmentFile=");

        // systemd's own check. It insists that ExecStart= exists, which it does not here: a
        // stand-in takes its place.
        let scratch =
            std::env::temp_dir().join(format!("mode-systemd-verify-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        let stand_in = scratch.join("mode-node");
        std::fs::write(&stand_in, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            &stand_in,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut units = Vec::new();
        for file in ["mode-node.service", "mode-agent.service"] {
            let text = read(&dir.join(file))
                .replace("/usr/local/bin/mode-node", stand_in.to_str().unwrap());
            std::fs::write(scratch.join(file), text).unwrap();
            units.push(scratch.join(file));
        }
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .args(&units)
            .output();
        let _ = std::fs::remove_dir_all(&scratch);
        let out = out.unwrap_or_else(|e| panic!("cannot run systemd-analyze ({e}): install it with `apt-get install systemd` (.ci/test does)"));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // It warns about unknown keys on stderr and still exits 0.
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify:\n{said}"
        );
    }
}
