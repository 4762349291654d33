//! mode's gRPC API, package `mode.v1`: the public `Control` API (`modectl`, scripts,
//! `grpcurl`) and the `Peer` API between nodes (Raft, forwarding, agents, beacons).

#![allow(missing_docs, clippy::all)]

/// The protocol version nodes exchange on every Raft call; a node refuses a peer speaking
/// another one with a message naming both.
pub const PROTOCOL_VERSION: u32 = 1;

pub use prost_types;

pub mod v1 {
    tonic::include_proto!("mode.v1");

    /// By hand (`skip_debug` in build.rs): every field, but only the names of the secrets.
    impl std::fmt::Debug for ServiceSpec {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let secrets: std::collections::BTreeMap<&str, &str> = self
                .secrets
                .keys()
                .map(|k| (k.as_str(), "(secret)"))
                .collect();
            f.debug_struct("ServiceSpec")
                .field("name", &self.name)
                .field("kind", &self.kind)
                .field("config", &self.config)
                .field("secrets", &secrets)
                .field("replicas", &self.replicas)
                .field("singleton", &self.singleton)
                .field("constraints", &self.constraints)
                .field("spread", &self.spread)
                .field("anti_affinity", &self.anti_affinity)
                .field("cost", &self.cost)
                .field("depends_on", &self.depends_on)
                .field("restart", &self.restart)
                .field("stop_grace_s", &self.stop_grace_s)
                .field("generation", &self.generation)
                .field("update", &self.update)
                .field("health", &self.health)
                .finish()
        }
    }
}

/// The encoded `FileDescriptorSet` of `mode.v1` (for gRPC server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mode_descriptor.bin"));

#[cfg(test)]
mod tests {
    #[test]
    fn debug_of_a_spec_names_its_secrets_but_shows_no_value() {
        let spec = super::v1::ServiceSpec {
            name: "db".into(),
            secrets: [("DB_PASSWORD".to_string(), "hunter2".to_string())].into(),
            ..Default::default()
        };
        let text = format!("{spec:?} {:?}", Some(&spec));
        assert!(
            text.contains("DB_PASSWORD") && text.contains("\"db\""),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }
}
