//! The `s3://BUCKET/PREFIX` target: a replica as objects in an S3-compatible store (AWS S3,
//! Garage, MinIO...), over blocking HTTP(S) (ureq, with OpenSSL and the system's CA store)
//! and SigV4-presigned requests (rusty-s3).
//!
//! S3 has no rename and no fsync, and needs neither: an object appears whole when its PUT (or
//! the completion of its multipart upload) returns success, and is durable then; before that,
//! readers see nothing or the old object. So [`Backend::write_atomic`] is one PUT for a body of
//! up to one part, else a multipart upload that is completed only after every part was stored,
//! and aborted on any failure, so that no parts are left behind. An upload interrupted by a
//! crash leaves an incomplete multipart upload, invisible to readers; [`Backend::cleanup`]
//! aborts those. Directories do not exist in S3: a "directory" is a key prefix, listed with
//! the `/` delimiter, that exists while it holds an object, so [`Backend::remove_dir`] has
//! nothing to do.
//!
//! Invariants:
//! - Only the headers walship chooses are sent: `Content-MD5` on every upload (the store
//!   refuses a body that arrived changed), `Range` never, no SDK checksum headers. Safety never
//!   rests on conditional writes (`If-None-Match`), which some stores ignore: walship's names
//!   are unique (see the layout) and ownership uses claim files.
//! - A request that failed with a 5xx, 429, or a network error is retried a few times with
//!   backoff; whatever still fails is `Unavailable` (the shipper retries later). 403 (bad key,
//!   clock skew), 404 for the bucket and a wrong region are `Other`, with a message that says
//!   which and what to check. A missing object is `NotFound`.
//! - Secrets never appear in messages: the URL shown is `s3://BUCKET/PREFIX`, and the endpoint.

use super::{check_path, Backend, BackendError, Entry, ErrorKind, Result};
use crate::url::{plain_relative_path, S3Url};
use base64::Engine as _;
use md5::Digest as _;
use rusty_s3::actions::{CreateMultipartUpload, ListObjectsV2};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde::Deserialize;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use tracing::{debug, warn};
use ureq::http::Response;
use ureq::Body;

/// The largest single PUT, and the size of a multipart upload's parts.
pub const DEFAULT_PART_SIZE: usize = 16 << 20;

/// S3's smallest part (all but the last).
const MIN_PART_SIZE: usize = 5 << 20;

/// S3's largest number of parts in one upload.
const MAX_PARTS: u16 = 10_000;

/// How long a presigned request stays valid: it is signed just before it is sent.
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);

/// Attempts per request when the store answers 5xx/429 or the network fails.
const ATTEMPTS: u32 = 3;

/// The first retry's delay; each next one is four times longer.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// How much of an error response is read for its code and message.
const ERROR_BODY_LIMIT: u64 = 64 << 10;

/// How to reach and authenticate to an S3 replica.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// The bucket and prefix.
    pub url: S3Url,
    /// `http(s)://HOST[:PORT]` of the store; `None` is AWS (`https://s3.REGION.amazonaws.com`).
    pub endpoint: Option<String>,
    /// The region requests are signed for.
    pub region: String,
    /// Bucket in the URL path (`https://host/bucket/key`) rather than the host name.
    pub path_style: bool,
    /// A file with `access-key-id = "..."` and `secret-access-key = "..."` (and optionally
    /// `session-token`); `None` reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// `AWS_SESSION_TOKEN` from the environment.
    pub credentials_file: Option<PathBuf>,
    /// Bound on connecting, on waiting for a response, and on every read or write of a body.
    pub timeout: Duration,
    /// Objects asked for per listing page (S3's maximum, 1000, unless a test wants paging).
    pub page_size: usize,
    /// The largest body sent in one PUT and the part size of bigger ones (at least 5 MiB).
    pub part_size: usize,
}

impl S3Options {
    /// Options for `url` at `endpoint` (`None`: AWS), path-style exactly when an endpoint is
    /// given, credentials from `credentials_file` (`None`: the environment), 10 s timeout.
    pub fn new(url: S3Url, endpoint: Option<String>, region: &str) -> S3Options {
        S3Options {
            url,
            path_style: endpoint.is_some(),
            endpoint,
            region: region.to_owned(),
            credentials_file: None,
            timeout: Duration::from_secs(10),
            page_size: 1000,
            part_size: DEFAULT_PART_SIZE,
        }
    }
}

