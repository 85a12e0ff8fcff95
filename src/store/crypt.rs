//! Encryption at rest: AES-256-GCM over the values the embedded store keeps.
//!
//! A sealed value is `fge1 | key-id length (1 byte) | key id | nonce (12) | ciphertext+tag`.
//! The associated data binds it to where it is stored (table, key), so a value copied to
//! another key does not decrypt. Keys have ids: the active key seals, every listed key opens,
//! so rotating (adding a new active key, keeping the old ones) keeps old data readable. A
//! value without the prefix is read as it is — data written before encryption was turned on.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::Engine;

use super::StoreError;
use crate::config::{EncryptionConfig, EncryptionKey};

const MAGIC: &[u8; 4] = b"fge1";

/// The keys of one store.
pub struct Cipher {
    active: String,
    keys: HashMap<String, LessSafeKey>,
    /// Whether FHIR resource bodies are sealed too (key-value data and records always are).
    pub resources: bool,
}

/// The 32 key bytes from a file's or variable's text: 64 hex digits or base64 (or, from a
/// file, exactly 32 raw bytes).
fn key_bytes(raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    if raw.len() == 32 {
        return Ok(raw.to_vec());
    }
    let text = std::str::from_utf8(raw)
        .context("not 32 raw bytes, hex or base64")?
        .trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .context("not hex or base64")?
    };
    if bytes.len() != 32 {
        anyhow::bail!("an AES-256 key is 32 bytes, this one is {}", bytes.len());
    }
    Ok(bytes)
}

fn load_key(key: &EncryptionKey) -> anyhow::Result<LessSafeKey> {
    let raw = match (&key.file, &key.env) {
        (Some(file), None) => {
            std::fs::read(file).with_context(|| format!("reading key file {}", file.display()))?
        }
        (None, Some(var)) => std::env::var(var)
            .with_context(|| format!("the environment variable {var} is not set"))?
            .into_bytes(),
        _ => anyhow::bail!("give a key either a file or an env variable"),
    };
    let bytes = key_bytes(&raw).with_context(|| format!("key {}", key.id))?;
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| anyhow::anyhow!("bad key"))?,
    ))
}

impl Cipher {
    /// The configured keys, or — with none — a key made on first start and kept in
    /// `{data_dir}/store.key` (owner-only), with a warning to move it away from the data.
    pub fn from_config(config: &EncryptionConfig, data_dir: &Path) -> anyhow::Result<Self> {
        let mut keys = HashMap::new();
        for key in &config.keys {
            if key.id.is_empty() || key.id.len() > 64 {
                anyhow::bail!("store.encryption key ids are 1 to 64 characters");
            }
            keys.insert(key.id.clone(), load_key(key)?);
        }
        let active = match (&config.active, config.keys.last()) {
            (Some(active), _) if keys.contains_key(active) => active.clone(),
            (Some(active), _) => anyhow::bail!("store.encryption.active: no key {active:?}"),
            (None, Some(last)) => last.id.clone(),
            (None, None) => {
                let path = data_dir.join("store.key");
                if !path.exists() {
                    std::fs::create_dir_all(data_dir)?;
                    let fresh: [u8; 32] = crate::auth::keys::random_bytes();
                    let text = format!("{}\n", crate::hex(&fresh));
                    crate::auth::keys::write_private(&path, &text)?;
                    tracing::warn!(
                        file = %path.display(),
                        "no store.encryption key was configured: one was made beside the data; move it elsewhere (store.encryption.keys) so a copy of the data alone cannot be read"
                    );
                }
                let key = EncryptionKey {
                    id: "local".into(),
                    file: Some(path),
                    env: None,
                };
                keys.insert(key.id.clone(), load_key(&key)?);
                key.id
            }
        };
        Ok(Self {
            active,
            keys,
            resources: config.resources,
        })
    }

    /// A cipher with one given key, for tests.
    pub fn with_key(id: &str, key: &[u8; 32], resources: bool) -> Self {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32 bytes"));
        Self {
            active: id.to_owned(),
            keys: HashMap::from([(id.to_owned(), key)]),
            resources,
        }
    }

