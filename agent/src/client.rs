//! A small HTTPS JSON client for wicketd's API: hyper over tokio-rustls
//! (ring), trusting either a pinned CA (`--ca-pin`), the CA bundle saved at
//! login, or — with `--insecure` — anything. After login it presents the
//! user's client certificate on every call.

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use wicket_api::ErrorBody;

const MAX_RESPONSE: usize = 16 * 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

/// How the client decides to trust the server.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The CA whose public key hashes to this `sha256:` pin.
    Pin(String),
    /// CA certificates (PEM) saved at a previous login.
    Bundle(String),
    /// Any server (first contact only, with a warning).
    Insecure,
}

/// The user's client certificate and key (PEM).
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientIdentity(..)")
    }
}

/// An API client for one proxy address.
#[derive(Debug, Clone)]
pub struct Client {
    proxy: String,
    host: String,
    tls: Arc<rustls::ClientConfig>,
}

/// An error the server answered with.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.body.error)
    }
}

impl std::error::Error for ApiError {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Splits `HOST:PORT` (or `[v6]:PORT`) into host and the whole address.
pub fn split_proxy(proxy: &str) -> Result<String> {
    let (host, port) = proxy
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--proxy must be HOST:PORT, got {proxy:?}"))?;
    port.parse::<u16>()
        .map_err(|_| anyhow!("--proxy must be HOST:PORT, got {proxy:?}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("--proxy must be HOST:PORT, got {proxy:?}");
    }
    Ok(host.to_owned())
}

/// The certificates of a PEM bundle (at least one).
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let ders = wicket_ca::pem_decode_all("CERTIFICATE", pem).map_err(|e| anyhow!("{e}"))?;
    if ders.is_empty() {
        bail!("no certificate in PEM");
    }
    Ok(ders.into_iter().map(CertificateDer::from).collect())
}

/// A TLS client configuration (ring) that verifies the server with
/// `verifier` and presents `identity`, if given: the API client's, the
/// database tunnel's.
pub fn tls_config(
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Option<&ClientIdentity>,
) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(match identity {
        Some(id) => {
            let chain = certs_from_pem(&id.cert_pem).context("your TLS certificate")?;
            let key_der = wicket_ca::pem_decode("PRIVATE KEY", &id.key_pem)
                .map_err(|e| anyhow!("your TLS key: {e}"))?;
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(key_der.into()))
                .map_err(|e| anyhow!("your TLS certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    })
}

impl Client {
    pub fn new(proxy: &str, trust: Trust, identity: Option<&ClientIdentity>) -> Result<Self> {
        let host = split_proxy(proxy)?;
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = match trust {
            Trust::Bundle(pem) => proxy_verifier(&pem)?,
            Trust::Pin(pin) => Arc::new(CustomVerifier {
                check: Check::Pin(pin),
                provider: provider.clone(),
            }),
            Trust::Insecure => Arc::new(CustomVerifier {
                check: Check::Any,
                provider: provider.clone(),
            }),
        };
        let mut config = tls_config(verifier, identity)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            proxy: proxy.to_owned(),
            host,
            tls: Arc::new(config),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// GET a large non-JSON body (a recording), to be read as it comes.
    /// The answer must start within [`TIMEOUT`]; then it takes as long as
    /// it needs while data keeps coming (see [`Download::chunk`]). An error
    /// answer is read whole (up to 1 MiB) and returned as the error.
    pub async fn get_stream(&self, path: &str) -> Result<Download> {
        let (status, body) = within(&self.proxy, async {
            self.connect_inner()
                .await?
                .start(Method::GET, path, None::<&()>)
                .await
        })
        .await?;
        let mut download = Download {
            body,
            proxy: self.proxy.clone(),
            read: 0,
        };
        if !status.is_success() {
            // What arrives of it: a body cut short still has its status.
            let mut error = Vec::new();
            while let Ok(Some(chunk)) = download.chunk().await {
                if error.len() + chunk.len() > 1 << 20 {
                    break;
                }
                error.extend_from_slice(&chunk);
            }
            answer(status, Bytes::from(error))?;
        }
        Ok(download)
    }

    /// A connection kept for several calls (HTTP/1.1 keep-alive), for
    /// callers that make many in a row; each plain call opens its own.
    pub async fn connect(&self) -> Result<Connection> {
        within(&self.proxy, self.connect_inner()).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let body = within(&self.proxy, async {
            self.connect_inner().await?.send(method, path, body).await
        })
        .await?;
        decode(path, &body)
    }

    async fn connect_inner(&self) -> Result<Connection> {
        let tcp = TcpStream::connect(&self.proxy)
            .await
            .with_context(|| format!("cannot connect to {}", self.proxy))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| anyhow!("invalid proxy host {:?}", self.host))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| {
                // wicketd closes a connection it refuses before TLS (it
                // cannot say why earlier), so an immediate EOF is that.
                let hint = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    " (wicketd closed the connection: it may be at its connection limits, \
                     limits.max_connections, limits.max_unauthenticated or \
                     limits.max_unauthenticated_per_source; try again, or see its log)"
                } else {
                    ""
                };
                anyhow!("TLS with {} failed: {e}{hint}", self.proxy)
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection {
            proxy: self.proxy.clone(),
            sender,
        })
    }
}

/// One HTTPS connection to wicketd, for calls one after another.
pub struct Connection {
    proxy: String,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Connection {
    pub async fn get<T: DeserializeOwned>(&mut self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let proxy = self.proxy.clone();
        let body = within(&proxy, self.send(method, path, body)).await?;
        decode(path, &body)
    }

    async fn send<B: Serialize>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Bytes> {
        let (status, body) = self.start(method, path, body).await?;
        let body = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    anyhow!(
                        "the answer is larger than {} MiB; ask for less (a lower --limit, say)",
                        MAX_RESPONSE >> 20
                    )
                } else {
                    anyhow!("reading the response: {e}")
                }
            })?
            .to_bytes();
        answer(status, body)
    }

    /// Sends a request; the answer's status and its body, unread.
    async fn start<B: Serialize>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(StatusCode, hyper::body::Incoming)> {
        self.sender
            .ready()
            .await
            .context("the connection to wicketd closed")?;
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.proxy)
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(bytes))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .context("request failed")?;
        Ok((resp.status(), resp.into_body()))
    }
}