/// The credentials file's format.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct CredentialsFile {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// A replica in an S3 bucket.
#[derive(Debug)]
pub struct S3Backend {
    opts: S3Options,
    /// The endpoint as requests use it (the default one filled in).
    endpoint: String,
    /// The bucket, or why its endpoint is unusable (reported by every operation).
    bucket: std::result::Result<Bucket, String>,
    agent: ureq::Agent,
    /// Credentials once read (a failed read is retried on the next operation).
    credentials: Mutex<Option<Credentials>>,
}

impl S3Backend {
    /// A target for `opts`; nothing is read or contacted until the first operation. A part
    /// size below S3's minimum (5 MiB) is raised to it.
    pub fn new(mut opts: S3Options) -> S3Backend {
        opts.part_size = opts.part_size.max(MIN_PART_SIZE);
        let endpoint = opts
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", opts.region));
        let style = if opts.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = endpoint
            .parse()
            .map_err(|e| format!("{e}"))
            .and_then(|u| {
                Bucket::new(u, style, opts.url.bucket.clone(), opts.region.clone())
                    .map_err(|e| format!("{e:?}"))
            })
            .map_err(|e| format!("invalid S3 endpoint {endpoint}: {e}"));
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::NativeTls)
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build();
        let t = Some(opts.timeout);
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("walship/", env!("CARGO_PKG_VERSION")))
            .timeout_resolve(t)
            .timeout_connect(t)
            .timeout_send_request(t)
            .timeout_recv_response(t)
            .timeout_per_read(t)
            .timeout_per_write(t)
            .tls_config(tls)
            .build()
            .into();
        S3Backend {
            opts,
            endpoint,
            bucket,
            agent,
            credentials: Mutex::new(None),
        }
    }

    /// The object key of replica path `path` (`""`: the prefix itself).
    fn key(&self, path: &str) -> String {
        match (self.opts.url.prefix.as_str(), path) {
            ("", p) => p.to_owned(),
            (pre, "") => pre.to_owned(),
            (pre, p) => format!("{pre}/{p}"),
        }
    }

    /// The key prefix of the objects in directory `dir`: `KEY/`, or `""` for the root of a
    /// whole-bucket replica.
    fn dir_prefix(&self, dir: &str) -> String {
        let k = self.key(dir);
        if k.is_empty() {
            k
        } else {
            k + "/"
        }
    }

    fn bucket(&self, op: &str, path: &str) -> Result<&Bucket> {
        self.bucket
            .as_ref()
            .map_err(|e| self.fail(ErrorKind::Other, op, path, e))
    }

    /// An error `failed to OP s3://BUCKET/PREFIX/PATH: WHY`.
    fn fail(&self, kind: ErrorKind, op: &str, path: &str, why: &str) -> BackendError {
        let sep = if path.is_empty() { "" } else { "/" };
        BackendError::new(
            kind,
            format!("failed to {op} {}{sep}{path}: {why}", self.url()),
        )
    }

    /// The credentials, read on first use.
    fn credentials(&self, op: &str, path: &str) -> Result<Credentials> {
        let mut cached = self
            .credentials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = &*cached {
            return Ok(c.clone());
        }
        let c = self
            .read_credentials()
            .map_err(|why| self.fail(ErrorKind::Other, op, path, &why))?;
        *cached = Some(c.clone());
        Ok(c)
    }

    fn read_credentials(&self) -> std::result::Result<Credentials, String> {
        let Some(file) = &self.opts.credentials_file else {
            return Credentials::from_env().ok_or_else(|| {
                "no S3 credentials: set `credentials-file` or AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY"
                    .to_owned()
            });
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read S3 credentials file {}: {e}", file.display()))?;
        // The parser's message only: its usual form quotes the offending line, a secret.
        let c: CredentialsFile = toml::from_str(&text).map_err(|e| {
            format!(
                "invalid S3 credentials file {}: {} (expected access-key-id = \"...\" and \
                 secret-access-key = \"...\")",
                file.display(),
                e.message()
            )
        })?;
        Ok(match c.session_token {
            Some(t) => Credentials::new_with_token(c.access_key_id, c.secret_access_key, t),
            None => Credentials::new(c.access_key_id, c.secret_access_key),
        })
    }

    /// Sends the request `attempt` makes (signed anew each time), retrying 5xx, 429 and network
    /// failures; returns the successful response or the error, classified.
    fn send(
        &self,
        op: &str,
        path: &str,
        mut attempt: impl FnMut(
            &Bucket,
            &Credentials,
        ) -> std::result::Result<Response<Body>, ureq::Error>,
    ) -> Result<Response<Body>> {
        let bucket = self.bucket(op, path)?;
        let creds = self.credentials(op, path)?;
        let mut delay = FIRST_BACKOFF;
        let mut attempts = 1;
        loop {
            let err = match attempt(bucket, &creds) {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => {
                    if resp.status().as_u16() == 403 {
                        // Read the credentials again next time: the admin may be fixing them.
                        *self
                            .credentials
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                    }
                    self.status_error(op, path, resp)
                }
                Err(e) => self.transport_error(op, path, &e),
            };
            if err.kind != ErrorKind::Unavailable || attempts >= ATTEMPTS {
                return Err(err);
            }
            debug!("{err}; retrying in {delay:?}");
            std::thread::sleep(delay);
            delay *= 4;
            attempts += 1;
        }
    }

    /// Classifies an error response by its status and S3 error code.
    fn status_error(&self, op: &str, path: &str, resp: Response<Body>) -> BackendError {
        let status = resp.status().as_u16();
        // AWS names the bucket's region in a header of its redirects and refusals.
        let header_region = resp
            .headers()
            .get("x-amz-bucket-region")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp
            .into_body()
            .into_with_config()
            .limit(ERROR_BODY_LIMIT)
            .read_to_string()
            .unwrap_or_default();
        let code = xml_tag(&body, "Code").unwrap_or_default();
        let message = xml_tag(&body, "Message").unwrap_or_default();
        let said = match (code.is_empty(), message.is_empty()) {
            (true, _) => format!("HTTP {status}"),
            (false, true) => format!("HTTP {status} {code}"),
            (false, false) => format!("HTTP {status} {code}: {message}"),
        };
        let bucket = &self.opts.url.bucket;
        let region = &self.opts.region;
        let (kind, why) = match (status, code.as_str()) {
            (404, "NoSuchBucket") => (
                ErrorKind::Other,
                format!(
                    "bucket {bucket} does not exist at {} ({said})",
                    self.endpoint
                ),
            ),
            (404, _) => (ErrorKind::NotFound, format!("no such object ({said})")),
            (400 | 403, _) if about_time(&code, &message) => (
                ErrorKind::Other,
                format!("this host's clock and the store's differ too much; check NTP ({said})"),
            ),
            (403, _) => (
                ErrorKind::Other,
                format!(
                    "access denied: check the access key and secret in {} and the key's \
                     permissions on bucket {bucket} ({said})",
                    self.credentials_origin()
                ),
            ),
            (301, _) | (400, "AuthorizationHeaderMalformed") | (400, "InvalidRegion") => {
                let right = xml_tag(&body, "Region")
                    .or(header_region)
                    .map(|r| format!("the bucket is in region {r}, "))
                    .unwrap_or_default();
                (
                    ErrorKind::Other,
                    format!("wrong region: {right}the config says {region} ({said})"),
                )
            }
            (408 | 429 | 500..=599, _) => (ErrorKind::Unavailable, said),
            _ => (ErrorKind::Other, said),
        };
        self.fail(kind, op, path, &why)
    }

    /// Where the credentials came from, for messages.
    fn credentials_origin(&self) -> String {
        match &self.opts.credentials_file {
            Some(f) => f.display().to_string(),
            None => "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY".to_owned(),
        }
    }

    /// Classifies a failure to talk to the store at all.
    fn transport_error(&self, op: &str, path: &str, e: &ureq::Error) -> BackendError {
        use ureq::Error as E;
        let kind = match e {
            E::Tls(_) | E::NativeTls(_) | E::BadUri(_) | E::Http(_) | E::TlsRequired => {
                ErrorKind::Other
            }
            E::Io(io) => BackendError::io(op, path, "", io).kind,
            _ => ErrorKind::Unavailable,
        };
        self.fail(
            kind,
            op,
            path,
            &format!("cannot reach {}: {e}", self.endpoint),
        )
    }

    /// Reads a successful response's body as text.
    fn text(&self, op: &str, path: &str, resp: Response<Body>) -> Result<String> {
        resp.into_body()
            .into_with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| self.transport_error(op, path, &e))
    }

    /// One PUT of `body` to `key`, with its MD5 so the store refuses a damaged body.
    fn put(&self, path: &str, key: &str, body: &[u8]) -> Result<()> {
        let md5 = content_md5(body);
        self.send("upload", path, |b, c| {
            let mut a = b.put_object(Some(c), key);
            a.headers_mut().insert("content-md5", md5.as_str());
            self.agent
                .put(a.sign(SIGNED_FOR).as_str())
                .header("content-md5", &md5)
                .send(body)
        })?;
        Ok(())
    }

    /// Uploads `first` and the rest of `data` as a multipart upload: completed only when every
    /// part is stored, aborted on any failure.
    fn multipart(&self, path: &str, key: &str, first: Vec<u8>, data: &mut dyn Read) -> Result<u64> {
        let resp = self.send("upload", path, |b, c| {
            let a = b.create_multipart_upload(Some(c), key);
            self.agent.post(a.sign(SIGNED_FOR).as_str()).send_empty()
        })?;
        let text = self.text("upload", path, resp)?;
        let created = CreateMultipartUpload::parse_response(&text).map_err(|e| {
            self.fail(
                ErrorKind::Other,
                "upload",
                path,
                &format!("bad response to starting a multipart upload: {e}"),
            )
        })?;
        let id = created.upload_id().to_owned();
        let result = self.upload_parts(path, key, &id, first, data);
        if result.is_err() {
            let aborted = self.send("abort the upload of", path, |b, c| {
                let a = b.abort_multipart_upload(Some(c), key, &id);
                self.agent.delete(a.sign(SIGNED_FOR).as_str()).call()
            });
            if let Err(e) = aborted {
                warn!("{e}; the parts stay until the next cleanup of the directory");
            }
        }
        result
    }

    fn upload_parts(
        &self,
        path: &str,
        key: &str,
        id: &str,
        mut part: Vec<u8>,
        data: &mut dyn Read,
    ) -> Result<u64> {
        let mut etags = Vec::new();
        let mut total = 0u64;
        for number in 1..=MAX_PARTS {
            let md5 = content_md5(&part);
            let resp = self.send("upload", path, |b, c| {
                let mut a = b.upload_part(Some(c), key, number, id);
                a.headers_mut().insert("content-md5", md5.as_str());
                self.agent
                    .put(a.sign(SIGNED_FOR).as_str())
                    .header("content-md5", &md5)
                    .send(&part[..])
            })?;
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    self.fail(
                        ErrorKind::Other,
                        "upload",
                        path,
                        "the store sent no ETag for a part",
                    )
                })?;
            etags.push(etag.to_owned());
            total += part.len() as u64;
            if part.len() < self.opts.part_size {
                return self.complete(path, key, id, &etags).map(|()| total);
            }
            part = self.read_part(path, data)?;
            if part.is_empty() {
                return self.complete(path, key, id, &etags).map(|()| total);
            }
        }
        Err(self.fail(
            ErrorKind::Other,
            "upload",
            path,
            &format!(
                "larger than {MAX_PARTS} parts of {} bytes",
                self.opts.part_size
            ),
        ))
    }

    fn complete(&self, path: &str, key: &str, id: &str, etags: &[String]) -> Result<()> {
        let resp = self.send("upload", path, |b, c| {
            let a = b.complete_multipart_upload(Some(c), key, id, etags.iter().map(String::as_str));
            let url = a.sign(SIGNED_FOR);
            self.agent.post(url.as_str()).send(a.body())
        })?;
        // S3 may answer 200 and still fail the completion, with an error document.
        let text = self.text("upload", path, resp)?;
        if let Some(code) = xml_tag(&text, "Code") {
            let msg = xml_tag(&text, "Message").unwrap_or_default();
            return Err(self.fail(
                ErrorKind::Unavailable,
                "upload",
                path,
                &format!("completing the upload failed: {code}: {msg}"),
            ));
        }
        Ok(())
    }

    /// Reads up to one part from `data`.
    fn read_part(&self, path: &str, data: &mut dyn Read) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        data.take(self.opts.part_size as u64)
            .read_to_end(&mut buf)
            .map_err(|e| {
                self.fail(
                    ErrorKind::Other,
                    "upload",
                    path,
                    &format!("reading the data: {e}"),
                )
            })?;
        Ok(buf)
    }

    /// Signs a request for an action rusty-s3 lacks, on the bucket itself.
    fn sign_bucket(
        &self,
        b: &Bucket,
        c: &Credentials,
        method: rusty_s3::Method,
        query: &[(&str, &str)],
    ) -> String {
        rusty_s3::signing::sign(
            &jiff::Timestamp::now(),
            method,
            b.base_url().clone(),
            c.key(),
            c.secret(),
            c.token(),
            b.region(),
            SIGNED_FOR.as_secs(),
            query.iter().copied(),
            std::iter::empty(),
        )
        .to_string()
    }
}

