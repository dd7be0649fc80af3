//! Credentials: per-agent HMAC tokens and the optional API bearer token.
//!
//! The service gives each agent `token = hex(HMAC-SHA256(server key, agent id))`; the hub
//! recomputes it and compares in constant time. No network code lives here.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Errors loading credentials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key or token file could not be read.
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        /// Which credential.
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is empty or too short.
    #[error("{what} file {path} is too short ({len} bytes; at least {min} needed)")]
    TooShort {
        /// Which credential.
        what: &'static str,
        /// The file.
        path: String,
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The server key agents' tokens derive from.
#[derive(Clone)]
pub struct AgentKey(Vec<u8>);

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(..)")
    }
}

impl AgentKey {
    /// A fresh random 32-byte key (the process backend's default: its agents are its children).
    pub fn random() -> AgentKey {
        AgentKey(rand::random::<[u8; 32]>().to_vec())
    }

    /// A key from bytes.
    pub fn from_bytes(b: &[u8]) -> AgentKey {
        AgentKey(b.to_vec())
    }

    /// Loads a key file (its bytes, trailing whitespace trimmed; at least 16 bytes).
    pub fn from_file(path: &Path) -> Result<AgentKey> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            what: "agent key",
            path: path.display().to_string(),
            source,
        })?;
        let trimmed = bytes.trim_ascii_end();
        if trimmed.len() < 16 {
            return Err(Error::TooShort {
                what: "agent key",
                path: path.display().to_string(),
                len: trimmed.len(),
                min: 16,
            });
        }
        Ok(AgentKey(trimmed.to_vec()))
    }

    fn mac(&self, agent_id: &str) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(agent_id.as_bytes());
        m
    }

    /// The token for an agent id.
    pub fn token(&self, agent_id: &str) -> String {
        hex::encode(self.mac(agent_id).finalize().into_bytes())
    }

    /// The join token of an external pool: machines present it with an id of their choosing.
    /// Derived under a separate domain (`join\0` + pool) so it is never an agent's token.
    pub fn join_token(&self, pool: &str) -> String {
        self.token(&format!("join\0{pool}"))
    }

    /// Checks a pool join token in constant time.
    pub fn verify_join(&self, pool: &str, token: &str) -> bool {
        self.verify(&format!("join\0{pool}"), token)
    }

    /// The lease token the hub gives an agent with `leased`: it vouches that this service
    /// granted `lease` to `agent` in `pool`. The agent returns it in `hello` so a restarted
    /// service (same key) can restore the lease; a lease claimed without it is not restored.
    /// Derived under its own domain (`lease\0`), so it is never an agent's or a join token.
    pub fn lease_token(&self, lease: &str, agent: &str, pool: &str) -> String {
        self.token(&format!("lease\0{lease}\0{agent}\0{pool}"))
    }

    /// Checks a lease token in constant time.
    pub fn verify_lease(&self, lease: &str, agent: &str, pool: &str, token: &str) -> bool {
        self.verify(&format!("lease\0{lease}\0{agent}\0{pool}"), token)
    }

    /// Checks a token in constant time.
    pub fn verify(&self, agent_id: &str, token: &str) -> bool {
        match hex::decode(token.trim()) {
            Ok(raw) => self.mac(agent_id).verify_slice(&raw).is_ok(),
            Err(_) => false,
        }
    }
}

/// Reads an agent's token from the file the process backend wrote, then deletes the file
/// (so no later process finds it there).
pub fn take_token_file(path: &Path) -> Result<String> {
    let read = |source| Error::Read {
        what: "agent token",
        path: path.display().to_string(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(read)?;
    std::fs::remove_file(path).map_err(read)?;
    Ok(text.trim().to_string())
}

/// Loads the API bearer token (file contents, trimmed; at least 8 characters).
pub fn load_api_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        what: "API token",
        path: path.display().to_string(),
        source,
    })?;
    let t = text.trim().to_string();
    if t.len() < 8 {
        return Err(Error::TooShort {
            what: "API token",
            path: path.display().to_string(),
            len: t.len(),
            min: 8,
        });
    }
    Ok(t)
}

/// Constant-time equality for secrets.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_for_their_agent() {
        let k = AgentKey::from_bytes(b"0123456789abcdef");
        let t = k.token("default-a-1");
        assert_eq!(t.len(), 64);
        assert!(k.verify("default-a-1", &t));
        assert!(!k.verify("default-a-2", &t));
        assert!(!k.verify("default-a-1", "zz"));
        assert!(!AgentKey::random().verify("default-a-1", &t));
    }

    #[test]
    fn join_tokens_are_per_pool_and_never_agent_tokens() {
        let k = AgentKey::from_bytes(b"0123456789abcdef");
        let j = k.join_token("gpu");
        assert!(k.verify_join("gpu", &j));
        assert!(!k.verify_join("cpu", &j));
        assert!(!k.verify("gpu", &j));
        assert!(!k.verify_join("gpu", &k.token("gpu")));
    }

    #[test]
    fn lease_tokens_bind_lease_agent_and_pool() {
        let k = AgentKey::from_bytes(b"0123456789abcdef");
        let t = k.lease_token("lease-a-1", "p-1", "main");
        assert!(k.verify_lease("lease-a-1", "p-1", "main", &t));
        assert!(!k.verify_lease("lease-a-2", "p-1", "main", &t));
        assert!(!k.verify_lease("lease-a-1", "p-2", "main", &t));
        assert!(!k.verify_lease("lease-a-1", "p-1", "other", &t));
        assert!(!k.verify("p-1", &t));
        assert!(!AgentKey::from_bytes(b"fedcba9876543210").verify_lease(
            "lease-a-1",
            "p-1",
            "main",
            &t
        ));
    }

    #[test]
    fn secret_compare() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"ab"));
    }

    #[test]
    fn short_files_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "abc\n").unwrap();
        assert!(
            load_api_token(&p)
                .unwrap_err()
                .to_string()
                .contains("too short")
        );
        std::fs::write(&p, "a-long-enough-token\n").unwrap();
        assert_eq!(load_api_token(&p).unwrap(), "a-long-enough-token");
    }
}
