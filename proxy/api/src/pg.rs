//! PostgreSQL wire protocol v3: framing and the messages the proxy reads.
//!
//! Incremental: [`read_startup`] and [`read_message`] look at a buffer and
//! return `Ok(None)` until a whole message is there, the message and its
//! length when it is, or an error with a reason for malformed, oversized or
//! unsupported input. Nothing here panics on any input (property-tested).

use std::fmt;

/// Protocol 3.0.
pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;

/// The startup parameter naming the database resource: set by the tunnel
/// (`wicket proxy db`) or a client of its own, read by wicketd and removed
/// before the startup message goes upstream.
pub const RESOURCE_PARAM: &str = "wicket_database";

/// Why bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(m: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(m.into()))
}

/// The first message on a connection (no type byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: u32,
        secret: u32,
    },
    /// Protocol 3.`minor` (see [`negotiate`]) with its parameters.
    Startup {
        params: Vec<(String, String)>,
        minor: u16,
    },
}

impl Startup {
    pub fn param(&self, key: &str) -> Option<&str> {
        match self {
            Startup::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads a startup-phase message of at most `max` bytes.
pub fn read_startup(buf: &[u8], max: usize) -> Result<Option<(Startup, usize)>, ProtocolError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = be32(buf) as usize;
    if len < 8 {
        return err(format!("invalid startup message length {len}"));
    }
    if len > max {
        return err(format!(
            "startup message of {len} bytes exceeds the {max}-byte limit"
        ));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let code = be32(&buf[4..8]);
    let body = &buf[8..len];
    let msg = match code {
        SSL_REQUEST if len == 8 => Startup::SslRequest,
        GSSENC_REQUEST if len == 8 => Startup::GssEncRequest,
        CANCEL_REQUEST if len == 16 => Startup::Cancel {
            pid: be32(&body[0..4]),
            secret: be32(&body[4..8]),
        },
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => return err("malformed startup request"),
        // Any 3.x: a newer minor version is negotiated down to 3.0.
        v if v >> 16 == 3 => {
            let mut params = Vec::new();
            let mut rest = body;
            loop {
                let (key, r) = cstr(rest)?;
                if key.is_empty() {
                    if !r.is_empty() {
                        return err("trailing bytes after startup parameters");
                    }
                    break;
                }
                let (val, r) = cstr(r)?;
                params.push((key.to_owned(), val.to_owned()));
                rest = r;
            }
            Startup::Startup {
                params,
                minor: (v & 0xffff) as u16,
            }
        }
        v => {
            return err(format!(
                "unsupported frontend protocol {}.{}: server supports 3.0",
                v >> 16,
                v & 0xffff
            ))
        }
    };
    Ok(Some((msg, len)))
}

/// Protocol negotiation as PostgreSQL does it: a client that asks for a
/// newer minor version than 3.0, or for protocol options (`_pq_.`
/// parameters), is told in a NegotiateProtocolVersion message that it gets
/// 3.0 and none of those options, and goes on with that (libpq 18 with
/// `max_protocol_version=latest` asks for 3.2; libpq 19 betas for 3.9999
/// and made-up options, to find servers that refuse instead). Takes the
/// options out of `params`; returns the message to send first, if any.
pub fn negotiate(minor: u16, params: &mut Vec<(String, String)>) -> Option<Vec<u8>> {
    let mut unrecognized = Vec::new();
    params.retain(|(k, _)| {
        let option = k.starts_with("_pq_.");
        if option {
            unrecognized.push(k.clone());
        }
        !option
    });
    if minor == 0 && unrecognized.is_empty() {
        return None;
    }
    // The newest minor version spoken, then the options not recognized.
    let mut body = 0u32.to_be_bytes().to_vec();
    body.extend_from_slice(&(unrecognized.len() as u32).to_be_bytes());
    for k in &unrecognized {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
    }
    Some(message(b'v', &body))
}

/// Splits a NUL-terminated UTF-8 string off the front.
fn cstr(b: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let end = b
        .iter()
        .position(|c| *c == 0)
        .ok_or_else(|| ProtocolError("unterminated string".into()))?;
    let s =
        std::str::from_utf8(&b[..end]).map_err(|_| ProtocolError("string is not UTF-8".into()))?;
    Ok((s, &b[end + 1..]))
}

/// A frontend message after startup, as much as the proxy needs to audit it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend {
    Query(String),
    Parse {
        name: String,
        query: String,
        param_types: u16,
    },
    Bind {
        portal: String,
        statement: String,
        params: Vec<Option<Vec<u8>>>,
    },
    Execute {
        portal: String,
        max_rows: u32,
    },
    CopyData(usize),
    CopyDone,
    CopyFail(String),
    /// Close of a prepared statement (`S`) or a portal (`P`).
    Close {
        kind: u8,
        name: String,
    },
    /// The legacy fast-path call of a function by OID, with its arguments.
    FunctionCall {
        oid: u32,
        args: Vec<Option<Vec<u8>>>,
    },
    Terminate,
    /// Sync, Flush and Describe (checked, and passed through).
    Other(u8),
}

/// Reads one typed message (`type, len, payload`) of at most `max` bytes.
/// Returns the message's tag, its parsed form and its total length.
pub fn read_message(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = be32(&buf[1..5]) as usize;
    if len < 4 {
        return err(format!("invalid message length {len}"));
    }
    if len + 1 > max {
        return err(format!(
            "message of {} bytes exceeds the {max}-byte limit",
            len + 1
        ));
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    Ok(Some((tag, len + 1)))
}

/// Parses a whole frontend message (as framed by [`read_message`]).
pub fn parse_frontend(msg: &[u8]) -> Result<Frontend, ProtocolError> {
    let (&tag, rest) = msg
        .split_first()
        .ok_or_else(|| ProtocolError("empty message".into()))?;
    let body = rest
        .get(4..)
        .ok_or_else(|| ProtocolError("truncated message".into()))?;
    Ok(match tag {
        b'Q' => {
            let (q, r) = cstr(body)?;
            if !r.is_empty() {
                return err("trailing bytes after query");
            }
            Frontend::Query(q.to_owned())
        }
        b'P' => {
            let (name, r) = cstr(body)?;
            let (query, r) = cstr(r)?;
            let n = u16_at(r, 0)?;
            if r.len() != 2 + 4 * n as usize {
                return err("malformed Parse message");
            }
            Frontend::Parse {
                name: name.to_owned(),
                query: query.to_owned(),
                param_types: n,
            }
        }
        b'B' => {
            let (portal, r) = cstr(body)?;
            let (statement, r) = cstr(r)?;
            let nfmt = u16_at(r, 0)? as usize;
            let (params, at) = values_at(r, 2 + 2 * nfmt, "Bind")?;
            let nres = u16_at(r, at)? as usize;
            if r.len() != at + 2 + 2 * nres {
                return err("malformed Bind message");
            }
            Frontend::Bind {
                portal: portal.to_owned(),
                statement: statement.to_owned(),
                params,
            }
        }
        b'E' => {
            let (portal, r) = cstr(body)?;
            if r.len() != 4 {
                return err("malformed Execute message");
            }
            let max_rows = be32(r);
            Frontend::Execute {
                portal: portal.to_owned(),
                max_rows,
            }
        }
        b'C' => {
            let (&kind, r) = body
                .split_first()
                .ok_or_else(|| ProtocolError("truncated Close message".into()))?;
            let (name, r) = cstr(r)?;
            if !matches!(kind, b'S' | b'P') || !r.is_empty() {
                return err("malformed Close message");
            }
            Frontend::Close {
                kind,
                name: name.to_owned(),
            }
        }
        b'F' => {
            let oid = body
                .get(0..4)
                .map(be32)
                .ok_or_else(|| ProtocolError("truncated FunctionCall message".into()))?;
            let r = &body[4..];
            let nfmt = u16_at(r, 0)? as usize;
            let (args, at) = values_at(r, 2 + 2 * nfmt, "FunctionCall")?;
            if r.len() != at + 2 {
                return err("malformed FunctionCall message");
            }
            Frontend::FunctionCall { oid, args }
        }
        b'd' => Frontend::CopyData(body.len()),
        b'f' => Frontend::CopyFail(cstr(body)?.0.to_owned()),
        // Messages without a body must have none: PostgreSQL refuses one
        // with trailing bytes, and a refusal the proxy did not foresee
        // (of a Flush, say, which the server then counts as part of an
        // extended-protocol batch) would set its tracking apart from the
        // server's.
        b'c' | b'X' | b'S' | b'H' if !body.is_empty() => {
            return Err(ProtocolError(format!(
                "malformed {} message",
                frontend_name(tag)
            )))
        }
        b'c' => Frontend::CopyDone,
        b'X' => Frontend::Terminate,
        b'S' | b'H' => Frontend::Other(tag),
        b'D' => {
            let (&kind, r) = body
                .split_first()
                .ok_or_else(|| ProtocolError("truncated Describe message".into()))?;
            let (_, r) = cstr(r)?;
            if !matches!(kind, b'S' | b'P') || !r.is_empty() {
                return err("malformed Describe message");
            }
            Frontend::Other(tag)
        }
        other => {
            return Err(ProtocolError(format!(
                "unsupported message type {:?} after startup",
                char::from(other)
            )))
        }
    })
}

fn frontend_name(tag: u8) -> &'static str {
    match tag {
        b'c' => "CopyDone",
        b'X' => "Terminate",
        b'S' => "Sync",
        _ => "Flush",
    }
}

/// Bind parameters or FunctionCall arguments (`None`: NULL).
pub type Values = Vec<Option<Vec<u8>>>;

/// A count-prefixed list of length-prefixed values (-1: NULL) at `at`, as
/// in Bind and FunctionCall; returns them and the offset after them.
fn values_at(r: &[u8], mut at: usize, what: &str) -> Result<(Values, usize), ProtocolError> {
    let n = u16_at(r, at)? as usize;
    at += 2;
    let mut values = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let len = i32::from_be_bytes(
            r.get(at..at + 4)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| ProtocolError(format!("truncated {what} values")))?,
        );
        at += 4;
        if len < 0 {
            values.push(None);
        } else {
            let v = r
                .get(at..at + len as usize)
                .ok_or_else(|| ProtocolError(format!("truncated {what} value")))?;
            values.push(Some(v.to_vec()));
            at += len as usize;
        }
    }
    Ok((values, at))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ProtocolError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or_else(|| ProtocolError("truncated message".into()))
}

