//! A strict parser of the Prometheus text exposition format (0.0.4), for tests that scrape
//! `/metrics`: it refuses what a scraper would refuse or misread — malformed lines, a family's
//! `# HELP` or `# TYPE` twice or after its samples, samples of a family without a `# TYPE`,
//! families split in two, duplicate series or labels, and histograms whose buckets do not add
//! up.

use std::collections::{BTreeMap, BTreeSet};

/// A metric family's declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`, `summary` or `untyped`.
    pub kind: String,
    /// Its `# HELP` text ("" without one).
    pub help: String,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (for a histogram: `NAME_bucket`, `NAME_sum`, `NAME_count`).
    pub name: String,
    /// The family it belongs to.
    pub family: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` answer.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Families by name.
    pub families: BTreeMap<String, Family>,
    /// Samples in order.
    pub samples: Vec<Sample>,
}

fn valid_name(name: &str, colons: bool) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':'))
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if text
            .chars()
            .all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) =>
        {
            text.parse()
                .map_err(|_| format!("'{text}' is not a number"))
        }
        _ => Err(format!("'{text}' is not a number")),
    }
}

/// `{a="x",b="y"}` at the start of `text` (which starts with `{`): the labels and the rest.
fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = &text[1..];
    loop {
        rest = rest.trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest.split_once('=').ok_or("a label without '='")?;
        let name = name.trim();
        if !valid_name(name, false) {
            return Err(format!("'{name}' is not a label name"));
        }
        let mut chars = after
            .strip_prefix('"')
            .ok_or("a label value without quotes")?
            .chars();
        let mut value = String::new();
        loop {
            match chars.next().ok_or("an unterminated label value")? {
                '"' => break,
                '\\' => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("a bad escape \\{other:?} in a label value")),
                },
                '\n' => return Err("a newline in a label value".into()),
                c => value.push(c),
            }
        }
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label '{name}' twice"));
        }
        rest = chars.as_str().trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by ','".into());
        }
    }
}

impl Exposition {
    /// Parse `text`, or say which line is wrong and why.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut out = Exposition::default();
        let mut helped = BTreeSet::new();
        // Families whose samples began, and the one now being read (samples must not split).
        let mut sampled: BTreeSet<String> = BTreeSet::new();
        let mut current: Option<String> = None;
        let mut series = BTreeSet::new();
        let lines: Vec<&str> = text.split('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let at = |why: String| format!("line {}: {why}: {line:?}", i + 1);
            if line.is_empty() {
                if i + 1 == lines.len() {
                    break;
                }
                return Err(at("an empty line".into()));
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, ' ');
                let (keyword, name, rest) = (words.next(), words.next(), words.next());
                if !matches!(keyword, Some("HELP" | "TYPE")) {
                    continue; // A plain comment.
                }
                let name = name
                    .filter(|n| valid_name(n, true))
                    .ok_or_else(|| at("# HELP or # TYPE without a valid metric name".into()))?;
                if sampled.contains(name) {
                    return Err(at(format!("{name}'s HELP or TYPE after its samples")));
                }
                if keyword == Some("HELP") {
                    if !helped.insert(name.to_string()) {
                        return Err(at(format!("a second HELP for {name}")));
                    }
                    let family = out.families.entry(name.to_string()).or_insert(Family {
                        kind: String::new(),
                        help: String::new(),
                    });
                    family.help = rest.unwrap_or("").to_string();
                } else {
                    let kind = rest.unwrap_or("");
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("'{kind}' is not a metric type")));
                    }
                    let family = out.families.entry(name.to_string()).or_insert(Family {
                        kind: String::new(),
                        help: String::new(),
                    });
                    if !family.kind.is_empty() {
                        return Err(at(format!("a second TYPE for {name}")));
                    }
                    family.kind = kind.to_string();
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
            let name = &line[..name_end];
            if !valid_name(name, true) {
                return Err(at(format!("'{name}' is not a metric name")));
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..]).map_err(at)?
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            let mut parts = rest
                .strip_prefix(' ')
                .ok_or_else(|| at("no value".into()))?
                .split(' ');
            let value = parse_value(parts.next().unwrap_or("")).map_err(at)?;
            if let Some(timestamp) = parts.next() {
                timestamp
                    .parse::<i64>()
                    .map_err(|_| at(format!("'{timestamp}' is not a timestamp")))?;
            }
            if parts.next().is_some() {
                return Err(at("more than a value and a timestamp".into()));
            }
            let family = Exposition::family_of(&out.families, name)
                .ok_or_else(|| at(format!("{name} has no # TYPE before it")))?;
            if current.as_deref() != Some(family.as_str()) {
                if !sampled.insert(family.clone()) {
                    return Err(at(format!(
                        "{family}'s samples are split by another family's"
                    )));
                }
                current = Some(family.clone());
            }
            if !series.insert((name.to_string(), labels.clone())) {
                return Err(at("the same series twice".into()));
            }
            out.samples.push(Sample {
                name: name.to_string(),
                family,
                labels,
                value,
            });
        }
        out.check_histograms()?;
        Ok(out)
    }

    /// The declared family sample `name` belongs to.
    fn family_of(families: &BTreeMap<String, Family>, name: &str) -> Option<String> {
        let typed = |n: &str, kinds: &[&str]| {
            families
                .get(n)
                .is_some_and(|f| kinds.contains(&f.kind.as_str()))
        };
        if typed(name, &["counter", "gauge", "untyped", "summary"]) {
            return Some(name.to_string());
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                let kinds: &[&str] = if suffix == "_bucket" {
                    &["histogram"]
                } else {
                    &["histogram", "summary"]
                };
                if typed(base, kinds) {
                    return Some(base.to_string());
                }
            }
        }
        None
    }

    /// Each histogram series: buckets with `le`, cumulative, the `+Inf` one equal to `_count`.
    fn check_histograms(&self) -> Result<(), String> {
        // (family, labels without `le`) -> (le, value) of each bucket.
        type Series = (String, BTreeMap<String, String>);
        let mut buckets: BTreeMap<Series, Vec<(f64, f64)>> = BTreeMap::new();
        let mut counts = BTreeMap::new();
        for s in &self.samples {
            if s.name == format!("{}_bucket", s.family) {
                let mut labels = s.labels.clone();
                let le = labels
                    .remove("le")
                    .ok_or_else(|| format!("{} without le: {:?}", s.name, s.labels))?;
                let le = parse_value(&le)?;
                buckets
                    .entry((s.family.clone(), labels))
                    .or_default()
                    .push((le, s.value));
            } else if s.name == format!("{}_count", s.family) {
                counts.insert((s.family.clone(), s.labels.clone()), s.value);
            }
        }
        for (key, list) in &buckets {
            let ordered = list.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
            let last = list.last().copied().unwrap_or((0.0, 0.0));
            if !ordered || last.0 != f64::INFINITY || counts.get(key) != Some(&last.1) {
                return Err(format!(
                    "histogram {key:?}: buckets {list:?}, count {:?}",
                    counts.get(key)
                ));
            }
        }
        Ok(())
    }

    /// The samples named `name` whose labels include every one of `labels`.
    pub fn select<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample named `name` with exactly `labels` (`None` when there is none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.select(name, labels)
            .find(|s| s.labels.len() == labels.len())
            .map(|s| s.value)
    }
}

#[cfg(test)]
mod tests {
    use super::Exposition;

    const GOOD: &str = "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\na_total 4 1700000000\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";

    #[test]
    fn a_well_formed_exposition_parses() {
        let e = Exposition::parse(GOOD).unwrap();
        assert_eq!(e.families["a_total"].help, "Things.");
        assert_eq!(
            e.value("a_total", &[("x", "1"), ("y", "q\"\\\n")]),
            Some(3.0)
        );
        assert_eq!(e.value("a_total", &[]), Some(4.0));
        assert_eq!(e.value("h_count", &[]), Some(2.0));
    }

    #[test]
    fn malformed_expositions_are_refused() {
        let bad = [
            ("no type", "x 1\n"),
            (
                "help twice",
                "# HELP x a\n# HELP x b\n# TYPE x gauge\nx 1\n",
            ),
            ("type twice", "# TYPE x gauge\n# TYPE x gauge\nx 1\n"),
            (
                "type after samples",
                "# TYPE x gauge\nx 1\n# TYPE x gauge\n",
            ),
            ("help after samples", "# TYPE x gauge\nx 1\n# HELP x late\n"),
            ("bad type", "# TYPE x meter\nx 1\n"),
            ("bad value", "# TYPE x gauge\nx one\n"),
            ("no value", "# TYPE x gauge\nx\n"),
            ("bad name", "# TYPE x gauge\n9x 1\n"),
            ("unterminated", "# TYPE x gauge\nx{a=\"1} 1\n"),
            ("unquoted", "# TYPE x gauge\nx{a=1} 1\n"),
            ("bad label name", "# TYPE x gauge\nx{a-b=\"1\"} 1\n"),
            ("label twice", "# TYPE x gauge\nx{a=\"1\",a=\"2\"} 1\n"),
            (
                "series twice",
                "# TYPE x gauge\nx{a=\"1\"} 1\nx{a=\"1\"} 2\n",
            ),
            (
                "split family",
                "# TYPE x gauge\n# TYPE y gauge\nx 1\ny 1\nx{a=\"1\"} 1\n",
            ),
            ("trailing junk", "# TYPE x gauge\nx 1 2 3\n"),
            ("empty line", "# TYPE x gauge\n\nx 1\n"),
            (
                "bucket without le",
                "# TYPE h histogram\nh_bucket 1\nh_sum 1\nh_count 1\n",
            ),
            (
                "inf bucket is not count",
                "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
            ),
            (
                "bucket of a gauge",
                "# TYPE h gauge\nh_bucket{le=\"1\"} 1\n",
            ),
        ];
        for (why, text) in bad {
            assert!(Exposition::parse(text).is_err(), "{why} was accepted");
        }
    }
}
