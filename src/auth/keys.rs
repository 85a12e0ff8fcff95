//! API keys for service accounts, and the secret fhirgate signs its own tokens with.
//!
//! A key is `fg_` followed by 43 base64url characters (32 random bytes). Only its SHA-256 is
//! kept — in the store for keys made through `POST /auth/api-keys`, in the configuration file
//! for the others — so a copy of the data folder or the configuration does not give keys away.
//! The key itself is shown once, when it is made.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::scopes::Scope;
use super::{Principal, ADMIN};
use crate::config::ConfiguredApiKey;
use crate::store::{KvOp, Store};

/// Every key starts with this, so a key is told from a JWT at a glance.
pub const PREFIX: &str = "fg_";
/// Keys made through the API: SHA-256 (hex) → [`KeyRecord`].
const SPACE: &str = "auth.api-key";
/// Server secrets.
const META: &str = "auth.meta";
const TOKEN_SECRET: &str = "token-secret";
/// Where the first admin key is written when there is no key at all.
pub const BOOTSTRAP_FILE: &str = "admin-api-key";

/// What is known about a key (never the key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The first 16 hex digits of the key's SHA-256: how the key is named in logs and URLs.
    pub id: String,
    pub name: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    /// RFC 3339; empty for keys from the configuration file.
    #[serde(default)]
    pub created: String,
    #[serde(default)]
    pub created_by: String,
    /// From the configuration file (cannot be revoked through the API).
    #[serde(default)]
    pub configured: bool,
}

/// Random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random source failed");
    bytes
}

/// A new random key.
pub fn new_key() -> String {
    format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>())
    )
}

/// The hex SHA-256 of `key`, as configuration files give it.
pub fn hash(key: &str) -> String {
    crate::hex(&Sha256::digest(key.as_bytes()))
}

/// The signing secret of fhirgate's own tokens, made on first start.
pub async fn token_secret(store: &dyn Store) -> anyhow::Result<Vec<u8>> {
    if let Some(Some(secret)) = store
        .kv_get(META, vec![TOKEN_SECRET.to_owned()])
        .await?
        .pop()
    {
        return Ok(secret.to_vec());
    }
    let secret = random_bytes::<32>().to_vec();
    store
        .kv_apply(vec![KvOp::put(META, TOKEN_SECRET, secret.clone())])
        .await?;
    Ok(secret)
}

pub struct ApiKeys {
    by_hash: RwLock<HashMap<String, KeyRecord>>,
    store: Arc<dyn Store>,
}

impl ApiKeys {
    /// The keys of the configuration file and those stored.
    pub async fn load(
        store: Arc<dyn Store>,
        configured: &[ConfiguredApiKey],
    ) -> anyhow::Result<Self> {
        let mut by_hash = HashMap::new();
        for key in configured {
            let sha = key.sha256.trim().to_ascii_lowercase();
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                anyhow::bail!(
                    "auth key {}: sha256 must be 64 hex digits (`fhirgate auth new-key` prints one)",
                    key.name
                );
            }
            by_hash.insert(
                sha.clone(),
                KeyRecord {
                    id: sha[..16].to_owned(),
                    name: key.name.clone(),
                    roles: key.roles.clone(),
                    scopes: key.scopes.clone(),
                    created: String::new(),
                    created_by: String::new(),
                    configured: true,
                },
            );
        }
        let mut after = None;
        loop {
            let page = store.kv_scan(SPACE, after.clone(), 500).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (sha, value) in page {
                let record: KeyRecord = serde_json::from_slice(&value)
                    .map_err(|e| anyhow::anyhow!("stored API key {}: {e}", &sha[..16]))?;
                by_hash.entry(sha).or_insert(record);
            }
        }
        Ok(Self {
            by_hash: RwLock::new(by_hash),
            store,
        })
    }

    /// With no key at all, makes an admin key and writes it (owner-only) to
    /// `{data_dir}/admin-api-key`, so a fresh server can be administered.
    pub async fn bootstrap(&self, data_dir: &Path) -> anyhow::Result<()> {
        if !self
            .by_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return Ok(());
        }
        let (key, record) = self
            .create(
                "bootstrap admin",
                vec![ADMIN.to_owned()],
                Vec::new(),
                "fhirgate",
            )
            .await?;
        let path = data_dir.join(BOOTSTRAP_FILE);
        write_private(&path, &format!("{key}\n"))?;
        tracing::warn!(
            key_id = %record.id,
            file = %path.display(),
            "no API key was configured: an admin key was made and written to this file; use it to make others, then delete the file"
        );
        Ok(())
    }

    /// The caller holding `key`.
    pub fn lookup(&self, key: &str) -> Option<Principal> {
        let keys = self.by_hash.read().unwrap_or_else(|p| p.into_inner());
        let record = keys.get(&hash(key))?;
        Some(Principal {
            subject: format!("api-key:{}", record.name),
            via: "api-key",
            roles: record.roles.iter().cloned().collect::<BTreeSet<_>>(),
            scopes: record
                .scopes
                .iter()
                .filter_map(|s| Scope::parse(s))
                .collect(),
            patient: None,
        })
    }

    /// Makes and stores a key; answers the key (to show once) and its record.
    pub async fn create(
        &self,
        name: &str,
        roles: Vec<String>,
        scopes: Vec<String>,
        by: &str,
    ) -> anyhow::Result<(String, KeyRecord)> {
        let key = new_key();
        let sha = hash(&key);
        let record = KeyRecord {
            id: sha[..16].to_owned(),
            name: name.to_owned(),
            roles,
            scopes,
            created: crate::fhir::date::format_instant(crate::fhir::date::now_micros()),
            created_by: by.to_owned(),
            configured: false,
        };
        self.store
            .kv_apply(vec![KvOp::put(
                SPACE,
                sha.clone(),
                serde_json::to_vec(&record)?,
            )])
            .await?;
        self.by_hash
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha, record.clone());
        Ok((key, record))
    }

    /// Revokes a stored key by id; `false` when there is none (or it is configured).
    pub async fn revoke(&self, id: &str) -> anyhow::Result<bool> {
        let sha = {
            let keys = self.by_hash.read().unwrap_or_else(|p| p.into_inner());
            keys.iter()
                .find(|(_, r)| r.id == id && !r.configured)
                .map(|(sha, _)| sha.clone())
        };
        let Some(sha) = sha else { return Ok(false) };
        self.store
            .kv_apply(vec![KvOp::delete(SPACE, sha.clone())])
            .await?;
        self.by_hash
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sha);
        Ok(true)
    }

    /// Every key's record, by name.
    pub fn list(&self) -> Vec<KeyRecord> {
        let mut all: Vec<KeyRecord> = self
            .by_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        all
    }
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_hashed_as_hex() {
        let a = new_key();
        let b = new_key();
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 43, "{a}");
        let sha = hash(&a);
        assert_eq!(sha.len(), 64);
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