/// A response body read as it comes (see [`Client::get_stream`]).
pub struct Download {
    body: hyper::body::Incoming,
    proxy: String,
    read: u64,
}

impl Download {
    /// The next piece of the body; `None` at its end. An error when the
    /// server sends nothing for [`TIMEOUT`].
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            let frame = tokio::time::timeout(TIMEOUT, self.body.frame())
                .await
                .map_err(|_| {
                    anyhow!(
                        "{} stopped sending for {}s, after {} bytes",
                        self.proxy,
                        TIMEOUT.as_secs(),
                        self.read
                    )
                })?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => bail!("reading the response after {} bytes: {e}", self.read),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.read += data.len() as u64;
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// `body` when `status` is a success, else the error the server described
/// in it.
fn answer(status: StatusCode, body: Bytes) -> Result<Bytes> {
    if !status.is_success() {
        let body = serde_json::from_slice::<ErrorBody>(&body).unwrap_or_else(|_| ErrorBody {
            code: status.as_str().into(),
            error: format!(
                "{status}: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        });
        return Err(ApiError { status, body }.into());
    }
    Ok(body)
}

/// `f`, or an error naming the proxy when it takes over [`TIMEOUT`].
async fn within<T>(proxy: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .map_err(|_| anyhow!("{proxy} did not answer within {}s", TIMEOUT.as_secs()))?
}

/// The JSON answer of a call to `path`.
fn decode<T: DeserializeOwned>(path: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).with_context(|| format!("unexpected response from {path}"))
}

/// How a custom verifier decides on the server's certificate.
#[derive(Debug)]
enum Check {
    /// The chain must contain a CA with this SPKI pin, and that CA must have
    /// signed the leaf for the requested name.
    Pin(String),
    /// One of the saved bundle's CAs must have signed the leaf for the
    /// requested name (the verifier is built once).
    Roots(Arc<rustls::client::WebPkiServerVerifier>),
    /// `--insecure`: any certificate (handshake signatures are still checked).
    Any,
}

/// The verifier for wicketd's certificates under the saved CA bundle `pem`
/// (the API and the database listener).
pub fn proxy_verifier(pem: &str) -> Result<Arc<dyn ServerCertVerifier>> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(pem).context("saved CA bundle")? {
        roots.add(c).map_err(|e| anyhow!("saved CA bundle: {e}"))?;
    }
    let provider = provider();
    let roots = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| anyhow!("saved CA bundle: {e}"))?;
    Ok(Arc::new(CustomVerifier {
        check: Check::Roots(roots),
        provider,
    }))
}

#[derive(Debug)]
struct CustomVerifier {
    check: Check,
    provider: Arc<CryptoProvider>,
}

fn spki_pin_of(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(wicket_ca::spki_pin(c.public_key().raw))
}

impl ServerCertVerifier for CustomVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = match &self.check {
            Check::Any => return Ok(ServerCertVerified::assertion()),
            Check::Roots(inner) => {
                inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?
            }
            Check::Pin(pin) => {
                let ca = intermediates
                    .iter()
                    .find(|c| spki_pin_of(c).is_some_and(|p| p.eq_ignore_ascii_case(pin.trim())))
                    .ok_or_else(|| {
                        rustls::Error::General(format!(
                            "the server's CA does not match --ca-pin {pin} (is this the right proxy?)"
                        ))
                    })?;
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone().into_owned())?;
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                )
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?
                .verify_server_cert(end_entity, &[], server_name, ocsp, now)?
            }
        };
        // Wicket's TLS CA also signs databases' certificates
        // (`wicketd databases server-cert`), perhaps for the same name.
        if !wicket_ca::is_proxy_server(end_entity.as_ref()) {
            return Err(rustls::Error::General(
                "the server's certificate is from Wicket's CA but not wicketd's own (a database's?): is this the right proxy?"
                    .into(),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The `sha256:` pin of the CA certificate in a PEM bundle, which must
/// hold that one only: every certificate in a saved bundle is trusted, so
/// one more would be trusted unpinned.
pub fn bundle_pin(pem: &str) -> Result<String> {
    match certs_from_pem(pem)?.as_slice() {
        [ca] => spki_pin_of(ca).ok_or_else(|| anyhow!("the CA certificate does not parse")),
        more => bail!(
            "a CA bundle must hold the proxy's CA certificate only; this one holds {}",
            more.len()
        ),
    }
}