/// An ErrorResponse: severity, SQLSTATE code, message.
pub fn error_response(severity: &str, code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(message.len() + 32);
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    self::message(b'E', &body)
}

/// A typed message: tag, length (including itself), body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The command tag of a backend CommandComplete (`C`), e.g. `SELECT 1` or
/// `PREPARE`; empty when malformed.
pub fn command_tag(msg: &[u8]) -> &str {
    msg.get(5..)
        .and_then(|body| cstr(body).ok())
        .map_or("", |(tag, _)| tag)
}

/// A backend ParameterStatus (`S`): (name, value).
pub fn parse_parameter_status(msg: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = cstr(msg.get(5..)?).ok()?;
    let (value, _) = cstr(rest).ok()?;
    Some((name, value))
}

/// Whether a `client_encoding` the server reports (its canonical name) has
/// multibyte characters whose later bytes can be ASCII: in such a session a
/// backslash or quote seen in the statement bytes may be part of a
/// character to the server, so the text read as UTF-8 (what is audited) and
/// the statement that runs can differ. These are PostgreSQL's client-only
/// encodings.
pub fn ascii_unsafe_encoding(name: &str) -> bool {
    [
        "SJIS",
        "SHIFT_JIS_2004",
        "BIG5",
        "GBK",
        "UHC",
        "GB18030",
        "JOHAB",
    ]
    .iter()
    .any(|e| e.eq_ignore_ascii_case(name))
}

