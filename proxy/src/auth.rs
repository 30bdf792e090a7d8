//! First-factor and second-factor checks: argon2id password hashes and
//! RFC 6238 TOTP codes. Comparisons of secrets are constant-time.

use crate::error::{Error, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use ring::rand::SecureRandom;
use std::net::IpAddr;

/// Hashes a password with argon2id (the crate's default, OWASP parameters).
pub fn hash_password(password: &str, rng: &dyn SecureRandom) -> Result<String> {
    if password.len() < 8 {
        return Err(Error::BadRequest(
            "password must be at least 8 characters".into(),
        ));
    }
    if password.len() > 1024 {
        return Err(Error::BadRequest(
            "password is longer than 1024 bytes".into(),
        ));
    }
    let mut salt = [0u8; 16];
    rng.fill(&mut salt)
        .map_err(|_| Error::Internal("no randomness".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| Error::Internal(e.to_string()))?
        .to_string())
}

/// A fixed argon2id hash, verified against when the user does not exist so
/// that unknown and known users take the same time.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$kzL7vT6k8Nq0cm1OQ7bQ5n2r7B4qOdpk2mM2Ow0D3zU";

/// Verifies `password` against a stored PHC hash (constant-time inside argon2).
/// `None` runs a dummy verification and fails.
pub fn verify_password(password: &str, stored: Option<&str>) -> bool {
    let (hash, real) = match stored {
        Some(h) => (h, true),
        None => (DUMMY_HASH, false),
    };
    if password.len() > 1024 {
        return false;
    }
    let ok = PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false);
    ok && real
}

const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32 without padding.
pub fn base32_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut buf = 0u32;
    let mut bits = 0;
    for &b in data {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(B32[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(B32[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// RFC 4648 base32 decoding; case-insensitive, padding and spaces ignored.
pub fn base32_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let mut buf = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| *c != b'=' && *c != b' ') {
        let v = B32.iter().position(|x| *x == c.to_ascii_uppercase())? as u32;
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    Some(out)
}

/// TOTP time step length (RFC 6238 default).
pub const TOTP_STEP_SECS: i64 = 30;

/// The 6-digit HOTP value for `counter` (RFC 4226, HMAC-SHA1).
pub fn hotp(secret: &[u8], counter: u64) -> u32 {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = ring::hmac::sign(&key, &counter.to_be_bytes());
    let h = tag.as_ref();
    let off = (h[h.len() - 1] & 0x0f) as usize;
    let bin = (u32::from(h[off] & 0x7f) << 24)
        | (u32::from(h[off + 1]) << 16)
        | (u32::from(h[off + 2]) << 8)
        | u32::from(h[off + 3]);
    bin % 1_000_000
}

/// Checks a TOTP `code` at Unix time `now`, allowing one step of clock skew
/// either way. Returns the matching time step (to be marked used).
pub fn verify_totp(secret_b32: &str, code: &str, now: i64) -> Option<i64> {
    let secret = base32_decode(secret_b32)?;
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step = now.div_euclid(TOTP_STEP_SECS);
    let mut found = None;
    // Check every candidate so timing does not reveal which one matched.
    for s in [step - 1, step, step + 1] {
        if s < 0 {
            continue;
        }
        let expected = format!("{:06}", hotp(&secret, s as u64));
        if ring_eq(expected.as_bytes(), code.as_bytes()) && found.is_none() {
            found = Some(s);
        }
    }
    found
}

/// Constant-time equality for equal-length secrets.
pub fn ring_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new TOTP secret (160 bits, base32) and its provisioning URI.
pub fn new_totp_secret(
    user: &str,
    issuer: &str,
    rng: &dyn SecureRandom,
) -> Result<(String, String)> {
    let mut raw = [0u8; 20];
    rng.fill(&mut raw)
        .map_err(|_| Error::Internal("no randomness".into()))?;
    let secret = base32_encode(&raw);
    let uri = format!(
        "otpauth://totp/{issuer}:{user}?secret={secret}&issuer={issuer}&algorithm=SHA1&digits=6&period={TOTP_STEP_SECS}"
    );
    Ok((secret, uri))
}

/// What a failed password or code check counts against. Logins and a
/// signed-in user's break-glass codes have separate budgets, so nobody can
/// lock a user out of break-glass by failing logins in their name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guesses {
    Login,
    BreakGlass,
}

impl Guesses {
    /// The keys its failures are counted under, for the user and for the
    /// source: break-glass ones carry a prefix no user name or address has.
    pub fn keys(self, user: &str, source: IpAddr) -> (String, String) {
        let source = source_key(source);
        match self {
            Guesses::Login => (user.to_owned(), source),
            Guesses::BreakGlass => (
                format!("break-glass:{user}"),
                format!("break-glass:{source}"),
            ),
        }
    }
}

/// The key a source's failures are counted under: an IPv4 address (also
/// one mapped into IPv6), or an IPv6 address's /64, which one host
/// commonly holds whole (like fail2ban's and most rate limiters' default).
pub fn source_key(source: IpAddr) -> String {
    match source {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped().or_else(|| nat64(v6)) {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let prefix = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{prefix}/64")
            }
        },
    }
}

/// The IPv4 address inside an address of the well-known NAT64 prefix
/// `64:ff9b::/96` (RFC 6052): the client behind the gateway, counted
/// as itself, not as the gateway's /64.
fn nat64(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let o = v6.octets();
    (o[..12] == [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0])
        .then(|| std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]))
}

