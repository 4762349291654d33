//! Bearer tokens for automation: made on a server, shown once, stored only as a SHA-256 hash
//! in the replicated state. A token reads `mode-<id>-<secret>`: the id finds its record, the
//! hash of the whole token must match it.

use ring::rand::SecureRandom;

/// A new token: its id and the full token text (shown once).
pub fn generate() -> Result<(String, String), String> {
    let rng = ring::rand::SystemRandom::new();
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    rng.fill(&mut id)
        .and_then(|()| rng.fill(&mut secret))
        .map_err(|_| "the system's random number generator failed".to_string())?;
    let id = hex(&id);
    let token = format!("mode-{id}-{}", hex(&secret));
    Ok((id, token))
}

/// The id a token text claims (`mode-<id>-<secret>`), if it has the form.
pub fn id_of(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("mode-")?;
    let (id, secret) = rest.split_once('-')?;
    (!id.is_empty() && secret.len() >= 32).then_some(id)
}

/// The stored form of a token: its SHA-256, hex.
pub fn hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// Whether `token` hashes to `stored`, compared in constant time.
pub fn matches(token: &str, stored: &str) -> bool {
    let ours = hash(token);
    ours.len() == stored.len()
        && ours
            .bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_by_id_and_checked_by_hash() {
        let (id, token) = generate().unwrap();
        assert_eq!(id_of(&token), Some(id.as_str()));
        let stored = hash(&token);
        assert!(matches(&token, &stored));
        assert!(!matches(&format!("{token}x"), &stored));
        let (_, other) = generate().unwrap();
        assert_ne!(token, other);
        assert_eq!(id_of("mode-abc"), None);
        assert_eq!(id_of("bearer"), None);
    }
}
