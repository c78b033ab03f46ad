//! Client API keys: `Authorization: Bearer <key>` on the gRPC Generation
//! service and the HTTP `/v1` routes. Health, reflection and metrics stay
//! open for probes and scrapers.

use std::collections::HashSet;
use std::path::Path;

#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    keys: HashSet<String>,
}

impl ApiKeys {
    /// Keys from the command line plus a file of one key per line (blank
    /// lines and `#` comments ignored).
    pub fn load(keys: &[String], file: Option<&Path>) -> std::io::Result<Self> {
        let mut set: HashSet<String> = keys.iter().filter(|k| !k.is_empty()).cloned().collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)?;
            set.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        Ok(ApiKeys { keys: set })
    }

    /// No keys configured: everyone is let in.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether an `Authorization` header value carries a valid key.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(key) = authorization.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        // Compare against every key in constant time per key, so the
        // response time does not tell how much of a key was right.
        self.keys.iter().fold(false, |ok, k| {
            ok | constant_time_eq(k.as_bytes(), key.trim().as_bytes())
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys() {
        let keys = ApiKeys::load(&["secret-1".into()], None).unwrap();
        assert!(keys.allows(Some("Bearer secret-1")));
        assert!(!keys.allows(Some("Bearer secret-2")));
        assert!(!keys.allows(Some("secret-1")));
        assert!(!keys.allows(None));
        assert!(ApiKeys::default().allows(None));
    }
}