/// The fields of a backend ErrorResponse (`E`): (code, message); `None`
/// when a field is cut short or not UTF-8.
pub fn parse_error_response(msg: &[u8]) -> Option<(String, String)> {
    match error_fields(msg) {
        (code, message, true) if msg.len() >= 5 => Some((code, message)),
        _ => None,
    }
}

/// What an ErrorResponse (`msg`, tag and length included; perhaps only its
/// first bytes) shows: its code if it is there whole, and as much of its
/// message as is there (bytes that are not UTF-8 replaced).
pub fn error_response_prefix(msg: &[u8]) -> (String, String) {
    let (code, message, _) = error_fields(msg);
    (code, message)
}

/// Walks the fields of an ErrorResponse as far as `msg` goes: its code,
/// its message, and whether every field read was whole (terminated, and
/// UTF-8). A code cut short is left out; a message cut short is kept. A
/// field in another encoding (a client_encoding other than UTF8) is read
/// lossily, and the walk goes on.
fn error_fields(msg: &[u8]) -> (String, String, bool) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut all_whole = true;
    let mut rest = msg.get(5..).unwrap_or_default();
    while let Some((&field, r)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Some(end) = r.iter().position(|&b| b == 0) else {
            if field == b'M' {
                message = String::from_utf8_lossy(r).into_owned();
            }
            return (code, message, false);
        };
        let (value, whole) = match std::str::from_utf8(&r[..end]) {
            Ok(v) => (v.to_owned(), true),
            Err(_) => (String::from_utf8_lossy(&r[..end]).into_owned(), false),
        };
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        all_whole &= whole;
        rest = &r[end + 1..];
    }
    (code, message, all_whole)
}

