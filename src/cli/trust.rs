//! `walship trust`: show an sftp server's host key and add it to a known_hosts file once its
//! fingerprint is confirmed.

use super::source;
use super::TrustArgs;
use super::UsageError;
use crate::config;
use crate::url::{ReplicaUrl, SftpUrl};
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;

pub(super) fn run(a: TrustArgs) -> Result<ExitCode> {
    let parsed = SftpUrl::parse(&a.url).map_err(UsageError)?;
    // A config's known_hosts is that of its replica on the same server, if it has one.
    let same_server = |u: &SftpUrl| u.host == parsed.host && u.port == parsed.port;
    let kh = match (source::load(&a.config)?, a.known_hosts) {
        (Some(s), _) => s
            .replicas
            .iter()
            .find(|r| matches!(&r.url, ReplicaUrl::Sftp(u) if same_server(u)))
            .map(|r| r.known_hosts.clone())
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_KNOWN_HOSTS)),
        (None, Some(k)) => k,
        (None, None) => PathBuf::from(config::DEFAULT_KNOWN_HOSTS),
    };
    let mut out = std::io::stdout().lock();
    crate::backend::sftp::trust(&parsed, &kh, a.fingerprint.as_deref(), a.yes, &mut out)?;
    Ok(ExitCode::SUCCESS)
}
