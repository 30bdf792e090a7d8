//! The HTTPS JSON API under `/v1`: routing, request parsing, and the one place
//! where errors become HTTP statuses. Handlers are thin: they call `service`.

use crate::error::Error;
use crate::requests::Listing;
use crate::service::{Caller, Wicket};
use crate::ssh::RecordingData;
use axum::extract::rejection::JsonRejection;
use axum::extract::Path;
use axum::extract::{FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use wicket_api::{
    ActionBody, BreakGlassBody, Certificates, CreateRequest, ErrorBody, Grant, LoginRequest, Me,
    Notification, Ping, ReissueRequest, Resources, ReviewBody,
};
use wicket_ca::VerifiedClientCert;

/// Largest request body accepted anywhere in the API.
pub const MAX_BODY: usize = 64 * 1024;

/// Per-connection facts, attached to every request on that connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The verified client certificate, when the client presented one.
    pub client: Option<Result<VerifiedClientCert, String>>,
}

/// The one mapping from errors to HTTP statuses and bodies.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Error::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            Error::Ca(wicket_ca::Error::InvalidRequest(_))
            | Error::Ca(wicket_ca::Error::MalformedPublicKey(_)) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            Error::Ca(_) | Error::Store(_) | Error::Io(_) | Error::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed");
            "internal error; see the wicketd log".to_owned()
        } else {
            self.to_string()
        };
        let mut resp = (
            status,
            Json(ErrorBody {
                code: code.into(),
                error: message,
            }),
        )
            .into_response();
        let retry_after = match self {
            Error::RateLimited { retry_after_secs } => Some(retry_after_secs),
            Error::Busy(_) => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// JSON body extractor whose rejections use the API's error shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                let status = rejection.status();
                let msg = match &rejection {
                    JsonRejection::JsonDataError(e) => {
                        format!("invalid request body: {}", e.body_text())
                    }
                    JsonRejection::JsonSyntaxError(_) => {
                        "request body is not valid JSON".to_owned()
                    }
                    JsonRejection::MissingJsonContentType(_) => {
                        "expected Content-Type: application/json".to_owned()
                    }
                    _ if status == StatusCode::PAYLOAD_TOO_LARGE => {
                        format!("request body is larger than {MAX_BODY} bytes")
                    }
                    other => other.body_text(),
                };
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "too_large"
                } else {
                    "bad_request"
                };
                let status = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    status
                } else {
                    StatusCode::BAD_REQUEST
                };
                Err((
                    status,
                    Json(ErrorBody {
                        code: code.into(),
                        error: msg,
                    }),
                )
                    .into_response())
            }
        }
    }
}

/// Extractor: the caller proven by a client certificate (mutual TLS).
pub struct Authenticated(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let conn = parts
            .extensions
            .get::<ConnInfo>()
            .ok_or_else(|| Error::Internal("connection info missing".into()))?;
        match &conn.client {
            None => Err(Error::Unauthenticated(
                "this call needs a client certificate; run `wicket login`".into(),
            )),
            Some(Err(reason)) => Err(Error::Unauthenticated(format!(
                "client certificate rejected: {reason}"
            ))),
            Some(Ok(cert)) => {
                let id = cert.identity.as_ref().ok_or_else(|| {
                    Error::Unauthenticated("client certificate carries no Wicket identity".into())
                })?;
                // The handshake checked the certificate's window (ending
                // before notAfter, as `verify_client`); a kept-alive
                // connection must not outlive it.
                if !cert.validity.contains(crate::clock::now().timestamp()) {
                    return Err(Error::Unauthenticated(
                        "client certificate expired during this connection; run `wicket login`"
                            .into(),
                    ));
                }
                Ok(Authenticated(Caller::of_certificate(
                    id,
                    cert.validity.not_after,
                    conn.peer.ip(),
                )))
            }
        }
    }
}

/// Extractor: the TCP peer.
pub struct Peer(pub SocketAddr);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<ConnInfo>()
            .map(|c| Peer(c.peer))
            .ok_or_else(|| Error::Internal("connection info missing".into()))
    }
}

type AppState = Arc<Wicket>;
type ApiResult<T> = Result<Json<T>, Error>;