/// A password or code check under way: stored as a failure until it ends
/// well ([`crate::store::Store::reserve_login_attempt`]), so parallel
/// guesses, on one wicketd or on several sharing the store, count against
/// the limit before any of them is checked. A check that stops half way
/// (an error, a crash) stays a failure: fail closed.
#[must_use = "a check under way counts as a failure until it is released"]
#[derive(Debug)]
pub struct Attempt {
    pub(crate) id: String,
    pub(crate) user_key: String,
    pub(crate) source_key: String,
    /// Made past the user's limit (see
    /// [`crate::store::Reservation::PastUserLimit`]): only a second factor
    /// lets it in, and a failure is answered as the limit's refusal, with
    /// this retry-after.
    pub(crate) past_user_limit: Option<u64>,
}

/// Which rate-limit refusals get an audit event of their own. A guesser
/// over the limit is refused at every try, and an event for each would let
/// anyone, with no login, grow the audit log and hold its chain's lock. So
/// a refusal is recorded only when neither its user key nor its source key
/// had one recorded in the last [`RefusalLog::QUIET`]; the others are
/// counted under their keys, and the next recorded one for a key says how
/// many there were. (A guesser going through user names, or through
/// sources, is one event a minute.)
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// By user key (`user:`) and source key (`source:`).
    keys: std::collections::HashMap<String, Quiet>,
}

#[derive(Debug)]
struct Quiet {
    /// When a refusal under the key was last recorded.
    recorded: chrono::DateTime<chrono::Utc>,
    /// Refusals under it since then with no event of their own.
    unrecorded: u64,
}

/// What a recorded refusal says of those before it that were not.
#[derive(Debug, PartialEq, Eq)]
pub struct Unrecorded {
    /// For its user since the last event for them.
    pub for_user: u64,
    /// From its source since the last event from there.
    pub from_source: u64,
}

impl RefusalLog {
    pub const QUIET: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
    /// Keys remembered at most. Past them, those older than `QUIET` are
    /// forgotten, then the oldest (so a full table never hides a refusal
    /// under new keys); a count forgotten with its key is logged.
    const MAX_KEYS: usize = 4096;

