//! Between the typed API's messages and what modectl works with. Specs and configs convert
//! with the server's own functions ([`mode::api::convert`]); here is what only a client
//! needs: the graph back into the domain type the renderers draw, and readable times.

pub(crate) use mode::api::convert::{graph_from_proto as graph, spec_to_proto, struct_to_json};
pub(crate) use mode::service::format_utc_ms;
use mode_proto::v1 as pb;

/// How many instances a spec wants (a singleton: one; replicas default to one).
pub(crate) fn wanted(spec: &pb::ServiceSpec) -> u32 {
    if spec.singleton {
        1
    } else {
        spec.replicas.unwrap_or(1)
    }
}

/// An age or a wait, as kubectl writes them: `45s`, `12m`, `3h20m`, `4d`.
pub(crate) fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=3_599 => format!("{}m", s / 60),
        3_600..=86_399 if s % 3_600 >= 60 => format!("{}h{}m", s / 3_600, s % 3_600 / 60),
        3_600..=86_399 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(45_900), "45s");
        assert_eq!(age(12 * 60_000), "12m");
        assert_eq!(age((3 * 3_600 + 20 * 60) * 1000), "3h20m");
        assert_eq!(age(3 * 3_600 * 1000), "3h");
        assert_eq!(age(4 * 86_400 * 1000 + 5), "4d");
    }

    #[test]
    fn a_parsed_spec_keeps_every_field() {
        let specs = mode::model::spec::parse_specs(
            "t.yaml",
            "name: web\nkind: ticker\nreplicas: 3\nspread: zone\ndepends_on: [db]\nconstraints: [{label: zone, in: [a, b]}]\nconfig: {every_ms: 5}\n",
        )
        .unwrap();
        let p = spec_to_proto(&specs[0]);
        assert_eq!(p.name, "web");
        assert_eq!(p.replicas, Some(3));
        assert_eq!(p.spread, "zone");
        assert_eq!(p.depends_on, vec!["db".to_string()]);
        assert_eq!(
            p.constraints[0].r#in,
            vec!["a".to_string(), "b".to_string()]
        );
        assert_eq!(
            struct_to_json(p.config.as_ref().unwrap()),
            serde_json::json!({"every_ms": 5})
        );
        assert_eq!(wanted(&p), 3);
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(format_utc_ms(0), "1970-01-01 00:00:00.000");
        assert_eq!(format_utc_ms(1_764_576_860_123), "2025-12-01 08:14:20.123");
    }
}