/// The OpenAPI 3 document for `/v1`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route of the API (kept in step with `openapi.json` by a test).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/ping", get(ping))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/login", post(login))
        .route("/v1/certs", post(reissue))
        .route("/v1/me", get(me))
        .route("/v1/resources", get(resources))
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/requests", post(create_request).get(list_requests))
        .route("/v1/requests/{id}", get(show_request))
        .route("/v1/requests/{id}/review", post(review_request))
        .route("/v1/requests/{id}/{action}", post(request_action))
        .route("/v1/break-glass", post(break_glass))
        .route("/v1/notifications", get(notifications))
        .route("/v1/recordings", get(list_recordings))
        .route("/v1/recordings/{id}", get(get_recording))
        .fallback(|| async { Error::NotFound("no such API endpoint".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(reject_oversized))
        .with_state(state)
}

/// Bodies up to this size are read (and discarded as they come, never held)
/// before a 413, so the client sees the answer instead of a reset
/// connection.
const DRAIN_MAX: usize = 4 * 1024 * 1024;

/// Answers 413 for a declared body larger than [`MAX_BODY`], before routing.
async fn reject_oversized(req: Request, next: axum::middleware::Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > MAX_BODY as u64 => {
            if n <= DRAIN_MAX as u64 {
                // Read and dropped frame by frame: nothing is kept.
                use http_body_util::BodyExt;
                let mut body = req.into_body();
                let mut left = DRAIN_MAX;
                while let Some(Ok(frame)) = body.frame().await {
                    let n = frame.data_ref().map_or(0, |d| d.len());
                    if n >= left {
                        break;
                    }
                    left -= n;
                }
            }
            let body = ErrorBody {
                code: "too_large".into(),
                error: format!("request body is larger than {MAX_BODY} bytes"),
            };
            (StatusCode::PAYLOAD_TOO_LARGE, Json(body)).into_response()
        }
        _ => next.run(req).await,
    }
}