impl Backend for S3Backend {
    fn url(&self) -> String {
        self.opts.url.to_string()
    }

    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        check_path(dir, true)?;
        let prefix = self.dir_prefix(dir);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let resp = self.send("list", dir, |b, c| {
                let mut a = b.list_objects_v2(Some(c));
                a.with_prefix(prefix.as_str());
                a.with_delimiter("/");
                a.with_max_keys(self.opts.page_size);
                if let Some(t) = &token {
                    a.with_continuation_token(t.as_str());
                }
                self.agent.get(a.sign(SIGNED_FOR).as_str()).call()
            })?;
            let text = self.text("list", dir, resp)?;
            let page = ListObjectsV2::parse_response(&text).map_err(|e| {
                self.fail(
                    ErrorKind::Other,
                    "list",
                    dir,
                    &format!("bad listing from the store: {e}"),
                )
            })?;
            let files = page
                .contents
                .into_iter()
                .map(|o| (o.key, o.size.unwrap_or(0), false));
            let dirs = page
                .common_prefixes
                .into_iter()
                .map(|p| (p.prefix, 0, true));
            for (key, size, is_dir) in files.chain(dirs) {
                let name = key.strip_prefix(&prefix).unwrap_or_default();
                let name = if is_dir {
                    name.strip_suffix('/').unwrap_or_default()
                } else {
                    name
                };
                if name.contains('/') || plain_relative_path(name).is_err() {
                    debug!(
                        "{}: skipping object {key:?}: not a replica name",
                        self.url()
                    );
                    continue;
                }
                out.push(Entry {
                    name: name.to_owned(),
                    size,
                    is_dir,
                });
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn read(&self, path: &str) -> Result<Box<dyn Read + Send>> {
        check_path(path, false)?;
        let key = self.key(path);
        let resp = self.send("read", path, |b, c| {
            let a = b.get_object(Some(c), &key);
            self.agent.get(a.sign(SIGNED_FOR).as_str()).call()
        })?;
        Ok(Box::new(ContextReader {
            inner: resp.into_body().into_reader(),
            what: format!("failed to read {}/{path}", self.url()),
        }))
    }

    fn write_atomic(&self, path: &str, data: &mut dyn Read) -> Result<u64> {
        check_path(path, false)?;
        let key = self.key(path);
        let first = self.read_part(path, data)?;
        if first.len() < self.opts.part_size {
            self.put(path, &key, &first)?;
            return Ok(first.len() as u64);
        }
        self.multipart(path, &key, first, data)
    }

    fn delete(&self, path: &str) -> Result<()> {
        check_path(path, false)?;
        let key = self.key(path);
        let done = self.send("delete", path, |b, c| {
            let a = b.delete_object(Some(c), &key);
            self.agent.delete(a.sign(SIGNED_FOR).as_str()).call()
        });
        match done {
            Err(e) if e.kind != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn remove_dir(&self, dir: &str) -> Result<()> {
        check_path(dir, true)
    }

    fn cleanup(&self, dir: &str) -> Result<usize> {
        check_path(dir, true)?;
        let prefix = self.dir_prefix(dir);
        let resp = self.send("list the incomplete uploads of", dir, |b, c| {
            let q = [
                ("delimiter", "/"),
                ("prefix", prefix.as_str()),
                ("uploads", ""),
            ];
            let url = self.sign_bucket(b, c, rusty_s3::Method::Get, &q);
            self.agent.get(url.as_str()).call()
        })?;
        let text = self.text("list the incomplete uploads of", dir, resp)?;
        let mut n = 0;
        for upload in xml_all(&text, "Upload") {
            let (Some(key), Some(id)) = (xml_tag(upload, "Key"), xml_tag(upload, "UploadId"))
            else {
                continue;
            };
            let Some(name) = key.strip_prefix(&prefix) else {
                continue;
            };
            self.send("abort the upload of", name, |b, c| {
                let a = b.abort_multipart_upload(Some(c), &key, &id);
                self.agent.delete(a.sign(SIGNED_FOR).as_str()).call()
            })?;
            n += 1;
        }
        Ok(n)
    }
}

/// A body reader whose errors say what was being read.
struct ContextReader<R> {
    inner: R,
    what: String,
}

impl<R: Read> Read for ContextReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner
            .read(buf)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.what)))
    }
}