/// An SSLRequest.
pub fn ssl_request() -> [u8; 8] {
    let mut m = [0u8; 8];
    m[..4].copy_from_slice(&8u32.to_be_bytes());
    m[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    m
}

/// A CancelRequest for the backend with this key.
pub fn cancel_request(pid: u32, secret: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..4].copy_from_slice(&16u32.to_be_bytes());
    m[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    m[8..12].copy_from_slice(&pid.to_be_bytes());
    m[12..].copy_from_slice(&secret.to_be_bytes());
    m
}

/// A NoticeResponse (same fields as an ErrorResponse).
pub fn notice_response(severity: &str, code: &str, message: &str) -> Vec<u8> {
    let mut m = error_response(severity, code, message);
    m[0] = b'N';
    m
}

/// A simple-protocol Query of `sql`.
pub fn query_message(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&(4 + sql.len() as u32 + 1).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// A Terminate.
pub fn terminate_message() -> Vec<u8> {
    vec![b'X', 0, 0, 0, 4]
}

/// Encodes a StartupMessage (protocol 3.0) with `params`.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::message as msg;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encoded_requests_read_back() {
        assert_eq!(
            read_startup(&ssl_request(), 64),
            Ok(Some((Startup::SslRequest, 8)))
        );
        assert_eq!(
            read_startup(&cancel_request(7, 0xdead_beef), 64),
            Ok(Some((
                Startup::Cancel {
                    pid: 7,
                    secret: 0xdead_beef
                },
                16
            )))
        );
        let mut n = notice_response("WARNING", "01000", "soon");
        assert_eq!(n[0], b'N');
        n[0] = b'E';
        assert_eq!(
            parse_error_response(&n),
            Some(("01000".into(), "soon".into()))
        );
    }

    #[test]
    fn startup_messages() {
        let s = startup_message(&[("user", "alice"), ("database", "app")]);
        let (m, n) = read_startup(&s, 10_000).unwrap().unwrap();
        assert_eq!(n, s.len());
        assert_eq!(m.param("user"), Some("alice"));
        assert_eq!(m.param("database"), Some("app"));
        assert_eq!(read_startup(&s[..s.len() - 1], 10_000).unwrap(), None);
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(
            read_startup(&ssl, 100).unwrap().unwrap().0,
            Startup::SslRequest
        );
        let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        assert_eq!(
            read_startup(&gss, 100).unwrap().unwrap().0,
            Startup::GssEncRequest
        );
        let mut cancel = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        cancel.extend_from_slice(&7u32.to_be_bytes());
        cancel.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            read_startup(&cancel, 100).unwrap().unwrap().0,
            Startup::Cancel { pid: 7, secret: 9 }
        );
        // 3.2 (libpq 18 asks for it when told to), with a protocol
        // option: read, then negotiated down to 3.0 without the option.
        let mut v32 = vec![0, 0, 0, 0, 0, 3, 0, 2];
        v32.extend_from_slice(b"user\0app\0_pq_.grease\0");
        v32.extend_from_slice(b"1\0\0");
        let n = v32.len() as u32;
        v32[..4].copy_from_slice(&n.to_be_bytes());
        let Some((Startup::Startup { mut params, minor }, _)) = read_startup(&v32, 100).unwrap()
        else {
            panic!("not a startup message")
        };
        assert_eq!(minor, 2);
        let v = negotiate(minor, &mut params).unwrap();
        assert_eq!(params, [("user".to_owned(), "app".to_owned())]);
        assert_eq!(v, b"v\0\0\0\x18\0\0\0\0\0\0\0\x01_pq_.grease\0");
        assert_eq!(
            negotiate(0, &mut params),
            None,
            "3.0, no options: nothing to say"
        );
        let v2 = [0, 0, 0, 8, 0, 2, 0, 0];
        assert!(read_startup(&v2, 100)
            .unwrap_err()
            .0
            .contains("unsupported frontend protocol 2.0"));
        assert!(read_startup(&s, 10).unwrap_err().0.contains("limit"));
    }

    /// What PostgreSQL refuses for bytes past a message's end, or for its
    /// type, is refused here too, before it reaches the server.
    #[test]
    fn frontend_messages_without_a_body_must_have_none() {
        for tag in [b'S', b'H'] {
            assert_eq!(
                parse_frontend(&msg(tag, b"")).unwrap(),
                Frontend::Other(tag)
            );
        }
        assert_eq!(parse_frontend(&msg(b'c', b"")).unwrap(), Frontend::CopyDone);
        for (tag, name) in [
            (b'S', "Sync"),
            (b'H', "Flush"),
            (b'X', "Terminate"),
            (b'c', "CopyDone"),
        ] {
            let e = parse_frontend(&msg(tag, b"x")).unwrap_err().0;
            assert_eq!(e, format!("malformed {name} message"));
        }
        assert_eq!(
            parse_frontend(&msg(b'E', b"p\0\0\0\0\0")).unwrap(),
            Frontend::Execute {
                portal: "p".into(),
                max_rows: 0
            }
        );
        assert!(parse_frontend(&msg(b'E', b"p\0\0\0\0\0\0")).is_err());
        assert!(parse_frontend(&msg(b'E', b"p\0\0\0\0")).is_err());
        assert_eq!(
            parse_frontend(&msg(b'D', b"Sstmt\0")).unwrap(),
            Frontend::Other(b'D')
        );
        assert!(parse_frontend(&msg(b'D', b"Sstmt\0x")).is_err());
        assert!(parse_frontend(&msg(b'D', b"Xstmt\0")).is_err());
        let e = parse_frontend(&msg(b'p', b"secret\0")).unwrap_err().0;
        assert!(e.contains("unsupported message type 'p'"), "{e}");
    }

    #[test]
    fn frontend_messages() {
        assert_eq!(
            parse_frontend(&msg(b'Q', b"select 1\0")).unwrap(),
            Frontend::Query("select 1".into())
        );
        let mut p = b"s1\0select $1\0".to_vec();
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&23u32.to_be_bytes());
        assert_eq!(
            parse_frontend(&msg(b'P', &p)).unwrap(),
            Frontend::Parse {
                name: "s1".into(),
                query: "select $1".into(),
                param_types: 1
            }
        );
        let mut b = b"\0s1\0".to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&2i32.to_be_bytes());
        b.extend_from_slice(b"42");
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(
            parse_frontend(&msg(b'B', &b)).unwrap(),
            Frontend::Bind {
                portal: "".into(),
                statement: "s1".into(),
                params: vec![Some(b"42".to_vec()), None]
            }
        );
        assert!(parse_frontend(&msg(b'Q', b"no terminator")).is_err());
        assert_eq!(
            parse_frontend(&msg(b'X', b"")).unwrap(),
            Frontend::Terminate
        );
        let framed = msg(b'Q', b"select 1\0");
        assert_eq!(
            read_message(&framed, 100).unwrap(),
            Some((b'Q', framed.len()))
        );
        assert!(read_message(&framed, 5).is_err());
        assert_eq!(read_message(&framed[..3], 100).unwrap(), None);
    }

    #[test]
    fn close_and_function_call() {
        assert_eq!(
            parse_frontend(&msg(b'C', b"Sstmt1\0")).unwrap(),
            Frontend::Close {
                kind: b'S',
                name: "stmt1".into()
            }
        );
        assert!(parse_frontend(&msg(b'C', b"Xstmt1\0")).is_err());
        assert!(parse_frontend(&msg(b'C', b"P")).is_err());
        // lo_open(16385, 0x60000): OID 952, one format code (binary), two
        // arguments, binary result.
        let mut body = 952u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 1, 0, 1, 0, 2]);
        body.extend_from_slice(&4i32.to_be_bytes());
        body.extend_from_slice(&16385u32.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&[0, 1]);
        assert_eq!(
            parse_frontend(&msg(b'F', &body)).unwrap(),
            Frontend::FunctionCall {
                oid: 952,
                args: vec![Some(16385u32.to_be_bytes().to_vec()), None]
            }
        );
        assert!(parse_frontend(&msg(b'F', &body[..body.len() - 1])).is_err());
        let mut long = body.clone();
        long.push(0);
        assert!(parse_frontend(&msg(b'F', &long)).is_err());
        assert!(parse_frontend(&msg(b'F', &[0, 0])).is_err());
    }

    #[test]
    fn error_responses_round_trip() {
        let e = error_response("FATAL", "57P01", "access request r1 revoked: suspicious");
        let (tag, n) = read_message(&e, 1000).unwrap().unwrap();
        assert_eq!((tag, n), (b'E', e.len()));
        assert_eq!(
            parse_error_response(&e),
            Some((
                "57P01".into(),
                "access request r1 revoked: suspicious".into()
            ))
        );
    }

    /// A server speaking the client's LATIN1 sends a Detail (or message)
    /// that is not UTF-8: the error is still read, lossily, for the audit.
    #[test]
    fn an_error_in_another_encoding_is_read_lossily() {
        let mut body = Vec::new();
        body.extend_from_slice(b"SERREUR\0C23505\0Mdouble \xab cl\xe9 \xbb\0");
        body.extend_from_slice(b"DLa cl\xe9 (nom)=(jos\xe9) existe d\xe9j\xe0.\0\0");
        let e = msg(b'E', &body);
        assert_eq!(parse_error_response(&e), None);
        let (code, message) = error_response_prefix(&e);
        assert_eq!(code, "23505");
        assert_eq!(message, "double \u{fffd} cl\u{fffd} \u{fffd}");
    }

    #[test]
    fn parameter_status_and_encodings() {
        let m = msg(b'S', b"client_encoding\0SJIS\0");
        assert_eq!(
            parse_parameter_status(&m),
            Some(("client_encoding", "SJIS"))
        );
        assert_eq!(
            parse_parameter_status(&msg(b'S', b"client_encoding\0")),
            None
        );
        for e in [
            "SJIS",
            "sjis",
            "BIG5",
            "GBK",
            "UHC",
            "GB18030",
            "JOHAB",
            "SHIFT_JIS_2004",
        ] {
            assert!(ascii_unsafe_encoding(e), "{e}");
        }
        for e in ["UTF8", "SQL_ASCII", "LATIN1", "EUC_JP", "WIN1252", ""] {
            assert!(!ascii_unsafe_encoding(e), "{e}");
        }
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = read_startup(&data, 10_000);
            let _ = read_message(&data, 10_000);
            let _ = parse_frontend(&data);
            let _ = parse_error_response(&data);
            let _ = error_response_prefix(&data);
            let _ = parse_parameter_status(&data);
        }

        #[test]
        fn a_whole_error_reads_the_same_from_its_prefix(code in "[0-9A-Z]{5}", message in "\\PC{0,40}") {
            let e = error_response("ERROR", &code, &message);
            prop_assert_eq!(parse_error_response(&e), Some((code.clone(), message.clone())));
            prop_assert_eq!(error_response_prefix(&e), (code, message));
        }

        #[test]
        fn typed_messages_never_panic(tag in prop::sample::select(vec![b'Q', b'P', b'B', b'E', b'd', b'c', b'f', b'X', b'C', b'F']),
                                      body in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = parse_frontend(&msg(tag, &body));
        }

        #[test]
        fn startup_round_trips(params in proptest::collection::vec(("[a-z_]{1,12}", "[ -~&&[^\\x00]]{0,20}"), 0..6)) {
            let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let s = startup_message(&refs);
            let (m, n) = read_startup(&s, 100_000).unwrap().unwrap();
            prop_assert_eq!(n, s.len());
            prop_assert_eq!(m, Startup::Startup { params: params.clone(), minor: 0 });
        }
    }
}
