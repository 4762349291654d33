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