    /// Whether to record a refusal under `user_key` and `source_key` at
    /// `now`: if so, with what it says of those not recorded before it.
    pub fn record(
        &mut self,
        user_key: &str,
        source_key: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<Unrecorded> {
        let keys = [format!("user:{user_key}"), format!("source:{source_key}")];
        let hot = |q: &Quiet| now - q.recorded < Self::QUIET;
        if keys.iter().any(|k| self.keys.get(k).is_some_and(hot)) {
            for k in &keys {
                if let Some(q) = self.keys.get_mut(k) {
                    q.unrecorded = q.unrecorded.saturating_add(1);
                }
            }
            return None;
        }
        make_room(
            &mut self.keys,
            keys.len(),
            Self::MAX_KEYS,
            |q| (q.recorded, q.unrecorded),
            now - Self::QUIET,
            "rate-limited login refusals",
        );
        let [for_user, from_source] = keys.map(|k| {
            self.keys
                .insert(
                    k,
                    Quiet {
                        recorded: now,
                        unrecorded: 0,
                    },
                )
                .map_or(0, |q| q.unrecorded)
        });
        Some(Unrecorded {
            for_user,
            from_source,
        })
    }
}

/// Makes room in `map` for `more` keys within `max`: first those last
/// recorded before `quiet_since` go, then the oldest (so a full table never
/// hides a refusal under new keys). `seen` gives an entry's last recorded
/// time and its count of refusals with no event of their own; a count
/// forgotten with its key (`what` they were) is logged, as no event will
/// carry it.
fn make_room<V>(
    map: &mut std::collections::HashMap<String, V>,
    more: usize,
    max: usize,
    seen: impl Fn(&V) -> (chrono::DateTime<chrono::Utc>, u64),
    quiet_since: chrono::DateTime<chrono::Utc>,
    what: &str,
) {
    let forgotten = |key: &str, v: &V| {
        let (_, unrecorded) = seen(v);
        if unrecorded > 0 {
            tracing::warn!(
                key,
                refusals = unrecorded,
                "{what} with no audit event of their own (folded, then forgotten)"
            );
        }
    };
    if map.len() + more > max {
        map.retain(|key, v| {
            let keep = seen(v).0 > quiet_since;
            if !keep {
                forgotten(key, v);
            }
            keep
        });
    }
    while map.len() + more > max {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| seen(v).0)
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        if let Some(v) = map.remove(&oldest) {
            forgotten(&oldest, &v);
        }
    }
}

/// Which refusals of a signed-in user's calls (a denied action, a request
/// they may not see, a request over their cap) get an audit event of their
/// own. Each is a policy decision and goes on the record, but a caller in a
/// loop must not grow the audit log and hold its chain's lock at will: per
/// user and action, the first [`DenialLog::BURST`] in a
/// [`DenialLog::WINDOW`] are recorded, the rest counted. A count is written
/// once its window is over ([`DenialLog::take_folded`], from a timer, and
/// at shutdown), or with the next recorded refusal of that user and action,
/// whichever comes first. So refusals of one action cannot hide another's,
/// and no count waits for a refusal that never comes. Per wicketd, like
/// [`RefusalLog`].
#[derive(Debug, Default)]
pub struct DenialLog {
    /// By `"{user} {action}"` (user names hold no space).
    keys: std::collections::HashMap<String, Burst>,
}

#[derive(Debug)]
struct Burst {
    /// When the window began (its first recorded refusal).
    since: chrono::DateTime<chrono::Utc>,
    /// Recorded in it so far.
    recorded: u32,
    /// Refusals with no event of their own, not yet written.
    unrecorded: u64,
}

/// A count of refusals of one user and action that had no event of their
/// own.
#[derive(Debug, PartialEq, Eq)]
pub struct Folded {
    pub user: String,
    pub action: String,
    pub count: u64,
}

impl DenialLog {
    pub const WINDOW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
    /// Recorded per user and action in a window.
    pub const BURST: u32 = 5;
    /// Keys remembered at most (as [`RefusalLog`]'s).
    const MAX_KEYS: usize = 4096;

    fn key(user: &str, action: &str) -> String {
        format!("{user} {action}")
    }