async fn ping(State(w): State<AppState>) -> Json<Ping> {
    Json(Ping {
        cluster_name: w.config.cluster_name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        tls_ca_pin: w.keys.tls.pin(),
    })
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn login(
    State(w): State<AppState>,
    Peer(peer): Peer,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Certificates> {
    Ok(Json(w.login(req, peer.ip(), crate::clock::now()).await?))
}

async fn reissue(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(req): ApiJson<ReissueRequest>,
) -> ApiResult<Certificates> {
    Ok(Json(w.reissue(&caller, req, crate::clock::now()).await?))
}

async fn me(State(w): State<AppState>, Authenticated(caller): Authenticated) -> ApiResult<Me> {
    Ok(Json(w.me(&caller).await?))
}

async fn resources(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
) -> ApiResult<Resources> {
    Ok(Json(w.resources(&caller).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    actor: Option<String>,
    kind: Option<String>,
    request: Option<String>,
    session: Option<String>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    limit: Option<i64>,
}

async fn audit_verify(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
) -> ApiResult<wicket_api::AuditVerifyView> {
    Ok(Json(w.verify_audit(&caller).await?))
}

async fn audit(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<wicket_api::AuditEventView>> {
    let Query(q) = query.map_err(|e| Error::BadRequest(e.body_text()))?;
    Ok(Json(
        w.search_audit(
            &caller,
            crate::store::AuditFilter {
                actor: q.actor,
                kind: q.kind,
                request_id: q.request,
                session_id: q.session,
                since_ms: q.since.map(|t| t.timestamp_millis()),
                limit: q.limit.unwrap_or(1000),
            },
        )
        .await?,
    ))
}

async fn create_request(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(body): ApiJson<CreateRequest>,
) -> ApiResult<Grant> {
    Ok(Json(
        w.create_request(&caller, body, crate::clock::now()).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    mine: Option<bool>,
    reviewable: Option<bool>,
    state: Option<String>,
}

async fn list_requests(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<Grant>> {
    let Query(q) = query.map_err(|e| Error::BadRequest(e.body_text()))?;
    let listing = match (q.mine.unwrap_or(false), q.reviewable.unwrap_or(false)) {
        (true, true) => {
            return Err(Error::BadRequest(
                "choose mine or reviewable, not both".into(),
            ))
        }
        (true, false) => Listing::Mine,
        (false, true) => Listing::Reviewable,
        (false, false) => Listing::All,
    };
    Ok(Json(
        w.list_requests(&caller, listing, q.state.as_deref(), crate::clock::now())
            .await?,
    ))
}

async fn show_request(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
) -> ApiResult<Grant> {
    Ok(Json(
        w.show_request(&caller, &id, crate::clock::now()).await?,
    ))
}

async fn review_request(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ReviewBody>,
) -> ApiResult<Grant> {
    Ok(Json(
        w.review_request(&caller, &id, body, crate::clock::now())
            .await?,
    ))
}

async fn request_action(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    Path((id, action)): Path<(String, String)>,
    ApiJson(body): ApiJson<ActionBody>,
) -> ApiResult<Grant> {
    Ok(Json(
        w.request_action(&caller, &id, &action, body, crate::clock::now())
            .await?,
    ))
}

async fn break_glass(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(body): ApiJson<BreakGlassBody>,
) -> ApiResult<Grant> {
    Ok(Json(
        w.break_glass(&caller, body, crate::clock::now()).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NotificationQuery {
    request: Option<String>,
    /// The newest this many (1 to 10,000; 1,000 by default).
    limit: Option<i64>,
}

async fn notifications(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    query: Result<Query<NotificationQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<Notification>> {
    let Query(q) = query.map_err(|e| Error::BadRequest(e.body_text()))?;
    Ok(Json(
        w.notifications(&caller, q.request.as_deref(), q.limit)
            .await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordingQuery {
    request: Option<String>,
    user: Option<String>,
}

async fn list_recordings(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    query: Result<Query<RecordingQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<wicket_api::RecordingInfo>> {
    let Query(q) = query.map_err(|e| Error::BadRequest(e.body_text()))?;
    Ok(Json(w.list_recordings(&caller, q.request, q.user).await?))
}

async fn get_recording(
    State(w): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let body = match w.recording(&caller, &id).await? {
        RecordingData::File(file) => axum::body::Body::new(FileBody {
            file,
            buf: vec![0; FILE_CHUNK],
        }),
        RecordingData::Stored(parts) => axum::body::Body::from_stream(parts.into_stream()),
    };
    Ok(([(header::CONTENT_TYPE, "application/x-asciicast")], body).into_response())
}

/// Bytes read from a file per chunk of a streamed response.
const FILE_CHUNK: usize = 64 * 1024;

/// A file sent in chunks as it is read: a recording of any size costs one
/// chunk of memory per download, however many run at once.
struct FileBody {
    file: tokio::fs::File,
    buf: Vec<u8>,
}

impl http_body::Body for FileBody {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<bytes::Bytes>, std::io::Error>>>
    {
        use std::task::Poll;
        let this = &mut *self;
        let mut read = tokio::io::ReadBuf::new(&mut this.buf);
        match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut this.file), cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) if read.filled().is_empty() => Poll::Ready(None),
            Poll::Ready(Ok(())) => Poll::Ready(Some(Ok(http_body::Frame::data(
                bytes::Bytes::copy_from_slice(read.filled()),
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Errors map to their status in one place: a busy moment is 503 with a
    /// retry, an internal error says nothing of its cause.
    #[tokio::test]
    async fn errors_map_to_their_status() {
        use http_body_util::BodyExt;
        let busy =
            Error::Busy("too many recordings are being loaded; try again".into()).into_response();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
        let limited = Error::RateLimited {
            retry_after_secs: 30,
        }
        .into_response();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers()[header::RETRY_AFTER], "30");
        let internal = Error::Internal("secret detail".into()).into_response();
        assert_eq!(internal.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!internal.headers().contains_key(header::RETRY_AFTER));
        let body = internal.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("internal error") && !body.contains("secret detail"),
            "{body}"
        );
    }

    /// A recording goes out in chunks as the file is read, never whole.
    #[tokio::test]
    async fn a_file_body_streams_the_file_in_bounded_chunks() {
        use http_body_util::BodyExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.cast");
        let data: Vec<u8> = (0..(3 * FILE_CHUNK + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let mut body = FileBody {
            file: tokio::fs::File::open(&path).await.unwrap(),
            buf: vec![0; FILE_CHUNK],
        };
        let mut got = Vec::new();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            assert!(chunk.len() <= FILE_CHUNK, "{}", chunk.len());
            got.extend_from_slice(&chunk);
            frames += 1;
        }
        assert_eq!(got, data);
        assert!(frames >= 4, "{frames}");
    }

    #[test]
    fn openapi_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let src = include_str!("api.rs");
        let routes: Vec<&str> = src
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".route(\""))
            .filter_map(|l| l.split('"').next())
            .collect();
        assert!(routes.len() >= 7);
        for r in routes {
            assert!(paths.contains_key(r), "{r} missing from openapi.json");
        }
        assert_eq!(
            doc["openapi"].as_str().unwrap().split('.').next(),
            Some("3")
        );
    }
    /// The caller a request on a connection with `client` is taken for.
    async fn caller_on(
        client: Option<Result<VerifiedClientCert, String>>,
    ) -> Result<Caller, Error> {
        let (mut parts, ()) = axum::http::Request::new(()).into_parts();
        parts.extensions.insert(ConnInfo {
            peer: "127.0.0.1:4000".parse().unwrap(),
            client,
        });
        Authenticated::from_request_parts(&mut parts, &())
            .await
            .map(|a| a.0)
    }

    fn cert(not_after: i64, login_until: Option<i64>) -> VerifiedClientCert {
        VerifiedClientCert {
            common_name: "ann".into(),
            identity: Some(wicket_ca::Identity {
                user: "ann".into(),
                roles: vec![],
                request_ids: vec!["r-1".into()],
                login_until,
            }),
            serial_hex: "01".into(),
            validity: wicket_ca::Validity::new(0, not_after).unwrap(),
            ca_pin: "sha256:x".into(),
        }
    }

    #[tokio::test]
    async fn a_certificate_is_checked_on_every_request_of_a_connection() {
        let now = crate::clock::now().timestamp();
        let caller = caller_on(Some(Ok(cert(now + 600, Some(now + 60)))))
            .await
            .unwrap();
        assert_eq!(caller.user, "ann");
        assert_eq!(caller.request_ids, ["r-1"]);
        assert_eq!(caller.login_until, now + 60);
        // A certificate from before identities carried the login's end
        // stands for a login that ends with it.
        let caller = caller_on(Some(Ok(cert(now + 600, None)))).await.unwrap();
        assert_eq!(caller.login_until, now + 600);
        // Expired since the connection's handshake.
        let e = caller_on(Some(Ok(cert(now - 1, Some(now - 1)))))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Unauthenticated(m) if m.contains("expired")),
            "{e:?}"
        );
        assert!(matches!(
            caller_on(None).await,
            Err(Error::Unauthenticated(_))
        ));
    }
}