/// Whether an S3 error says that the request's date was refused: AWS's `RequestTimeTooSkewed`
/// and `RequestExpired`, Garage's `InvalidRequest: ... Date is too old`, and the like.
fn about_time(code: &str, message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    matches!(code, "RequestTimeTooSkewed" | "RequestExpired")
        || ["date", "expired", "skew", "not yet valid"]
            .iter()
            .any(|w| m.contains(w))
}

/// The `Content-MD5` header value of `body`.
fn content_md5(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body))
}

/// The text of the first `<tag>...</tag>` in `xml`, unescaped.
fn xml_tag(xml: &str, tag: &str) -> Option<String> {
    xml_all(xml, tag).next().map(unescape)
}

/// The raw contents of every `<tag>...</tag>` in `xml`, in order (S3's documents are flat
/// enough that this small scanner reads what walship needs from them).
fn xml_all<'a>(xml: &'a str, tag: &str) -> impl Iterator<Item = &'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut rest = xml;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let len = rest[start..].find(&close)?;
        let inner = &rest[start..start + len];
        rest = &rest[start + len + close.len()..];
        Some(inner)
    })
}

/// Undoes XML's five escapes.
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_scanner_reads_error_documents_and_upload_lists() {
        let err = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code>\
                   <Message>Bucket &apos;x&apos; &amp; y</Message><Region>eu-west-1</Region></Error>";
        assert_eq!(xml_tag(err, "Code").as_deref(), Some("NoSuchBucket"));
        assert_eq!(xml_tag(err, "Message").as_deref(), Some("Bucket 'x' & y"));
        assert_eq!(xml_tag(err, "Region").as_deref(), Some("eu-west-1"));
        assert_eq!(xml_tag(err, "Missing"), None);
        let list = "<R><Upload><Key>a/b</Key><UploadId>1</UploadId></Upload>\
                    <Upload><Key>a/c</Key><UploadId>2</UploadId></Upload></R>";
        let got: Vec<_> = xml_all(list, "Upload")
            .map(|u| (xml_tag(u, "Key"), xml_tag(u, "UploadId")))
            .collect();
        assert_eq!(
            got,
            [
                (Some("a/b".into()), Some("1".into())),
                (Some("a/c".into()), Some("2".into()))
            ]
        );
    }

    #[test]
    fn keys_join_prefix_and_path() {
        let mk = |prefix: &str| {
            S3Backend::new(S3Options::new(
                S3Url {
                    bucket: "bkt".into(),
                    prefix: prefix.into(),
                },
                Some("http://127.0.0.1:9".into()),
                "garage",
            ))
        };
        let b = mk("db/fruits");
        assert_eq!(b.key("generations/x"), "db/fruits/generations/x");
        assert_eq!(b.dir_prefix(""), "db/fruits/");
        assert_eq!(b.dir_prefix("generations"), "db/fruits/generations/");
        let whole = mk("");
        assert_eq!(whole.key("a"), "a");
        assert_eq!(whole.dir_prefix(""), "");
        assert_eq!(whole.dir_prefix("a"), "a/");
    }

    #[test]
    fn content_md5_is_base64_of_the_digest() {
        assert_eq!(content_md5(b""), "1B2M2Y8AsgTpgAmY7PhCfg==");
    }
}