    /// Whether to record a refusal of `action` to `user` at `now`: if so,
    /// with the number of theirs before it that were not recorded (its
    /// event carries them; [`Self::give_back`] if it cannot be written).
    pub fn record(
        &mut self,
        user: &str,
        action: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<u64> {
        let key = Self::key(user, action);
        if let Some(b) = self.keys.get_mut(&key) {
            if now - b.since < Self::WINDOW {
                if b.recorded < Self::BURST {
                    b.recorded += 1;
                    return Some(std::mem::take(&mut b.unrecorded));
                }
                b.unrecorded = b.unrecorded.saturating_add(1);
                return None;
            }
        } else {
            make_room(
                &mut self.keys,
                1,
                Self::MAX_KEYS,
                |b| (b.since, b.unrecorded),
                now - Self::WINDOW,
                "refusals of signed-in users' calls",
            );
        }
        let before = self.keys.insert(
            key,
            Burst {
                since: now,
                recorded: 1,
                unrecorded: 0,
            },
        );
        Some(before.map_or(0, |b| b.unrecorded))
    }

    /// Puts back `count` refusals of `action` to `user` whose event could
    /// not be written: they are written with a later one.
    pub fn give_back(&mut self, user: &str, action: &str, count: u64) {
        let b = self.keys.entry(Self::key(user, action)).or_insert(Burst {
            // Over at once: the next sweep writes it.
            since: chrono::DateTime::<chrono::Utc>::MIN_UTC,
            recorded: 0,
            unrecorded: 0,
        });
        b.unrecorded = b.unrecorded.saturating_add(count);
    }

    /// Takes out the windows over at `now` (every one, with `all`: wicketd
    /// is stopping), with the counts that no event carried yet.
    pub fn take_folded(&mut self, now: chrono::DateTime<chrono::Utc>, all: bool) -> Vec<Folded> {
        let mut out = Vec::new();
        self.keys.retain(|key, b| {
            if !all && now - b.since < Self::WINDOW {
                return true;
            }
            if b.unrecorded > 0 {
                let (user, action) = key.split_once(' ').unwrap_or((key, ""));
                out.push(Folded {
                    user: user.to_owned(),
                    action: action.to_owned(),
                    count: b.unrecorded,
                });
            }
            false
        });
        out.sort_by(|a, b| (&a.user, &a.action).cmp(&(&b.user, &b.action)));
        out
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_refusals_is_one_event_a_minute_with_a_count() {
        let t0 = chrono::DateTime::<chrono::Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        let secs = |s: i64| t0 + chrono::TimeDelta::seconds(s);
        let said = |for_user, from_source| {
            Some(Unrecorded {
                for_user,
                from_source,
            })
        };
        let mut log = RefusalLog::default();
        assert_eq!(log.record("bob", "10.0.0.1", t0), said(0, 0));
        // The same guesser, going through user names or sources: counted,
        // each under the keys it shares with a recorded one.
        assert_eq!(log.record("bob", "10.0.0.1", secs(1)), None);
        assert_eq!(log.record("carol", "10.0.0.1", secs(2)), None);
        assert_eq!(log.record("bob", "10.0.0.2", secs(3)), None);
        // Someone else, elsewhere: recorded, with nothing of bob's.
        assert_eq!(log.record("dave", "10.0.0.9", secs(4)), said(0, 0));
        // A user named like a source is not that source.
        assert_eq!(log.record("10.0.0.9", "10.0.0.8", secs(5)), said(0, 0));
        // A minute on, one more event, with what came meanwhile.
        assert_eq!(log.record("carol", "10.0.0.1", secs(59)), None);
        // (bob: twice; 10.0.0.1: three times.)
        assert_eq!(log.record("bob", "10.0.0.1", secs(60)), said(2, 3));
        assert_eq!(log.record("erin", "10.0.0.1", secs(61)), None);
        assert_eq!(log.record("carol", "10.0.0.3", secs(62)), said(0, 0));
    }

    #[test]
    fn the_refusal_log_is_bounded_and_a_full_one_still_records_new_keys() {
        let t0 = chrono::DateTime::<chrono::Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        let mut log = RefusalLog::default();
        for i in 0..10_000 {
            let (user, source) = (format!("u{i}"), format!("s{i}"));
            assert!(log.record(&user, &source, t0).is_some(), "{i}");
            assert!(log.keys.len() <= RefusalLog::MAX_KEYS);
        }
        // The newest are remembered: they are still folded.
        assert_eq!(log.record("u9999", "elsewhere", t0), None);
        // Once the old keys are quiet, they make room.
        let later = t0 + RefusalLog::QUIET;
        assert!(log.record("new", "source", later).is_some());
        assert_eq!(log.keys.len(), 2);
    }

    #[test]
    fn a_users_refusals_past_a_burst_are_counted_and_written_once() {
        let t0 = chrono::DateTime::<chrono::Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        let secs = |s: i64| t0 + chrono::TimeDelta::seconds(s);
        let folded = |user: &str, action: &str, count| Folded {
            user: user.into(),
            action: action.into(),
            count,
        };
        let mut log = DenialLog::default();
        for i in 0..DenialLog::BURST {
            assert_eq!(log.record("ann", "audit.search", secs(i.into())), Some(0));
        }
        for i in 0..7 {
            assert_eq!(log.record("ann", "audit.search", secs(30 + i)), None);
        }
        // Another action of hers, and another user, have their own.
        assert_eq!(log.record("ann", "recordings.read", secs(31)), Some(0));
        assert_eq!(log.record("ben", "audit.search", secs(31)), Some(0));
        // Nothing is over yet.
        assert_eq!(log.take_folded(secs(59), false), []);
        // A new window: recorded, with the seven before it.
        assert_eq!(log.record("ann", "audit.search", secs(60)), Some(7));
        for i in 1..DenialLog::BURST {
            assert_eq!(log.record("ann", "audit.search", secs(60)), Some(0), "{i}");
        }
        assert_eq!(log.record("ann", "audit.search", secs(61)), None);
        assert_eq!(log.record("ann", "audit.search", secs(62)), None);
        // Its window over, the count is taken out, once.
        assert_eq!(
            log.take_folded(secs(120), false),
            [folded("ann", "audit.search", 2)]
        );
        assert_eq!(log.take_folded(secs(120), false), []);
        assert!(log.is_empty());
        // An event that could not be written gives its count back.
        assert_eq!(log.record("ben", "audit.search", secs(130)), Some(0));
        log.give_back("ben", "audit.search", 3);
        assert_eq!(log.record("ben", "audit.search", secs(131)), Some(3));
        log.give_back("cid", "request.create", 1);
        // Stopping: every count, over or not.
        assert_eq!(log.record("ben", "x", secs(132)), Some(0));
        for _ in 0..DenialLog::BURST {
            log.record("ben", "x", secs(132));
        }
        assert_eq!(
            log.take_folded(secs(133), true),
            [folded("ben", "x", 1), folded("cid", "request.create", 1)]
        );
        // Bounded; a full table still records a new key.
        for i in 0..10_000 {
            assert!(
                log.record(&format!("u{i}"), "a", secs(200)).is_some(),
                "{i}"
            );
            assert!(log.keys.len() <= DenialLog::MAX_KEYS);
        }
    }

    #[test]
    fn break_glass_codes_count_apart_from_logins() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            Guesses::Login.keys("ann", ip("10.1.2.3")),
            ("ann".into(), "10.1.2.3".into())
        );
        assert_eq!(
            Guesses::BreakGlass.keys("ann", ip("::1")),
            ("break-glass:ann".into(), "break-glass:::/64".into())
        );
    }

