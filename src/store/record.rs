//! The on-disk form of one resource version: a fixed header, then the JSON body.
//!
//! `[change: u8][version: u64 LE][last_updated: i64 LE][body…]`. The header lets searches on
//! `_lastUpdated` and deletions skip the JSON entirely.

use std::borrow::Cow;

use bytes::Bytes;

use super::crypt::Cipher;
use super::{ChangeKind, ResourceVersion, StoreError};

const HEADER: usize = 1 + 8 + 8;

pub(super) struct Header {
    pub change: ChangeKind,
    pub version: u64,
    pub last_updated: i64,
}

pub(super) fn encode(change: ChangeKind, version: u64, last_updated: i64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.push(match change {
        ChangeKind::Create => 0,
        ChangeKind::Update => 1,
        ChangeKind::Delete => 2,
        ChangeKind::CreateAtId => 3,
    });
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&last_updated.to_le_bytes());
    out.extend_from_slice(body);
    out
}

pub(super) fn header(bytes: &[u8]) -> Result<Header, StoreError> {
    if bytes.len() < HEADER {
        return Err(StoreError::Corrupt(format!(
            "record of {} bytes",
            bytes.len()
        )));
    }
    let change = match bytes[0] {
        0 => ChangeKind::Create,
        1 => ChangeKind::Update,
        2 => ChangeKind::Delete,
        3 => ChangeKind::CreateAtId,
        other => return Err(StoreError::Corrupt(format!("change kind {other}"))),
    };
    let mut version = [0u8; 8];
    version.copy_from_slice(&bytes[1..9]);
    let mut last_updated = [0u8; 8];
    last_updated.copy_from_slice(&bytes[9..17]);
    Ok(Header {
        change,
        version: u64::from_le_bytes(version),
        last_updated: i64::from_le_bytes(last_updated),
    })
}

pub(super) fn body(bytes: &[u8]) -> &[u8] {
    bytes.get(HEADER..).unwrap_or_default()
}

pub(super) fn decode(
    resource_type: &str,
    id: &str,
    bytes: &[u8],
    cipher: Option<&Cipher>,
) -> Result<ResourceVersion, StoreError> {
    let h = header(bytes)?;
    let plain = open_body(cipher, resource_type, id, h.version, body(bytes))?;
    Ok(ResourceVersion {
        resource_type: resource_type.to_owned(),
        id: id.to_owned(),
        version: h.version,
        last_updated: h.last_updated,
        change: h.change,
        body: Bytes::copy_from_slice(&plain),
    })
}

/// The associated data of `Type/id` at `version`.
fn aad(resource_type: &str, id: &str, version: u64) -> Vec<u8> {
    super::crypt::resource_aad(&format!("{resource_type}/{id}"), version)
}

/// The body as written: sealed when the cipher encrypts resources.
pub(super) fn seal_body(
    cipher: Option<&Cipher>,
    resource_type: &str,
    id: &str,
    version: u64,
    body: Vec<u8>,
) -> Vec<u8> {
    match cipher.filter(|c| c.resources) {
        Some(cipher) if !body.is_empty() => cipher.seal(&aad(resource_type, id, version), &body),
        _ => body,
    }
}

/// The plain body of a stored version (sealed or not).
pub(super) fn open_body<'a>(
    cipher: Option<&Cipher>,
    resource_type: &str,
    id: &str,
    version: u64,
    body: &'a [u8],
) -> Result<Cow<'a, [u8]>, StoreError> {
    match cipher {
        Some(cipher) => cipher.open(&aad(resource_type, id, version), body),
        None => Ok(Cow::Borrowed(body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes = encode(ChangeKind::Update, 7, -5, b"{}");
        let rv = decode("Patient", "a", &bytes, None).expect("decodes");
        assert_eq!(
            (rv.version, rv.last_updated, rv.change),
            (7, -5, ChangeKind::Update)
        );
        assert_eq!(&rv.body[..], b"{}");
        assert!(header(&bytes[..5]).is_err());
    }
}
