//! TLS for the server (rustls, TLS 1.2 and 1.3 only), optional client certificates (mTLS), and
//! development certificates.
//!
//! Client certificates are checked against the configured CA bundle during the handshake; a
//! verified certificate's SHA-256 fingerprint is then the client's identity, matched against
//! `auth.mtls_clients` by the guard (see `auth`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::TlsConfig;

/// The hex SHA-256 of a DER certificate: how `auth.mtls_clients` names a client.
pub fn fingerprint(der: &[u8]) -> String {
    crate::hex(&Sha256::digest(der))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} holds a certificate that cannot be read", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The rustls configuration of `tls`: TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 by ALPN, and the
/// client certificate check when a client CA is configured.
pub fn server_config(tls: &TlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = certificates(&tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .with_context(|| format!("reading the private key {}", tls.key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let builder = match &tls.client_ca_file {
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca_file)? {
                roots
                    .add(cert)
                    .with_context(|| format!("a CA certificate in {}", ca_file.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            );
            let verifier = if tls.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().context("the client CA")?)
        }
        None if tls.require_client_cert => {
            anyhow::bail!("server.tls.require_client_cert needs server.tls.client_ca_file")
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("the certificate and key do not go together")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What [`generate_dev`] wrote.
pub struct DevCertificates {
    pub ca: std::path::PathBuf,
    pub client_fingerprint: String,
}

/// Writes a development CA, a server certificate for `hosts` and a client certificate (for
/// mTLS) signed by it into `dir`. For development and tests only: the CA key is kept beside
/// the certificates.
pub fn generate_dev(dir: &Path, hosts: &[String]) -> anyhow::Result<DevCertificates> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let now = time::OffsetDateTime::now_utc();
    let validity = |params: &mut CertificateParams, days: i64| {
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(days);
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fhirgate development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params, 365);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(hosts.to_vec())?;
    server_params.distinguished_name.push(
        DnType::CommonName,
        hosts.first().map_or("localhost", String::as_str),
    );
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server_params, 365);
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "fhirgate development client");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut client_params, 365);
    let client_cert = client_params.signed_by(&client_key, &issuer)?;

    let write = |name: &str, text: String, secret: bool| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        #[cfg(not(unix))]
        let _ = secret;
        Ok(())
    };
    write("ca.pem", ca_cert.pem(), false)?;
    write("ca-key.pem", ca_key.serialize_pem(), true)?;
    // The chain a client needs: the server's certificate, then the CA's.
    write(
        "server.pem",
        format!("{}{}", server_cert.pem(), ca_cert.pem()),
        false,
    )?;
    write("server-key.pem", server_key.serialize_pem(), true)?;
    write("client.pem", client_cert.pem(), false)?;
    write("client-key.pem", client_key.serialize_pem(), true)?;
    Ok(DevCertificates {
        ca: dir.join("ca.pem"),
        client_fingerprint: fingerprint(client_cert.der()),
    })
}