    #[test]
    fn an_ipv6_source_counts_by_its_64() {
        let key = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:bbbb:cc:dd:ee"), "2001:db8:1:2::/64");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("64:ff9b::c000:207"), "192.0.2.7");
        assert_eq!(key("64:ff9b::c000:208"), "192.0.2.8");
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
    }
    use proptest::prelude::*;

    #[test]
    fn rfc6238_sha1_vectors() {
        // RFC 6238 appendix B, 8-digit values truncated to the 6 low digits.
        let secret = b"12345678901234567890";
        for (t, expected) in [
            (59u64, 94_287_082u32),
            (1_111_111_109, 7_081_804),
            (1_234_567_890, 89_005_924),
            (2_000_000_000, 69_279_037),
        ] {
            assert_eq!(hotp(secret, t / 30), expected % 1_000_000, "t={t}");
        }
    }

    #[test]
    fn totp_accepts_current_and_adjacent_steps_only() {
        let secret = base32_encode(b"12345678901234567890");
        let now = 1_234_567_890;
        let code = |t: i64| format!("{:06}", hotp(b"12345678901234567890", (t / 30) as u64));
        assert_eq!(verify_totp(&secret, &code(now), now), Some(now / 30));
        assert!(verify_totp(&secret, &code(now - 30), now).is_some());
        assert!(verify_totp(&secret, &code(now + 30), now).is_some());
        assert!(verify_totp(&secret, &code(now - 90), now).is_none());
        assert!(verify_totp(&secret, "12345", now).is_none());
        assert!(verify_totp(&secret, "abcdef", now).is_none());
    }

    #[test]
    fn password_hashes_verify_and_dummy_fails() {
        let rng = ring::rand::SystemRandom::new();
        let h = hash_password("correct horse", &rng).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", Some(&h)));
        assert!(!verify_password("wrong horse", Some(&h)));
        assert!(!verify_password("correct horse", None));
        assert!(hash_password("short", &rng).is_err());
    }

    proptest! {
        #[test]
        fn base32_round_trips(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(base32_decode(&base32_encode(&data)).unwrap(), data);
        }

        #[test]
        fn base32_decode_never_panics(s in ".{0,40}") {
            let _ = base32_decode(&s);
        }
    }
}