    /// Encrypts `plain`, bound to `aad`, with the active key.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let key = &self.keys[&self.active];
        let nonce_bytes: [u8; NONCE_LEN] = crate::auth::keys::random_bytes();
        let mut out =
            Vec::with_capacity(MAGIC.len() + 1 + self.active.len() + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(MAGIC);
        out.push(self.active.len() as u8);
        out.extend_from_slice(self.active.as_bytes());
        out.extend_from_slice(&nonce_bytes);
        let start = out.len();
        out.extend_from_slice(plain);
        let mut sealed = out.split_off(start);
        // Sealing only fails for inputs of more than 64 GiB.
        let _ = key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(aad),
            &mut sealed,
        );
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts what [`Cipher::seal`] made; passes anything without the prefix through
    /// (resource bodies written while resource sealing was off).
    pub fn open<'a>(&self, aad: &[u8], stored: &'a [u8]) -> Result<Cow<'a, [u8]>, StoreError> {
        if !stored.starts_with(MAGIC) {
            return Ok(Cow::Borrowed(stored));
        }
        self.open_sealed(aad, stored).map(Cow::Owned)
    }

    /// Decrypts what [`Cipher::seal`] made and refuses anything else: for values that are
    /// always sealed, where a plain value can only have been planted in the file.
    pub fn open_sealed(&self, aad: &[u8], stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        let Some(rest) = stored.strip_prefix(MAGIC.as_slice()) else {
            return Err(StoreError::Corrupt(
                "a value that must be encrypted is not (written outside the server?)".into(),
            ));
        };
        let corrupt = |what: &str| StoreError::Corrupt(format!("encrypted value: {what}"));
        let (&id_len, rest) = rest.split_first().ok_or_else(|| corrupt("truncated"))?;
        let id_len = usize::from(id_len);
        if rest.len() < id_len + NONCE_LEN + 16 {
            return Err(corrupt("truncated"));
        }
        let id = std::str::from_utf8(&rest[..id_len]).map_err(|_| corrupt("bad key id"))?;
        let key = self
            .keys
            .get(id)
            .ok_or_else(|| corrupt(&format!("sealed with key {id:?}, which is not configured")))?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&rest[id_len..id_len + NONCE_LEN]);
        let mut buffer = rest[id_len + NONCE_LEN..].to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buffer,
            )
            .map_err(|_| corrupt("it does not decrypt (wrong key, altered, or moved)"))?;
        let len = plain.len();
        buffer.truncate(len);
        Ok(buffer)
    }
}

/// The associated data of a key-value entry.
pub fn kv_aad(space: &str, key: &str) -> Vec<u8> {
    [b"kv\0", space.as_bytes(), b"\0", key.as_bytes()].concat()
}

/// The associated data of a stream record.
pub fn record_aad(stream: &str, seq: u64) -> Vec<u8> {
    [b"rec\0", stream.as_bytes(), b"\0", &seq.to_be_bytes()].concat()
}

/// The associated data of a resource version's body.
pub fn resource_aad(key: &str, version: u64) -> Vec<u8> {
    [b"res\0", key.as_bytes(), b"\0", &version.to_be_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_where_they_were_stored() {
        let cipher = Cipher::with_key("k1", &[7; 32], true);
        let sealed = cipher.seal(&kv_aad("pas", "claim-1"), b"{\"name\":\"Ann\"}");
        assert!(!sealed.windows(3).any(|w| w == b"Ann"));
        let opened = cipher
            .open(&kv_aad("pas", "claim-1"), &sealed)
            .expect("opens");
        assert_eq!(&opened[..], b"{\"name\":\"Ann\"}");
        assert!(cipher.open(&kv_aad("pas", "claim-2"), &sealed).is_err());
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(cipher.open(&kv_aad("pas", "claim-1"), &altered).is_err());
        // Plain resource bodies (written with resource sealing off) pass through; where
        // everything is sealed, a plain value is refused.
        assert_eq!(&cipher.open(b"x", b"{}").expect("plain")[..], b"{}");
        assert!(cipher.open_sealed(b"x", b"{}").is_err());
    }

    #[test]
    fn rotation_keeps_old_values_readable() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("old.key"), "07".repeat(32)).expect("key");
        std::fs::write(
            dir.path().join("new.key"),
            base64::engine::general_purpose::STANDARD.encode([9u8; 32]),
        )
        .expect("key");
        let key = |id: &str| EncryptionKey {
            id: id.into(),
            file: Some(dir.path().join(format!("{id}.key"))),
            env: None,
        };
        let old = Cipher::from_config(
            &EncryptionConfig {
                keys: vec![key("old")],
                ..EncryptionConfig::default()
            },
            dir.path(),
        )
        .expect("old");
        let sealed_old = old.seal(b"a", b"before");
        let rotated = Cipher::from_config(
            &EncryptionConfig {
                keys: vec![key("old"), key("new")],
                ..EncryptionConfig::default()
            },
            dir.path(),
        )
        .expect("rotated");
        assert_eq!(
            &rotated.open(b"a", &sealed_old).expect("old")[..],
            b"before"
        );
        let sealed_new = rotated.seal(b"a", b"after");
        assert_eq!(&sealed_new[4..8], b"\x03new");
        assert!(old.open(b"a", &sealed_new).is_err());
        // Without configured keys, one is made beside the data and reused.
        let made = Cipher::from_config(&EncryptionConfig::default(), dir.path()).expect("made");
        let again = Cipher::from_config(&EncryptionConfig::default(), dir.path()).expect("again");
        assert_eq!(
            &again.open(b"z", &made.seal(b"z", b"v")).expect("v")[..],
            b"v"
        );
    }
}
