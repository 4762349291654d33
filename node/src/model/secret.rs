//! Secret values of a spec (`secrets: {NAME: value}`): the type that carries them through the
//! replicated state and to the instances while keeping them out of every `{:?}` (logs, panics,
//! openraft's debug output), the placeholder readers see instead, and the rule for their names.
//!
//! Who sees what is decided at the edges: the public API replaces the values with
//! [`PLACEHOLDER`] (through [`ServiceSpec::redacted`](crate::model::spec::ServiceSpec::redacted))
//! for callers that may not see them; events, logs and the graph never hold them.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a reader who may not see secret values gets in their place (the names stay visible).
pub const PLACEHOLDER: &str = "(secret)";

/// Names starting with this belong to the instance's own variables (`MODE_SLOT`, ...).
pub const RESERVED_PREFIX: &str = "MODE_";

/// A secret value.
///
/// Serde carries the value itself (the replicated state and the nodes that run the instances
/// need it); `{:?}` prints [`PLACEHOLDER`], and there is no `Display`: code that needs the
/// value asks for it with [`Secret::expose`], where a reviewer sees it.
///
/// ```
/// use mode::model::secret::Secret;
/// let s = Secret::new("hunter2");
/// assert_eq!(format!("{s:?}"), "(secret)");
/// assert_eq!(s.expose(), "hunter2");
/// assert_eq!(serde_json::to_string(&s).unwrap(), "\"hunter2\"");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret holding `value`.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// [`PLACEHOLDER`], what redacted specs hold.
    pub fn placeholder() -> Secret {
        Secret(PLACEHOLDER.to_string())
    }

    /// The value (to hand to the instance; never to print).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PLACEHOLDER)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// A string. Anything else is refused with a message that does not repeat the value
    /// (serde's own would: "invalid type: integer `1234`").
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SecretVisitor;
        impl SecretVisitor {
            fn not_a_string<E: de::Error>(self) -> Result<Secret, E> {
                Err(E::custom(
                    "a secret value must be a string: quote it (like \"0123\")",
                ))
            }
        }
        impl Visitor<'_> for SecretVisitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
                self.not_a_string()
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
                self.not_a_string()
            }
            fn visit_i128<E: de::Error>(self, _: i128) -> Result<Secret, E> {
                self.not_a_string()
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
                self.not_a_string()
            }
            fn visit_u128<E: de::Error>(self, _: u128) -> Result<Secret, E> {
                self.not_a_string()
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
                self.not_a_string()
            }
            fn visit_char<E: de::Error>(self, v: char) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Secret, E> {
                self.not_a_string()
            }
        }
        d.deserialize_any(SecretVisitor)
    }
}

/// Why `name` cannot name a secret, if it cannot: it must be an environment variable name
/// (letters, digits and `_`, not starting with a digit) outside [`RESERVED_PREFIX`].
pub fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "'{name}' is not a secret name: use letters, digits and '_', not starting with a digit (like DB_PASSWORD)"
        ));
    }
    if name.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "'{name}': names starting with {RESERVED_PREFIX} are the instance's own variables; choose another"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_value_and_serde_keeps_it() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), PLACEHOLDER);
        assert_eq!(format!("{:#?}", Some(&s)), "Some(\n    (secret),\n)");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"hunter2\"");
        assert_eq!(serde_json::from_str::<Secret>(&json).unwrap(), s);
    }

    #[test]
    fn a_value_that_is_not_a_string_is_refused_without_repeating_it() {
        for text in ["4711", "-4711", "47.11", "true"] {
            let e = serde_json::from_str::<Secret>(text)
                .unwrap_err()
                .to_string();
            assert!(e.contains("must be a string"), "{e}");
            assert!(!e.contains("4711") && !e.contains("47.11"), "{e}");
        }
    }

    #[test]
    fn names_are_environment_variable_names_outside_mode() {
        for ok in ["DB_PASSWORD", "_x", "a1"] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A=B", "A B", "Ä"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_name("MODE_SLOT").unwrap_err().contains("MODE_"));
    }
}
