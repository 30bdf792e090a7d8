//! Storage: SQLite (embedded default) or PostgreSQL (several `wicketd`s),
//! through sqlx's `Any` driver so every query is written once. Times are Unix
//! milliseconds (`BIGINT`), lists are JSON text, booleans are 0/1.
//!
//! Migrations are embedded and run at start inside a transaction (on
//! PostgreSQL under an advisory lock, so proxies starting together do not race).
//! Every state change that must be atomic takes a transaction.

use crate::config::Storage;
use crate::error::{Error, Result};
use crate::ssh::recording::RecordingMeta;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};
use std::path::{Path, PathBuf};
use wicket_ca::hex;

mod groups;

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

struct Migration {
    version: i64,
    /// Statements, separated by `;`, valid on both backends.
    sql: &'static str,
    /// Then statements for one backend only, each run whole (trigger
    /// bodies hold `;`).
    sqlite: &'static [&'static str],
    postgres: &'static [&'static str],
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: r#"
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    roles TEXT NOT NULL,
    team TEXT,
    password_hash TEXT,
    totp_secret TEXT,
    totp_last_step BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    disabled BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE audit_events (
    id TEXT PRIMARY KEY,
    time BIGINT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT,
    request_id TEXT,
    session_id TEXT,
    data TEXT NOT NULL
);
CREATE INDEX audit_events_time ON audit_events (time);
CREATE INDEX audit_events_actor ON audit_events (actor);
CREATE INDEX audit_events_request ON audit_events (request_id);
CREATE TABLE login_failures (
    id TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    source TEXT NOT NULL,
    time BIGINT NOT NULL
);
CREATE INDEX login_failures_user ON login_failures (user_name, time);
CREATE INDEX login_failures_source ON login_failures (source, time)
"#,
        sqlite: &[],
        postgres: &[],
    },
    Migration {
        version: 2,
        sql: r#"
CREATE TABLE access_requests (
    id TEXT PRIMARY KEY,
    requester TEXT NOT NULL,
    state TEXT NOT NULL,
    next_deadline BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX access_requests_requester ON access_requests (requester, state);
CREATE INDEX access_requests_state ON access_requests (state);
CREATE INDEX access_requests_deadline ON access_requests (next_deadline);
CREATE TABLE notifications (
    id TEXT PRIMARY KEY,
    time BIGINT NOT NULL,
    request_id TEXT,
    recipients TEXT NOT NULL,
    subject TEXT NOT NULL,
    urgent BIGINT NOT NULL,
    delivered BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX notifications_request ON notifications (request_id)
"#,
        sqlite: &[],
        postgres: &[],
    },
    Migration {
        version: 3,
        sql: r#"
CREATE INDEX audit_events_session ON audit_events (session_id)
"#,
        sqlite: &[],
        postgres: &[],
    },
    // The audit log as a hash chain: each event's place (`seq`) and the hash
    // of its content with the previous event's hash; `audit_chain` holds the
    // head (a one-row table whose row lock serializes appends).
    Migration {
        version: 4,
        sql: r#"
ALTER TABLE audit_events ADD COLUMN seq BIGINT;
ALTER TABLE audit_events ADD COLUMN hash TEXT;
CREATE UNIQUE INDEX audit_events_seq ON audit_events (seq);
CREATE TABLE audit_chain (id BIGINT PRIMARY KEY, seq BIGINT NOT NULL, hash TEXT NOT NULL);
INSERT INTO audit_chain (id, seq, hash) VALUES (1, 0, '')
"#,
        sqlite: &[],
        postgres: &[],
    },
    // A feed of changes to users and requests, for the in-memory index each
    // wicketd keeps: every change takes the next `change_feed.seq` (a row
    // lock held to commit, so the order of the numbers is the order of the
    // commits) and stamps it on the changed row.
    Migration {
        version: 5,
        sql: r#"
ALTER TABLE users ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE access_requests ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX users_change ON users (change_seq);
CREATE INDEX access_requests_change ON access_requests (change_seq);
CREATE TABLE change_feed (id BIGINT PRIMARY KEY, seq BIGINT NOT NULL);
INSERT INTO change_feed (id, seq) VALUES (1, 0)
"#,
        sqlite: &[],
        postgres: &[],
    },
    // Writes that bypass wicketd (SQL by hand, a tool) still reach every
    // grant index: a trigger stamps a change to a user or a request that
    // did not take a feed number itself, and deleting or renaming users or
    // requests is refused (users are disabled, requests end; a row gone
    // from under its name could not be told to the indexes).
    Migration {
        version: 6,
        sql: "",
        sqlite: &[
            r#"CREATE TRIGGER users_feed_insert AFTER INSERT ON users FOR EACH ROW WHEN NEW.change_seq = 0
BEGIN
    UPDATE change_feed SET seq = seq + 1 WHERE id = 1;
    UPDATE users SET change_seq = (SELECT seq FROM change_feed WHERE id = 1) WHERE name = NEW.name;
END"#,
            r#"CREATE TRIGGER users_feed_update AFTER UPDATE ON users FOR EACH ROW
WHEN NEW.change_seq = OLD.change_seq AND (NEW.name IS NOT OLD.name OR NEW.roles IS NOT OLD.roles
    OR NEW.team IS NOT OLD.team OR NEW.password_hash IS NOT OLD.password_hash
    OR NEW.totp_secret IS NOT OLD.totp_secret OR NEW.created_at IS NOT OLD.created_at
    OR NEW.disabled IS NOT OLD.disabled)
BEGIN
    UPDATE change_feed SET seq = seq + 1 WHERE id = 1;
    UPDATE users SET change_seq = (SELECT seq FROM change_feed WHERE id = 1) WHERE name = NEW.name;
END"#,
            r#"CREATE TRIGGER access_requests_feed_insert AFTER INSERT ON access_requests FOR EACH ROW
WHEN NEW.change_seq = 0
BEGIN
    UPDATE change_feed SET seq = seq + 1 WHERE id = 1;
    UPDATE access_requests SET change_seq = (SELECT seq FROM change_feed WHERE id = 1) WHERE id = NEW.id;
END"#,
            r#"CREATE TRIGGER access_requests_feed_update AFTER UPDATE ON access_requests FOR EACH ROW
WHEN NEW.change_seq = OLD.change_seq
BEGIN
    UPDATE change_feed SET seq = seq + 1 WHERE id = 1;
    UPDATE access_requests SET change_seq = (SELECT seq FROM change_feed WHERE id = 1) WHERE id = NEW.id;
END"#,
            r#"CREATE TRIGGER users_no_delete BEFORE DELETE ON users
BEGIN
    SELECT RAISE(ABORT, 'wicket: users are not deleted; disable them (wicketd users disable)');
END"#,
            r#"CREATE TRIGGER access_requests_no_delete BEFORE DELETE ON access_requests
BEGIN
    SELECT RAISE(ABORT, 'wicket: access requests are not deleted; revoke them');
END"#,
            r#"CREATE TRIGGER users_no_rename BEFORE UPDATE OF name ON users WHEN NEW.name IS NOT OLD.name
BEGIN
    SELECT RAISE(ABORT, 'wicket: users are not renamed; add a new user and disable the old one');
END"#,
            r#"CREATE TRIGGER access_requests_no_rename BEFORE UPDATE OF id ON access_requests
WHEN NEW.id IS NOT OLD.id
BEGIN
    SELECT RAISE(ABORT, 'wicket: access requests keep their ID');
END"#,
        ],
        postgres: &[
            r#"CREATE FUNCTION wicket_change_stamp() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE change_feed SET seq = seq + 1 WHERE id = 1 RETURNING seq INTO NEW.change_seq;
    RETURN NEW;
END $$"#,
            r#"CREATE FUNCTION wicket_refuse() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    RAISE EXCEPTION 'wicket: %', TG_ARGV[0];
END $$"#,
            "CREATE TRIGGER users_feed_insert BEFORE INSERT ON users FOR EACH ROW \
             WHEN (NEW.change_seq = 0) EXECUTE FUNCTION wicket_change_stamp()",
            "CREATE TRIGGER users_feed_update BEFORE UPDATE ON users FOR EACH ROW \
             WHEN (NEW.change_seq = OLD.change_seq AND \
             (NEW.name, NEW.roles, NEW.team, NEW.password_hash, NEW.totp_secret, NEW.created_at, NEW.disabled) \
             IS DISTINCT FROM \
             (OLD.name, OLD.roles, OLD.team, OLD.password_hash, OLD.totp_secret, OLD.created_at, OLD.disabled)) \
             EXECUTE FUNCTION wicket_change_stamp()",
            "CREATE TRIGGER access_requests_feed_insert BEFORE INSERT ON access_requests FOR EACH ROW \
             WHEN (NEW.change_seq = 0) EXECUTE FUNCTION wicket_change_stamp()",
            "CREATE TRIGGER access_requests_feed_update BEFORE UPDATE ON access_requests FOR EACH ROW \
             WHEN (NEW.change_seq = OLD.change_seq) EXECUTE FUNCTION wicket_change_stamp()",
            "CREATE TRIGGER users_no_delete BEFORE DELETE ON users FOR EACH ROW \
             EXECUTE FUNCTION wicket_refuse('users are not deleted; disable them (wicketd users disable)')",
            "CREATE TRIGGER access_requests_no_delete BEFORE DELETE ON access_requests FOR EACH ROW \
             EXECUTE FUNCTION wicket_refuse('access requests are not deleted; revoke them')",
            // TRUNCATE fires no row trigger.
            "CREATE TRIGGER users_no_truncate BEFORE TRUNCATE ON users FOR EACH STATEMENT \
             EXECUTE FUNCTION wicket_refuse('users are not deleted; disable them (wicketd users disable)')",
            "CREATE TRIGGER access_requests_no_truncate BEFORE TRUNCATE ON access_requests FOR EACH STATEMENT \
             EXECUTE FUNCTION wicket_refuse('access requests are not deleted; revoke them')",
            "CREATE TRIGGER users_no_rename BEFORE UPDATE OF name ON users FOR EACH ROW \
             WHEN (NEW.name IS DISTINCT FROM OLD.name) \
             EXECUTE FUNCTION wicket_refuse('users are not renamed; add a new user and disable the old one')",
            "CREATE TRIGGER access_requests_no_rename BEFORE UPDATE OF id ON access_requests FOR EACH ROW \
             WHEN (NEW.id IS DISTINCT FROM OLD.id) \
             EXECUTE FUNCTION wicket_refuse('access requests keep their ID')",
        ],
    },
    // The PostgreSQL cancel keys the proxy hands to clients, with the
    // backend's own key each stands for: a CancelRequest that reaches
    // another wicketd sharing the store still finds its backend. (Written
    // only when the store is shared; a row lives as long as its session.)
    Migration {
        version: 7,
        sql: r#"
CREATE TABLE pg_cancel_keys (
    pid BIGINT NOT NULL,
    secret BIGINT NOT NULL,
    user_name TEXT NOT NULL,
    resource TEXT NOT NULL,
    db_user TEXT NOT NULL,
    backend_pid BIGINT NOT NULL,
    backend_secret BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (pid, secret)
);
CREATE INDEX pg_cancel_keys_created ON pg_cancel_keys (created_at)
"#,
        sqlite: &[],
        postgres: &[],
    },
    // Ended SSH session recordings, copied from the recording wicketd's
    // data directory so that every wicketd sharing the store lists and
    // plays them. (Written only when the store is shared.)
    Migration {
        version: 8,
        sql: "",
        sqlite: &[
            "CREATE TABLE session_recordings (session_id TEXT PRIMARY KEY, user_name TEXT NOT NULL, \
             node TEXT NOT NULL, login TEXT NOT NULL, request_ids TEXT NOT NULL, started BIGINT NOT NULL, \
             size BIGINT NOT NULL, data BLOB NOT NULL)",
            "CREATE INDEX session_recordings_started ON session_recordings (started)",
        ],
        postgres: &[
            "CREATE TABLE session_recordings (session_id TEXT PRIMARY KEY, user_name TEXT NOT NULL, \
             node TEXT NOT NULL, login TEXT NOT NULL, request_ids TEXT NOT NULL, started BIGINT NOT NULL, \
             size BIGINT NOT NULL, data BYTEA NOT NULL)",
            "CREATE INDEX session_recordings_started ON session_recordings (started)",
        ],
    },
    // How many actions taken under a grant each audit row stands for (a
    // row of session events holds many; see `groups`), so counting them
    // reads no JSON. NULL (rows from before, or from an older wicketd still
    // running) means: one if its kind is in `audit::SESSION_ACTION_KINDS`.
    Migration {
        version: 9,
        sql: r#"
ALTER TABLE audit_events ADD COLUMN actions BIGINT
"#,
        sqlite: &[],
        postgres: &[],
    },
    // The chain's links become keyed ([`ChainKey`]): when this runs, every
    // link is checked as it was (SHA-256) and hashed again with the key;
    // what the check found is kept in `keyed_problems`, and every later
    // verification reports it. `key_id` names the key, so a wicketd with
    // another CA key set is refused instead of breaking the chain.
    Migration {
        version: 10,
        sql: r#"
ALTER TABLE audit_chain ADD COLUMN key_id TEXT;
ALTER TABLE audit_chain ADD COLUMN keyed_problems TEXT
"#,
        sqlite: &[],
        postgres: &[],
    },
    // A password or code check under way is stored as a failure until it
    // ends well (`pending` = 1 until then), so every wicketd sharing the
    // store counts it ([`Store::reserve_login_attempt`]).
    Migration {
        version: 11,
        sql: r#"
ALTER TABLE login_failures ADD COLUMN pending BIGINT NOT NULL DEFAULT 0
"#,
        sqlite: &[],
        postgres: &[],
    },
    // A successful login forgets the user's failures from its own source,
    // and stops counting those from other sources against the user
    // (`user_cleared` = 1) while they still count against their source
    // ([`Store::clear_login_failures`]).
    Migration {
        version: 12,
        sql: r#"
ALTER TABLE login_failures ADD COLUMN user_cleared BIGINT NOT NULL DEFAULT 0
"#,
        sqlite: &[],
        postgres: &[],
    },
    // When a stored recording was stored (Unix seconds; its session had
    // just ended), for `session.recording_retention`. Rows stored before
    // say 0: their sessions ended long ago.
    Migration {
        version: 13,
        sql: r#"
ALTER TABLE session_recordings ADD COLUMN stored BIGINT NOT NULL DEFAULT 0
"#,
        sqlite: &[],
        postgres: &[],
    },
    // The CA key set the store's wicketds use, CA by CA (see
    // [`Store::check_key_set`]).
    Migration {
        version: 14,
        sql: r#"
CREATE TABLE ca_key_set (
    name TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL
)
"#,
        sqlite: &[],
        postgres: &[],
    },
    // Whether a request awaits a review (pending, needs-info, or a
    // break-glass grant nobody acknowledged), so reviewers' listing reads
    // those, not the newest requests of any state. Rows from before are
    // marked by their state and document (a break-glass one with no
    // acknowledgement); the listing's policy check decides the rest.
    Migration {
        version: 15,
        sql: r#"
ALTER TABLE access_requests ADD COLUMN awaiting_review BIGINT NOT NULL DEFAULT 0;
UPDATE access_requests SET awaiting_review = 1 WHERE state IN ('pending', 'needs-info') OR (doc LIKE '%"break_glass":true%' AND doc NOT LIKE '%"verdict":"acknowledge"%');
CREATE INDEX access_requests_awaiting ON access_requests (awaiting_review, created_at)
"#,
        sqlite: &[],
        postgres: &[],
    },
    // The requests a session stands on past the first (whose ID is in its
    // events' `request_id`), so a search or count by request finds the
    // events of every session it allowed. Written with the session's
    // `session_started`; sessions from before are found from theirs when
    // this runs ([`requests_from_events`]).
    Migration {
        version: 16,
        sql: r#"
CREATE TABLE session_requests (
    request_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    PRIMARY KEY (request_id, session_id)
)
"#,
        sqlite: &[],
        postgres: &[],
    },
    // Recordings stored in parts (`session_recording_parts`, numbered from
    // 0), so that one of any size is copied to the store, and sent from
    // it, a part at a time. `parts` 0: the whole file is in `data` (rows
    // from before, each at most 64 MiB).
    Migration {
        version: 17,
        sql: "ALTER TABLE session_recordings ADD COLUMN parts BIGINT NOT NULL DEFAULT 0",
        sqlite: &["CREATE TABLE session_recording_parts (session_id TEXT NOT NULL, \
             part BIGINT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (session_id, part))"],
        postgres: &["CREATE TABLE session_recording_parts (session_id TEXT NOT NULL, \
             part BIGINT NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (session_id, part))"],
    },
    // The requests past the first named by an event that is not a session's
    // (a login carrying several grants, a session refused under several),
    // so a search by any of them finds it, as `session_requests` does for
    // sessions. Written with the event ([`MANY_REQUEST_KINDS`]); events
    // from before are found when this runs ([`requests_from_events`]).
    Migration {
        version: 18,
        sql: r#"
CREATE TABLE event_requests (
    request_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (request_id, event_id)
)
"#,
        sqlite: &[],
        postgres: &[],
    },
    // Listings read requests newest first, page after page from a
    // (created_at, id): in the index's order, not by sorting the table
    // for each page.
    Migration {
        version: 19,
        sql: "CREATE INDEX access_requests_created ON access_requests (created_at DESC, id)",
        sqlite: &[],
        postgres: &[],
    },
    // TOTP secrets are stored sealed with a key from the CA key set
    // ([`ChainKey::seal_secret`]); those stored before are sealed when
    // this runs ([`seal_totp_secrets`]).
    Migration {
        version: 20,
        sql: "",
        sqlite: &[],
        postgres: &[],
    },
];

/// The migration that seals stored TOTP secrets.
const SEAL_MIGRATION: i64 = 20;

/// How a sealed TOTP secret starts (then hex: nonce, ciphertext, tag).
const SEALED: &str = "sealed1:";

/// The migration whose sessions [`requests_from_events`] finds.
const SESSION_REQUESTS_MIGRATION: i64 = 16;
/// The migration whose events [`requests_from_events`] finds.
const EVENT_REQUESTS_MIGRATION: i64 = 18;
/// The kinds of events outside a session that may name several requests
/// (`request_ids`); the first is their `request_id`, the others are in
/// `event_requests`.
const MANY_REQUEST_KINDS: [&str; 2] = ["login_succeeded", "session_denied"];

/// What a wicketd from before schema 17, still running beside newer ones
/// on a shared store, reads as the file of a recording stored in parts: a
/// recording that says so (not an empty file that passes for one).
fn parts_placeholder(meta: &RecordingMeta) -> Vec<u8> {
    let header = serde_json::json!({
        "version": 2, "width": 80, "height": 24, "timestamp": meta.started, "wicket": meta,
    });
    let line = serde_json::json!([
        0.0,
        "o",
        "wicket: this recording is stored in parts (store schema 17): play it through an upgraded wicketd\r\n"
    ]);
    format!("{header}\n{line}\n").into_bytes()
}

/// The size of a stored recording's parts (see [`Store::put_recording`]):
/// what one copy to the store, or one download from it, holds in memory.
pub const RECORDING_PART: usize = 8 << 20;

/// The migration that keys the audit chain (see [`key_chain`]).
const KEY_MIGRATION: i64 = 10;

/// In the CA key set's directory: this key set keyed an audit chain.
pub const KEYED_MARKER: &str = "audit_chain_keyed";

/// In the CA key set's directory: the newest audit chain head this host's
/// wicketd saw (`<seq> <link hash>`), so removing the newest events and
/// moving the head back is found ([`Store::note_chain_head`]).
pub const SEEN_FILE: &str = "audit_chain_seen";

/// The migration that starts the audit chain; events stored before it are
/// chained when it runs.
const CHAIN_MIGRATION: i64 = 4;

/// A password or code check takes well under this (argon2id, a few store
/// round trips); one pending longer was abandoned.
const ABANDONED_MS: i64 = 30_000;

/// The PostgreSQL advisory lock for a login failure key: the first eight
/// bytes of its SHA-256.
pub fn login_lock(key: &str) -> i64 {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    i64::from_be_bytes(b)
}

/// What [`Store::reserve_login_attempt`] found.
#[derive(Debug)]
pub enum Reservation {
    /// Stored as a check under way, by this ID: it may go ahead.
    Granted(String),
    /// Over the user's limit alone, and asked for: stored as a check under
    /// way, by this ID, that may let in only a login with a second factor
    /// (else it is refused as [`Reservation::Refused`] would be, with this
    /// `oldest_failure_ms`).
    PastUserLimit {
        id: String,
        oldest_failure_ms: Option<i64>,
    },
    /// Over a limit. When ended failures alone reach it (not only checks
    /// under way, which end in moments), the time of the oldest of them in
    /// the window, for the retry-after: of the later key's if both are over.
    Refused { oldest_failure_ms: Option<i64> },
}

/// What [`Store::changes`] returns: the feed's head, and each changed user
/// and request by key, decoded or not.
#[derive(Debug)]
pub struct Changes {
    pub head: i64,
    pub users: Vec<(String, Result<UserRecord>)>,
    pub requests: Vec<Changed<StoredRequest>>,
}

/// A changed row: its key, the number of its last change, and the row
/// (`Err` when it does not decode).
#[derive(Debug)]
pub struct Changed<T> {
    pub key: String,
    pub seq: i64,
    pub row: Result<T>,
}

/// Takes the change feed's next number. The row stays locked until the
/// transaction ends, so numbers are taken in commit order across every
/// wicketd sharing the store. Taken before the audit chain's lock (one
/// order, no deadlock).
async fn next_change(tx: &mut Transaction<'static, Any>) -> Result<i64> {
    Ok(
        sqlx::query("UPDATE change_feed SET seq = seq + 1 WHERE id = 1 RETURNING seq")
            .fetch_one(&mut **tx)
            .await?
            .try_get(0)?,
    )
}

/// Audit events under request `$1`: those naming it first, those of the
/// sessions that stood on it among other requests ([`session_requests`]),
/// and the other events that named it among others ([`event_requests`]).
///
/// [`session_requests`]: SESSION_REQUESTS_MIGRATION
/// [`event_requests`]: EVENT_REQUESTS_MIGRATION
const BY_REQUEST: &str = "(request_id = $1 OR session_id IN (SELECT session_id FROM session_requests WHERE request_id = $1) \
     OR id IN (SELECT event_id FROM event_requests WHERE request_id = $1))";

/// Counts one requester's requests awaiting review (`$1`: the requester).
const AWAITING_REVIEW: &str =
    "SELECT COUNT(*) FROM access_requests WHERE requester = $1 AND state IN ('pending', 'needs-info')";

/// A user as stored. Its `Debug` leaves the password hash and TOTP secret
/// out.
#[derive(Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub roles: Vec<String>,
    pub team: Option<String>,
    /// PHC string (argon2id); never logged.
    pub password_hash: Option<String>,
    /// Base32 TOTP secret; never logged.
    pub totp_secret: Option<String>,
    pub created_at: i64,
    pub disabled: bool,
}

/// A user row that does not decode (edited by hand): its name, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableUser {
    pub name: String,
    pub reason: String,
}

/// A user's record as a decision read it: what a write made on that
/// decision checks is still so (see [`Store::update_request`]).
#[derive(Debug, Clone, Copy)]
pub struct AsRead<'a> {
    pub name: &'a str,
    pub roles: &'a [String],
    pub team: Option<&'a str>,
}

impl<'a> From<&'a UserRecord> for AsRead<'a> {
    fn from(u: &'a UserRecord) -> Self {
        AsRead {
            name: &u.name,
            roles: &u.roles,
            team: u.team.as_deref(),
        }
    }
}

impl AsRead<'_> {
    /// Inside a writing transaction that took the change feed: a conflict
    /// unless the user's row still says what was read (and is enabled).
    async fn still_so(&self, tx: &mut Transaction<'static, Any>) -> Result<()> {
        let row = sqlx::query("SELECT roles, team, disabled FROM users WHERE name = $1")
            .bind(self.name)
            .fetch_optional(&mut **tx)
            .await?;
        let unchanged = match row {
            Some(r) => {
                r.try_get::<i64, _>(2)? == 0
                    && r.try_get::<Option<String>, _>(1)?.as_deref() == self.team
                    && parse_list("roles", &r.try_get::<String, _>(0)?)
                        .is_ok_and(|now| now == self.roles)
            }
            None => false,
        };
        if unchanged {
            return Ok(());
        }
        Err(Error::Conflict(format!(
            "{}'s account changed (roles, team, or disabled) while this was decided; \
             nothing was done: try again",
            self.name
        )))
    }
}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: &Option<String>| if v.is_some() { "<set>" } else { "<none>" };
        f.debug_struct("UserRecord")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field("team", &self.team)
            .field("password_hash", &set(&self.password_hash))
            .field("totp_secret", &set(&self.totp_secret))
            .field("created_at", &self.created_at)
            .field("disabled", &self.disabled)
            .finish()
    }
}

/// An audit event as stored: typed `kind`, JSON `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: String,
    pub time_ms: i64,
    pub kind: String,
    pub actor: Option<String>,
    pub request_id: Option<String>,
    pub session_id: Option<String>,
    pub data: String,
}

/// Filters for audit search; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub kind: Option<String>,
    pub request_id: Option<String>,
    pub session_id: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: i64,
}

/// The storage handle: cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    chain: ChainKey,
    /// This host's record of the newest chain head it saw ([`SEEN_FILE`]).
    seen: std::sync::Arc<PathBuf>,
    /// Held by the one [`Store::verify_audit`] running.
    verifying: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("chain", &self.chain)
            .finish()
    }
}

/// The store's keys, derived from the CA key set
/// ([`wicket_ca::AuthorityKeys::audit_chain_secret`]). The audit chain's
/// links (HMAC-SHA256): someone who can write the store but cannot read the
/// CA keys cannot make a changed, removed or inserted event fit the chain
/// again. Its `id` (a tag, not the key) is stored with the chain. And the
/// seal of stored TOTP secrets (AES-256-GCM): a copy of the database alone
/// (a backup) does not give them. `Debug` shows only the id.
#[derive(Clone)]
pub struct ChainKey {
    keys: std::sync::Arc<StoreKeys>,
    id: String,
}

struct StoreKeys {
    mac: ring::hmac::Key,
    seal: ring::aead::LessSafeKey,
}

impl ChainKey {
    pub fn new(secret: &wicket_ca::DerivedSecret) -> Self {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let tag = ring::hmac::sign(&key, b"wicket audit chain key id");
        let seal = ring::hmac::sign(&key, b"wicket totp seal key v1");
        let seal = match ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, seal.as_ref()) {
            Ok(k) => k,
            // AES-256 takes the 32 bytes HMAC-SHA256 gives.
            Err(_) => unreachable!("an HMAC-SHA256 tag is an AES-256 key"),
        };
        Self {
            id: hex(&tag.as_ref()[..8]),
            keys: std::sync::Arc::new(StoreKeys {
                mac: key,
                seal: ring::aead::LessSafeKey::new(seal),
            }),
        }
    }

    /// `secret` (user `name`'s TOTP secret) sealed for the store: a random
    /// nonce, the name bound as associated data (a sealed secret moved to
    /// another user's row does not open).
    pub fn seal_secret(&self, name: &str, secret: &str) -> Result<String> {
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| Error::Internal("no randomness for a seal".into()))?;
        let mut data = secret.as_bytes().to_vec();
        self.keys
            .seal
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(name.as_bytes()),
                &mut data,
            )
            .map_err(|_| Error::Internal("sealing a TOTP secret failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{SEALED}{}", hex(&out)))
    }

    /// Opens what [`Self::seal_secret`] sealed for `name`. Anything else
    /// (a clear secret, another key's or another user's seal) is an error:
    /// the row does not decode.
    pub fn open_secret(&self, name: &str, stored: &str) -> Result<String> {
        let bad = |why: &str| Error::Store(format!("column totp_secret {why}"));
        let hexed = stored
            .strip_prefix(SEALED)
            .ok_or_else(|| bad("is not sealed"))?;
        let bytes = unhex(hexed).ok_or_else(|| bad("is not a seal"))?;
        if bytes.len() < ring::aead::NONCE_LEN {
            return Err(bad("is not a seal"));
        }
        let (nonce, sealed) = bytes.split_at(ring::aead::NONCE_LEN);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| bad("is not a seal"))?;
        let mut data = sealed.to_vec();
        let plain = self
            .keys
            .seal
            .open_in_place(nonce, ring::aead::Aad::from(name.as_bytes()), &mut data)
            .map_err(|_| {
                bad("does not open with this CA key set (sealed by another, for another user, or changed)")
            })?;
        String::from_utf8(plain.to_vec()).map_err(|_| bad("is not text"))
    }

    /// The key for the CA key set `keys`.
    pub fn from_authority(keys: &wicket_ca::AuthorityKeys) -> Self {
        Self::new(&keys.audit_chain_secret())
    }

    /// Names the key; safe to show.
    pub fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
impl ChainKey {
    /// A key from a fresh CA key set.
    pub(crate) fn for_tests() -> Self {
        let rng = ring::rand::SystemRandom::new();
        match wicket_ca::AuthorityKeys::generate("test", 1_700_000_000, &rng) {
            Ok((keys, _)) => Self::from_authority(&keys),
            Err(e) => panic!("test CA: {e}"),
        }
    }
}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainKey").field("id", &self.id).finish()
    }
}

fn json_list(v: &[String]) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))
}

/// A list column (JSON), named `column` in the error.
fn parse_list(column: &str, s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s)
        .map_err(|e| Error::Store(format!("column {column} is not a JSON list: {e}")))
}

impl Store {
    /// Opens (creating if needed) the store and runs migrations. Audit
    /// events are chained with `chain`; a store whose chain has another
    /// key (another CA key set) is refused.
    pub async fn open(storage: &Storage, data_dir: &Path, chain: ChainKey) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (url, backend) = match storage {
            Storage::Sqlite => {
                crate::keystore::ensure_private_dir(data_dir)?;
                let path = data_dir.join("wicket.db");
                let path = path
                    .to_str()
                    .ok_or_else(|| Error::Io("data directory path is not UTF-8".into()))?;
                (format!("sqlite://{path}?mode=rwc"), Backend::Sqlite)
            }
            Storage::Postgres(url) => (url.clone(), Backend::Postgres),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 16 })
            // A local file needs no liveness check on every acquire (each is
            // a round trip to the connection's worker thread); sqlx still
            // checks each connection when it goes back to the pool.
            .test_before_acquire(backend == Backend::Postgres)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA busy_timeout = 5000",
                            "PRAGMA foreign_keys = ON",
                            // Every commit synced: with WAL's NORMAL, a
                            // revoke answered as done (or a used TOTP step)
                            // could come back after a power loss.
                            "PRAGMA synchronous = FULL",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| Error::Store(format!("cannot open {}: {e}", describe(storage))))?;
        let store = Self {
            pool,
            backend,
            chain,
            seen: std::sync::Arc::new(data_dir.join("ca").join(SEEN_FILE)),
            verifying: Default::default(),
        };
        store
            .migrate(&data_dir.join("ca").join(KEYED_MARKER))
            .await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether several wicketds may share this store (PostgreSQL): state
    /// one wicketd keeps for the others (cancel keys, recordings) goes
    /// here then.
    pub fn is_shared(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// Runs the migrations not applied yet. `marker` is the file that says
    /// this CA key set keyed a chain before ([`key_chain`]).
    async fn migrate(&self, marker: &Path) -> Result<()> {
        let mut tx = self.begin().await?;
        if self.backend == Backend::Postgres {
            // One migrator at a time across every wicketd sharing this database.
            sqlx::query("SELECT pg_advisory_xact_lock(7305818)")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let mut keyed = None;
        let applied: Vec<i64> = sqlx::query("SELECT version FROM schema_migrations")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<std::result::Result<_, _>>()?;
        let known = MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0);
        if let Some(newer) = applied.iter().copied().filter(|v| *v > known).max() {
            // An older wicketd would write without what newer schemas need
            // (e.g. the change feed the grant index follows).
            return Err(Error::Store(format!(
                "the database's schema is at version {newer}, newer than this wicketd knows ({known}); run the newer wicketd"
            )));
        }
        for m in MIGRATIONS {
            if applied.contains(&m.version) {
                continue;
            }
            let whole = match self.backend {
                Backend::Sqlite => m.sqlite,
                Backend::Postgres => m.postgres,
            };
            let split = m.sql.split(';').map(str::trim).filter(|s| !s.is_empty());
            for stmt in split.chain(whole.iter().copied()) {
                sqlx::query(stmt)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| Error::Store(format!("migration {} failed: {e}", m.version)))?;
            }
            if m.version == CHAIN_MIGRATION {
                chain_existing(&mut tx).await?;
            }
            if m.version == KEY_MIGRATION {
                keyed = Some(key_chain(&mut tx, self.backend, &self.chain, marker).await?);
            }
            if m.version == SESSION_REQUESTS_MIGRATION {
                requests_from_events(&mut tx, Noted::Session).await?;
            }
            if m.version == EVENT_REQUESTS_MIGRATION {
                requests_from_events(&mut tx, Noted::Event).await?;
            }
            if m.version == SEAL_MIGRATION {
                seal_totp_secrets(&mut tx, &self.chain).await?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(m.version)
                .bind(crate::clock::now_ms())
                .execute(&mut *tx)
                .await?;
        }
        let key_id: Option<String> = sqlx::query("SELECT key_id FROM audit_chain WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if key_id.as_deref() != Some(self.chain.id()) {
            return Err(Error::Store(format!(
                "the audit chain is keyed with key id {}, and this wicketd's CA key set gives {}: every wicketd sharing a store needs the same CA key set (copy <data_dir>/ca from the first)",
                key_id.as_deref().unwrap_or("(none: changed outside wicketd)"),
                self.chain.id()
            )));
        }
        tx.commit().await?;
        if let Some(k) = keyed {
            // Outside the store: keying again means it was rolled back.
            let text = format!(
                "key id {}: the audit chain of this store was keyed at {} ({} events, {} problems found in the links before); a wicketd with this CA key set refuses to key a non-empty chain again\n",
                self.chain.id(),
                chrono::DateTime::<chrono::Utc>::from_timestamp_millis(crate::clock::now_ms())
                    .unwrap_or_default()
                    .to_rfc3339(),
                k.events,
                k.problems
            );
            if let Err(e) = crate::keystore::write_file_atomic(marker, text.as_bytes(), 0o600) {
                tracing::error!(error = %e, path = %marker.display(), "cannot write the audit chain's keying marker");
            }
            tracing::warn!(
                events = k.events,
                problems = k.problems,
                head = %k.head,
                "keyed the audit chain (schema 10)"
            );
        }
        Ok(())
    }

    /// Refuses a CA key set that differs, CA by CA, from the one the
    /// store's wicketds use; a CA the store has not seen yet (the first
    /// start, or a CA a newer version added) is recorded. So a wicketd that
    /// made its own CA, where it should have copied the first one's `ca/`,
    /// does not start (users would trust one wicketd and not another).
    pub async fn check_key_set(&self, cas: &[(&str, String)]) -> Result<()> {
        let mut tx = self.begin().await?;
        for (name, fingerprint) in cas {
            sqlx::query(
                "INSERT INTO ca_key_set (name, fingerprint) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            )
            .bind(*name)
            .bind(fingerprint)
            .execute(&mut *tx)
            .await?;
            let stored: String = sqlx::query("SELECT fingerprint FROM ca_key_set WHERE name = $1")
                .bind(*name)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            if &stored != fingerprint {
                return Err(Error::Store(format!(
                    "this wicketd's {name} CA ({fingerprint}) is not the one the store's other wicketds use ({stored}): every wicketd sharing a store needs the same CA key set (copy <data_dir>/ca from the first)"
                )));
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The highest applied migration.
    pub async fn schema_version(&self) -> Result<i64> {
        let row = sqlx::query("SELECT MAX(version) FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>(0)?.unwrap_or(0))
    }

    /// A transaction. On SQLite it takes the write lock at once (`BEGIN
    /// IMMEDIATE`, waiting up to the busy timeout): a deferred one that read
    /// and then wrote would fail at once (SQLITE_BUSY_SNAPSHOT, which no
    /// busy timeout waits out) whenever another connection or process,
    /// `wicketd users add` say, wrote in between.
    pub async fn begin(&self) -> Result<Transaction<'static, Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// A transaction that only reads (one moment's view): on SQLite it takes
    /// no write lock, so writers go on while it reads. Never write in it.
    async fn begin_read(&self) -> Result<Transaction<'static, Any>> {
        Ok(self.pool.begin().await?)
    }

    // ---- users -------------------------------------------------------------

    /// Creates a user and its audit event in one transaction.
    pub async fn create_user(&self, user: &UserRecord, event: &AuditRow) -> Result<()> {
        let mut tx = self.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM users WHERE name = $1")
            .bind(&user.name)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(Error::Conflict(format!(
                "user {:?} already exists",
                user.name
            )));
        }
        let change = next_change(&mut tx).await?;
        sqlx::query(
            "INSERT INTO users (name, roles, team, password_hash, totp_secret, created_at, disabled, change_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&user.name)
        .bind(json_list(&user.roles)?)
        .bind(&user.team)
        .bind(&user.password_hash)
        .bind(
            user.totp_secret
                .as_deref()
                .map(|t| self.chain.seal_secret(&user.name, t))
                .transpose()?,
        )
        .bind(user.created_at)
        .bind(i64::from(user.disabled))
        .bind(change)
        .execute(&mut *tx)
        .await?;
        self.audit_in(&mut tx, std::slice::from_ref(event)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Disables or re-enables a user, with its audit event, in one
    /// transaction. Unknown users are an error.
    pub async fn set_user_disabled(
        &self,
        name: &str,
        disabled: bool,
        event: &AuditRow,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        let change = next_change(&mut tx).await?;
        let done = sqlx::query("UPDATE users SET disabled = $1, change_seq = $3 WHERE name = $2")
            .bind(i64::from(disabled))
            .bind(name)
            .bind(change)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound(format!("no user {name:?}")));
        }
        self.audit_in(&mut tx, std::slice::from_ref(event)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Lets `name` log in again past the failed logins in their name: the
    /// ended ones no longer count against the user (as after a login), and
    /// still count against their sources. Returns how many, with the
    /// audit event `event` makes of that, in one transaction. Unknown
    /// users are an error.
    pub async fn unlock_user(
        &self,
        name: &str,
        now_ms: i64,
        event: impl FnOnce(u64) -> AuditRow,
    ) -> Result<u64> {
        let mut tx = self.begin().await?;
        let known = sqlx::query("SELECT 1 FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if known.is_none() {
            return Err(Error::NotFound(format!("no user {name:?}")));
        }
        if self.backend == Backend::Postgres {
            // On the user's lock, as checks and logins take it.
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(login_lock(name))
                .execute(&mut *tx)
                .await?;
        }
        let cleared = sqlx::query(
            "UPDATE login_failures SET user_cleared = 1 WHERE user_name = $1 AND user_cleared = 0 AND (pending = 0 OR time < $2)",
        )
        .bind(name)
        .bind(now_ms - ABANDONED_MS)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        self.audit_in(&mut tx, std::slice::from_ref(&event(cleared)))
            .await?;
        tx.commit().await?;
        Ok(cleared)
    }

    /// Replaces a user's standing roles, with its audit event made from
    /// the roles they held (`event`), in one transaction. Unknown users are
    /// an error.
    pub async fn set_user_roles(
        &self,
        name: &str,
        roles: &[String],
        event: impl FnOnce(Vec<String>) -> AuditRow,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        let change = next_change(&mut tx).await?;
        let previous = sqlx::query("SELECT roles FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no user {name:?}")))?;
        // A row whose roles do not decode is what this repairs: its old
        // value goes on the record as it was.
        let raw: String = previous.try_get(0)?;
        let previous =
            parse_list("roles", &raw).unwrap_or_else(|_| vec![format!("<undecodable: {raw}>")]);
        sqlx::query("UPDATE users SET roles = $1, change_seq = $3 WHERE name = $2")
            .bind(json_list(roles)?)
            .bind(name)
            .bind(change)
            .execute(&mut *tx)
            .await?;
        self.audit_in(&mut tx, std::slice::from_ref(&event(previous)))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_user(&self, name: &str) -> Result<Option<UserRecord>> {
        let row = sqlx::query(
            "SELECT name, roles, team, password_hash, totp_secret, created_at, disabled FROM users WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| user_from_row(&r, &self.chain)).transpose()
    }

    /// The users of `names` that exist, a few queries for any number of
    /// names (the session watcher re-reads every live session's user each
    /// tick; one query per user would grow with the sessions). Each is
    /// decoded on its own: one row that does not decode does not hide the
    /// others.
    pub async fn get_users(&self, names: &[String]) -> Result<Vec<(String, Result<UserRecord>)>> {
        self.fetch_in(
            "SELECT name, roles, team, password_hash, totp_secret, created_at, disabled FROM users WHERE name IN (",
            names,
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<String, _>(0)?, user_from_row(r, &self.chain))))
        .collect()
    }

    /// The rows `select` (ending in `IN (`) finds for `keys`, a query per
    /// [`KEYS_PER_QUERY`] keys.
    async fn fetch_in(&self, select: &str, keys: &[String]) -> Result<Vec<AnyRow>> {
        let mut found = Vec::new();
        for chunk in keys.chunks(KEYS_PER_QUERY) {
            let mut sql = String::from(select);
            push_placeholders(&mut sql, self.backend, 1, chunk.len());
            sql.push(')');
            let mut q = sqlx::query(&sql);
            for key in chunk {
                q = q.bind(key.as_str());
            }
            found.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(found)
    }

    pub async fn list_users(&self) -> Result<Vec<UserRecord>> {
        // One row that does not decode (edited by hand) is left out, with a
        // warning, rather than failing every request that lists users
        // (creating a request finds its reviewers here).
        Ok(self
            .list_user_rows()
            .await?
            .into_iter()
            .filter_map(|r| match r {
                Ok(u) => Some(u),
                Err(bad) => {
                    tracing::warn!(user = %bad.name, error = %bad.reason, "a user record does not decode; left out");
                    None
                }
            })
            .collect())
    }

    /// Every user row by name, each decoded on its own: an admin's listing
    /// shows the ones that do not decode too.
    pub async fn list_user_rows(
        &self,
    ) -> Result<Vec<std::result::Result<UserRecord, UnreadableUser>>> {
        let rows = sqlx::query(
            "SELECT name, roles, team, password_hash, totp_secret, created_at, disabled FROM users ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                user_from_row(r, &self.chain).map_err(|e| UnreadableUser {
                    name: r
                        .try_get::<String, _>(0)
                        .unwrap_or_else(|_| "(name unreadable)".into()),
                    reason: e.to_string(),
                })
            })
            .collect())
    }

    // ---- login rate limiting ----------------------------------------------

    /// Stores a password or code check for `user` from `source` as a
    /// failure under way, unless the failures since `since_ms` (those under
    /// way included, on every wicketd) already reach `max` (for the user,
    /// for the source). One at a time per key, so parallel checks cannot
    /// all pass a count taken before any of them was stored.
    pub async fn reserve_login_attempt(
        &self,
        user: &str,
        source: &str,
        now_ms: i64,
        since_ms: i64,
        max: (i64, i64),
    ) -> Result<Reservation> {
        self.reserve_login_check(user, source, now_ms, since_ms, max, false)
            .await
    }

    /// [`Self::reserve_login_attempt`]; with `past_user`, a check over the
    /// user's limit alone (not the source's) is stored too, as
    /// [`Reservation::PastUserLimit`]: one that carries a second factor,
    /// which only the user's own device gives.
    pub async fn reserve_login_check(
        &self,
        user: &str,
        source: &str,
        now_ms: i64,
        since_ms: i64,
        (max_user, max_source): (i64, i64),
        past_user: bool,
    ) -> Result<Reservation> {
        let mut tx = self.begin().await?;
        if self.backend == Backend::Postgres {
            // SQLite writers are one at a time already (the INSERT below
            // takes the write lock); PostgreSQL's read committed would let
            // two inserts each count without the other. Locks are taken in
            // one order (no deadlock), and a flood on one key waits a
            // bounded time, holding a pooled connection meanwhile.
            sqlx::query("SET LOCAL lock_timeout = '2s'")
                .execute(&mut *tx)
                .await?;
            let mut locks = [login_lock(user), login_lock(source)];
            locks.sort_unstable();
            for lock in locks {
                let taken = sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(lock)
                    .execute(&mut *tx)
                    .await;
                match taken {
                    Ok(_) => {}
                    // lock_not_available: too many checks for this key at
                    // once; the client tries again in a moment.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                        return Ok(Reservation::Refused {
                            oldest_failure_ms: None,
                        })
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO login_failures (id, user_name, source, time, pending) VALUES ($1, $2, $3, $4, 1)",
        )
        .bind(&id)
        .bind(user)
        .bind(source)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        let mut over = [false; 2];
        let mut oldest_failure_ms = None;
        for (i, (col, key, max)) in [
            ("user_name = $1 AND user_cleared = 0", user, max_user),
            ("source = $1", source, max_source),
        ]
        .into_iter()
        .enumerate()
        {
            // A check still pending after `ABANDONED_MS` never ended (its
            // client went away, an error, a crash): a failure for good.
            let row = sqlx::query(&format!(
                "SELECT COUNT(*), COUNT(CASE WHEN pending = 0 OR time < $3 THEN 1 END), \
                 MIN(CASE WHEN pending = 0 OR time < $3 THEN time END) \
                 FROM login_failures WHERE {col} AND time >= $2"
            ))
            .bind(key)
            .bind(since_ms)
            .bind(now_ms - ABANDONED_MS)
            .fetch_one(&mut *tx)
            .await?;
            let (all, done): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            // Counts include this check itself.
            over[i] = all > max;
            if done >= max {
                let oldest = row.try_get::<Option<i64>, _>(2)?;
                oldest_failure_ms = oldest_failure_ms.max(oldest);
            }
        }
        match over {
            [false, false] => {
                tx.commit().await?;
                Ok(Reservation::Granted(id))
            }
            [true, false] if past_user => {
                tx.commit().await?;
                Ok(Reservation::PastUserLimit {
                    id,
                    oldest_failure_ms,
                })
            }
            _ => {
                tx.rollback().await?;
                Ok(Reservation::Refused { oldest_failure_ms })
            }
        }
    }

    /// A check under way failed (with no event of its own): it counts as
    /// a failure until it leaves the window.
    pub async fn confirm_login_failure(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE login_failures SET pending = 0 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A check under way ended well: it is no failure.
    pub async fn release_login_attempt(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM login_failures WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Confirms a check under way as failed, with its audit event,
    /// atomically (stored again if a successful login cleared it in
    /// between); prunes old rows.
    pub async fn record_login_failure(
        &self,
        (id, user, source): (&str, &str, &str),
        now_ms: i64,
        prune_before_ms: i64,
        event: &AuditRow,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        let confirmed = sqlx::query("UPDATE login_failures SET pending = 0 WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if confirmed == 0 {
            sqlx::query(
                "INSERT INTO login_failures (id, user_name, source, time, pending) VALUES ($1, $2, $3, $4, 0)",
            )
            .bind(id)
            .bind(user)
            .bind(source)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM login_failures WHERE time < $1")
            .bind(prune_before_ms)
            .execute(&mut *tx)
            .await?;
        self.audit_in(&mut tx, std::slice::from_ref(event)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks TOTP time step `step` used for `user`; false if it (or a later
    /// one) was already used, so a code is accepted at most once.
    pub async fn consume_totp_step(&self, user: &str, step: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE users SET totp_last_step = $2 WHERE name = $1 AND totp_last_step < $2",
        )
        .bind(user)
        .bind(step)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// After a successful login (`attempt`, by `user` from `source`, at
    /// `now_ms`): forgets the user's failures from that source, and stops
    /// counting their failures from other sources against the user, while
    /// they still count against those sources (a guesser's budget is not
    /// refilled by the real user logging in). Checks still under way are
    /// left alone; abandoned ones count as ended failures.
    pub async fn clear_login_failures(
        &self,
        (user, source, attempt): (&str, &str, &str),
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        if self.backend == Backend::Postgres {
            // Two successes for one user at once touch the same rows in
            // other orders: one at a time, on the user's lock (the one a
            // check takes too, in the same order).
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(login_lock(user))
                .execute(&mut *tx)
                .await?;
        }
        let ended = "(pending = 0 OR time < $3)";
        sqlx::query(&format!(
            "DELETE FROM login_failures WHERE id = $4 OR (user_name = $1 AND source = $2 AND {ended})"
        ))
        .bind(user)
        .bind(source)
        .bind(now_ms - ABANDONED_MS)
        .bind(attempt)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "UPDATE login_failures SET user_cleared = 1 WHERE user_name = $1 AND user_cleared = 0 AND {}",
            ended.replace("$3", "$2")
        ))
        .bind(user)
        .bind(now_ms - ABANDONED_MS)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- access requests ---------------------------------------------------

    /// Inserts a new request with its effects' rows, atomically.
    pub async fn insert_request(
        &self,
        req: &StoredRequest,
        audit: &[AuditRow],
        notes: &[NotificationRow],
    ) -> Result<()> {
        self.insert_request_unless_more_await(req, audit, notes, None, None)
            .await
            .map(drop)
    }

    /// How many of `requester`'s requests await review (pending or
    /// needs-info).
    pub async fn count_awaiting_review(&self, requester: &str) -> Result<i64> {
        Ok(sqlx::query(AWAITING_REVIEW)
            .bind(requester)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    /// [`Store::insert_request`], unless `limit` of the requester's
    /// requests await review by then (the decision to create it counted
    /// fewer): then nothing is written, and `false` says to count and
    /// decide again. Counted after the change feed's row is taken, which
    /// every writer takes, so two creations never both count without the
    /// other. `acting` is the requester's record as the decision read it
    /// (see [`Store::update_request`]).
    pub async fn insert_request_unless_more_await(
        &self,
        req: &StoredRequest,
        audit: &[AuditRow],
        notes: &[NotificationRow],
        limit: Option<i64>,
        acting: Option<AsRead<'_>>,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let change = next_change(&mut tx).await?;
        if let Some(acting) = acting {
            acting.still_so(&mut tx).await?;
        }
        if let Some(limit) = limit {
            let now: i64 = sqlx::query(AWAITING_REVIEW)
                .bind(&req.requester)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            if now >= limit {
                return Ok(false);
            }
        }
        sqlx::query(
            "INSERT INTO access_requests (id, requester, state, next_deadline, created_at, updated_at, version, doc, change_seq, awaiting_review) VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $8, $9)",
        )
        .bind(&req.id)
        .bind(&req.requester)
        .bind(&req.state)
        .bind(req.next_deadline)
        .bind(req.created_at)
        .bind(req.updated_at)
        .bind(&req.doc)
        .bind(change)
        .bind(i64::from(req.awaiting_review))
        .execute(&mut *tx)
        .await?;
        self.audit_in(&mut tx, audit).await?;
        for n in notes {
            insert_notification(&mut tx, n).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Replaces a request if it is still at `version` (optimistic
    /// concurrency: two proxies never both apply a transition). Returns the
    /// change number it took, or `None` when someone else changed it first;
    /// nothing is written then.
    ///
    /// `acting` is the user who acts, as their record was read for the
    /// decision (from an index up to a second old, or another wicketd's
    /// store): if it no longer says so (disabled, removed, roles or team
    /// changed) when the change is written, nothing is and the answer is
    /// a conflict. Every user change takes the change feed first, as this
    /// does, so none can slip in between.
    pub async fn update_request(
        &self,
        req: &StoredRequest,
        version: i64,
        audit: &[AuditRow],
        notes: &[NotificationRow],
        acting: Option<AsRead<'_>>,
    ) -> Result<Option<i64>> {
        let mut tx = self.begin().await?;
        let change = next_change(&mut tx).await?;
        if let Some(acting) = acting {
            acting.still_so(&mut tx).await?;
        }
        let r = sqlx::query(
            "UPDATE access_requests SET state = $1, next_deadline = $2, updated_at = $3, doc = $4, version = version + 1, change_seq = $7, awaiting_review = $8 WHERE id = $5 AND version = $6",
        )
        .bind(&req.state)
        .bind(req.next_deadline)
        .bind(req.updated_at)
        .bind(&req.doc)
        .bind(&req.id)
        .bind(version)
        .bind(change)
        .bind(i64::from(req.awaiting_review))
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(None);
        }
        self.audit_in(&mut tx, audit).await?;
        for n in notes {
            insert_notification(&mut tx, n).await?;
        }
        tx.commit().await?;
        Ok(Some(change))
    }

    pub async fn get_request(&self, id: &str) -> Result<Option<(StoredRequest, i64)>> {
        let row = sqlx::query(&format!(
            "SELECT {REQUEST_COLUMNS}, version FROM access_requests WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((stored_from_row(&r)?, r.try_get::<i64, _>(8)?)))
            .transpose()
    }

    /// The requests of `ids` that exist, with their versions, a few queries
    /// for any number of IDs (see [`Store::get_users`]).
    pub async fn get_requests(&self, ids: &[String]) -> Result<Vec<(StoredRequest, i64)>> {
        self.fetch_in(
            &format!("SELECT {REQUEST_COLUMNS}, version FROM access_requests WHERE id IN ("),
            ids,
        )
        .await?
        .iter()
        .map(|r| Ok((stored_from_row(r)?, r.try_get::<i64, _>(8)?)))
        .collect()
    }

    /// What changed after change `after` (see migration 5), up to the feed's
    /// head, which it returns: every user and request stamped in between,
    /// each decoded on its own (`Err` with its key when it does not decode).
    /// With `after` `None`, every user and every active request: a whole
    /// index to start from.
    pub async fn changes(&self, after: Option<i64>) -> Result<Changes> {
        let mut tx = self.begin_read().await?;
        let head: i64 = sqlx::query("SELECT seq FROM change_feed WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        const USERS: &str =
            "SELECT name, roles, team, password_hash, totp_secret, created_at, disabled FROM users";
        let requests_sql = format!("SELECT {REQUEST_COLUMNS}, change_seq FROM access_requests");
        let (users, requests) = match after {
            Some(after) => {
                let (u, r) = (
                    format!("{USERS} WHERE change_seq > $1 AND change_seq <= $2"),
                    format!("{requests_sql} WHERE change_seq > $1 AND change_seq <= $2"),
                );
                let users = sqlx::query(&u)
                    .bind(after)
                    .bind(head)
                    .fetch_all(&mut *tx)
                    .await?;
                let requests = sqlx::query(&r)
                    .bind(after)
                    .bind(head)
                    .fetch_all(&mut *tx)
                    .await?;
                (users, requests)
            }
            None => {
                let r = format!("{requests_sql} WHERE state = 'active'");
                let users = sqlx::query(USERS).fetch_all(&mut *tx).await?;
                let requests = sqlx::query(&r).fetch_all(&mut *tx).await?;
                (users, requests)
            }
        };
        let users = users
            .iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, user_from_row(r, &self.chain))))
            .collect::<Result<_>>()?;
        let requests = requests
            .iter()
            .map(|r| {
                Ok(Changed {
                    key: r.try_get::<String, _>(0)?,
                    seq: r.try_get::<i64, _>(8)?,
                    row: stored_from_row(r),
                })
            })
            .collect::<Result<_>>()?;
        tx.commit().await?;
        Ok(Changes {
            head,
            users,
            requests,
        })
    }

    /// Requests filtered by requester and/or states, and to those awaiting
    /// a review when `awaiting_review_only`, newest first; `after` a
    /// request's (`created_at`, `id`) when given: the page after the one
    /// that request ended.
    pub async fn list_requests(
        &self,
        requester: Option<&str>,
        states: &[&str],
        awaiting_review_only: bool,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<StoredRequest>> {
        let mut sql = format!("SELECT {REQUEST_COLUMNS} FROM access_requests WHERE 1 = 1");
        if awaiting_review_only {
            // By state too: a wicketd older than schema 15 still running
            // writes open requests without the mark.
            sql.push_str(" AND (awaiting_review = 1 OR state IN ('pending', 'needs-info'))");
        }
        let mut n = 0;
        if requester.is_some() {
            n += 1;
            sql.push_str(&format!(" AND requester = ${n}"));
        }
        if !states.is_empty() {
            let marks: Vec<String> = states
                .iter()
                .map(|_| {
                    n += 1;
                    format!("${n}")
                })
                .collect();
            sql.push_str(&format!(" AND state IN ({})", marks.join(", ")));
        }
        if after.is_some() {
            sql.push_str(&format!(
                " AND (created_at < ${} OR (created_at = ${} AND id > ${}))",
                n + 1,
                n + 1,
                n + 2
            ));
            n += 2;
        }
        sql.push_str(&format!(" ORDER BY created_at DESC, id LIMIT ${}", n + 1));
        let mut q = sqlx::query(&sql);
        if let Some(r) = requester {
            q = q.bind(r);
        }
        for s in states {
            q = q.bind(*s);
        }
        if let Some((created_at, id)) = after {
            q = q.bind(created_at).bind(id);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(stored_from_row).collect()
    }

    /// Sets a request's next deadline alone, if it is still at `version`
    /// (a transition meanwhile wrote its own). Its version stays; the
    /// change feed's trigger stamps it changed, so the index reads it again
    /// (its state is the same).
    pub async fn set_request_deadline(
        &self,
        id: &str,
        version: i64,
        deadline_ms: Option<i64>,
    ) -> Result<()> {
        sqlx::query("UPDATE access_requests SET next_deadline = $1 WHERE id = $2 AND version = $3")
            .bind(deadline_ms)
            .bind(id)
            .bind(version)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// IDs of requests whose next deadline is at or before `now_ms`.
    pub async fn due_requests(&self, now_ms: i64, limit: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id FROM access_requests WHERE next_deadline IS NOT NULL AND next_deadline <= $1 ORDER BY next_deadline LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>(0)?))
            .collect()
    }

    /// Users holding any of `roles` (for resolving `role:R` recipients).
    pub async fn users_with_roles(&self, roles: &[String]) -> Result<Vec<String>> {
        Ok(self
            .list_users()
            .await?
            .into_iter()
            .filter(|u| !u.disabled && u.roles.iter().any(|r| roles.contains(r)))
            .map(|u| u.name)
            .collect())
    }

    /// The newest `limit` notifications (of request `request_id`, or all),
    /// oldest first.
    pub async fn notifications(
        &self,
        request_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<NotificationRow>> {
        const COLUMNS: &str =
            "SELECT id, time, request_id, recipients, subject, urgent FROM notifications";
        const NEWEST: &str = "ORDER BY time DESC, id DESC LIMIT";
        let mut rows = match request_id {
            Some(id) => {
                sqlx::query(&format!("{COLUMNS} WHERE request_id = $1 {NEWEST} $2"))
                    .bind(id)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("{COLUMNS} {NEWEST} $1"))
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.reverse();
        rows.iter()
            .map(|r| {
                Ok(NotificationRow {
                    id: r.try_get(0)?,
                    time_ms: r.try_get(1)?,
                    request_id: r.try_get(2)?,
                    recipients: parse_list("recipients", &r.try_get::<String, _>(3)?)?,
                    subject: r.try_get(4)?,
                    urgent: r.try_get::<i64, _>(5)? != 0,
                })
            })
            .collect()
    }

    // ---- PostgreSQL cancel keys ---------------------------------------------

    /// Records a cancel key; false when another session holds it already.
    pub async fn put_cancel_key(&self, k: &CancelKeyRow) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO pg_cancel_keys (pid, secret, user_name, resource, db_user, backend_pid, backend_secret, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (pid, secret) DO NOTHING",
        )
        .bind(i64::from(k.pid))
        .bind(i64::from(k.secret))
        .bind(k.user.as_str())
        .bind(k.resource.as_str())
        .bind(k.db_user.as_str())
        .bind(i64::from(k.backend_pid))
        .bind(i64::from(k.backend_secret))
        .bind(k.created_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The session a cancel key was handed to, if it is on record.
    pub async fn cancel_key(&self, pid: u32, secret: u32) -> Result<Option<CancelKeyRow>> {
        let Some(r) = sqlx::query(
            "SELECT user_name, resource, db_user, backend_pid, backend_secret, created_at \
             FROM pg_cancel_keys WHERE pid = $1 AND secret = $2",
        )
        .bind(i64::from(pid))
        .bind(i64::from(secret))
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let key = |i: usize| -> Result<u32> {
            let v: i64 = r.try_get(i)?;
            u32::try_from(v).map_err(|_| Error::Store(format!("pg_cancel_keys: {v} is not a key")))
        };
        Ok(Some(CancelKeyRow {
            pid,
            secret,
            user: r.try_get(0)?,
            resource: r.try_get(1)?,
            db_user: r.try_get(2)?,
            backend_pid: key(3)?,
            backend_secret: key(4)?,
            created_ms: r.try_get(5)?,
        }))
    }

    /// Forgets a cancel key (its session ended): the row only if it stands
    /// for that session's backend (`backend_pid`, `backend_secret`).
    pub async fn delete_cancel_key(
        &self,
        pid: u32,
        secret: u32,
        backend_pid: u32,
        backend_secret: u32,
    ) -> Result<()> {
        sqlx::query(
            "DELETE FROM pg_cancel_keys WHERE pid = $1 AND secret = $2 \
             AND backend_pid = $3 AND backend_secret = $4",
        )
        .bind(i64::from(pid))
        .bind(i64::from(secret))
        .bind(i64::from(backend_pid))
        .bind(i64::from(backend_secret))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets cancel keys recorded before `before_ms` (left by a wicketd
    /// that stopped without ending its sessions); how many.
    pub async fn prune_cancel_keys(&self, before_ms: i64) -> Result<u64> {
        let r = sqlx::query("DELETE FROM pg_cancel_keys WHERE created_at < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    // ---- session recordings --------------------------------------------------

    /// Stores an ended session's recording, read from `file` to its end
    /// in parts of `part_size` bytes (one in memory at a time; see
    /// [`RECORDING_PART`]), all in one transaction: the store has the whole
    /// file or none of it. A recording already stored is kept.
    pub async fn put_recording(
        &self,
        meta: &RecordingMeta,
        file: &mut (impl tokio::io::AsyncRead + Unpin),
        stored: i64,
        part_size: usize,
    ) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let mut tx = self.begin().await?;
        let new = sqlx::query(
            "INSERT INTO session_recordings (session_id, user_name, node, login, request_ids, started, size, data, stored, parts) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, 0) ON CONFLICT (session_id) DO NOTHING",
        )
        .bind(meta.session_id.as_str())
        .bind(meta.user.as_str())
        .bind(meta.node.as_str())
        .bind(meta.login.as_str())
        .bind(json_list(&meta.request_ids)?)
        .bind(meta.started)
        .bind(parts_placeholder(meta))
        .bind(stored)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if new == 0 {
            return Ok(());
        }
        // Parts left by a row deleted by hand are not this copy's.
        sqlx::query("DELETE FROM session_recording_parts WHERE session_id = $1")
            .bind(meta.session_id.as_str())
            .execute(&mut *tx)
            .await?;
        let (mut parts, mut size) = (0i64, 0i64);
        let mut buf = Vec::with_capacity(part_size.max(1));
        loop {
            buf.clear();
            let n = (&mut *file)
                .take(part_size.max(1) as u64)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| Error::Store(format!("cannot read the recording: {e}")))?;
            if n == 0 && parts > 0 {
                break;
            }
            sqlx::query(
                "INSERT INTO session_recording_parts (session_id, part, data) VALUES ($1, $2, $3)",
            )
            .bind(meta.session_id.as_str())
            .bind(parts)
            .bind(buf.as_slice())
            .execute(&mut *tx)
            .await?;
            parts += 1;
            size = size.saturating_add(n as i64);
            // An empty file is one empty part (0 parts would mean "in
            // `data`").
            if n == 0 {
                break;
            }
        }
        sqlx::query("UPDATE session_recordings SET parts = $1, size = $2 WHERE session_id = $3")
            .bind(parts)
            .bind(size)
            .bind(meta.session_id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every stored recording's header and size, newest first; a row that
    /// does not decode is left out with a warning.
    pub async fn list_recordings(&self) -> Result<Vec<(RecordingMeta, u64)>> {
        let rows = sqlx::query(
            "SELECT session_id, user_name, node, login, request_ids, started, size \
             FROM session_recordings ORDER BY started DESC, session_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| match recording_from_row(r) {
                Ok(x) => Some(x),
                Err(e) => {
                    tracing::warn!(error = %e, "a stored recording's row does not decode; left out");
                    None
                }
            })
            .collect())
    }

    /// A stored recording's header, without the file (read before anyone
    /// may load the file).
    pub async fn recording_meta(&self, session_id: &str) -> Result<Option<RecordingMeta>> {
        let Some(r) = sqlx::query(
            "SELECT session_id, user_name, node, login, request_ids, started, size \
             FROM session_recordings WHERE session_id = $1",
        )
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(recording_from_row(&r)?.0))
    }

    /// Deletes the stored recordings whose session started, and which were
    /// stored (when their session ended), before `before` (Unix seconds),
    /// with an audit event for each (`event`) in the same transaction: a
    /// row is gone only with its record, and each is deleted, and audited,
    /// by one wicketd. Returns how many it deleted.
    pub async fn delete_recordings_ended_before(
        &self,
        before: i64,
        event: impl Fn(&RecordingMeta) -> AuditRow,
    ) -> Result<usize> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "DELETE FROM session_recordings WHERE started < $1 AND stored < $1 \
             RETURNING session_id, user_name, node, login, request_ids, started, size",
        )
        .bind(before)
        .fetch_all(&mut *tx)
        .await?;
        let mut audit = Vec::with_capacity(rows.len());
        for r in &rows {
            let meta = match recording_from_row(r) {
                Ok((meta, _)) => meta,
                // Deleted all the same, and on the record with what reads.
                Err(e) => {
                    let id: String = r.try_get(0)?;
                    tracing::warn!(session = %id, error = %e, "deleting a stored recording whose row does not decode");
                    RecordingMeta {
                        session_id: id,
                        user: r.try_get(1).unwrap_or_default(),
                        node: r.try_get(2).unwrap_or_default(),
                        login: r.try_get(3).unwrap_or_default(),
                        request_ids: Vec::new(),
                        started: r.try_get(5).unwrap_or_default(),
                    }
                }
            };
            audit.push(event(&meta));
        }
        if !audit.is_empty() {
            self.audit_in(&mut tx, &audit).await?;
        }
        // The parts of the rows deleted above, and of rows that went
        // without them (an older wicketd's sweep, or by hand); a copy being
        // stored now is not seen, nor deleted.
        sqlx::query(
            "DELETE FROM session_recording_parts \
             WHERE session_id NOT IN (SELECT session_id FROM session_recordings)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(audit.len())
    }

    /// How a stored recording's file is kept: in how many parts (see
    /// [`Self::recording_part`]), or 0 when it is whole in its row (stored
    /// before parts; see [`Self::recording_data`]).
    pub async fn recording_parts(&self, session_id: &str) -> Result<Option<i64>> {
        let r = sqlx::query("SELECT parts FROM session_recordings WHERE session_id = $1")
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    /// Part `part` of a stored recording's file.
    pub async fn recording_part(&self, session_id: &str, part: i64) -> Result<Option<Vec<u8>>> {
        let r = sqlx::query(
            "SELECT data FROM session_recording_parts WHERE session_id = $1 AND part = $2",
        )
        .bind(session_id)
        .bind(part)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match r {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    /// A stored recording's asciicast file, whole: its row's, or its parts
    /// put together.
    pub async fn recording_data(&self, session_id: &str) -> Result<Option<Vec<u8>>> {
        let Some(parts) = self.recording_parts(session_id).await? else {
            return Ok(None);
        };
        if parts == 0 {
            let r = sqlx::query("SELECT data FROM session_recordings WHERE session_id = $1")
                .bind(session_id)
                .fetch_optional(&self.pool)
                .await?;
            return Ok(match r {
                Some(r) => Some(r.try_get(0)?),
                None => None,
            });
        }
        let mut data = Vec::new();
        for part in 0..parts {
            let Some(p) = self.recording_part(session_id, part).await? else {
                return Ok(None);
            };
            data.extend_from_slice(&p);
        }
        Ok(Some(data))
    }

    // ---- audit -------------------------------------------------------------

    /// Appends `rows` to the audit chain inside `tx`.
    async fn audit_in(&self, tx: &mut Transaction<'static, Any>, rows: &[AuditRow]) -> Result<()> {
        insert_audit(self.backend, &self.chain, tx, rows).await
    }

    pub async fn append_audit(&self, event: &AuditRow) -> Result<()> {
        let mut tx = self.begin().await?;
        self.audit_in(&mut tx, std::slice::from_ref(event)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores several events in one transaction.
    pub async fn append_audit_batch(&self, events: &[AuditRow]) -> Result<()> {
        let mut tx = self.begin().await?;
        self.audit_in(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether `events` (stored together by [`Self::append_audit_batch`])
    /// are in the store: a commit whose answer was lost may have stored
    /// them, and storing them again would then fail on their IDs for good.
    pub async fn audit_batch_stored(&self, events: &[AuditRow]) -> Result<bool> {
        let Some(first) = groups::coalesce(events).into_iter().next() else {
            return Ok(true);
        };
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_events WHERE id = $1")
            .bind(first.row.id.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Events matching `f`, oldest first, at most `f.limit` (1000 when 0).
    /// Rows of session events ([`groups`]) are expanded, and the filters
    /// apply to the events they hold.
    pub async fn search_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRow>> {
        let limit = if f.limit > 0 { f.limit } else { 1000 };
        let since = f.since_ms.unwrap_or(i64::MIN);
        // IDs compare byte by byte, as the loop below compares them.
        let id = match self.backend {
            Backend::Sqlite => "id",
            Backend::Postgres => "id COLLATE \"C\"",
        };
        let mut sql = format!(
            "SELECT id, time, kind, actor, request_id, session_id, data FROM audit_events \
             WHERE time >= $1 AND (time > $2 OR (time = $2 AND {id} > $3))",
        );
        let mut binds: Vec<&str> = Vec::new();
        for (col, val) in [
            ("actor", &f.actor),
            ("request_id", &f.request_id),
            ("session_id", &f.session_id),
        ] {
            if let Some(v) = val {
                binds.push(v);
                let n = binds.len() + 3;
                if col == "request_id" {
                    sql.push_str(&format!(
                        " AND {}",
                        BY_REQUEST.replace("$1", &format!("${n}"))
                    ));
                } else {
                    sql.push_str(&format!(" AND {col} = ${n}"));
                }
            }
        }
        if let Some(kind) = &f.kind {
            binds.push(kind);
            let n = binds.len() + 3;
            if crate::audit::STATEMENT_KINDS.contains(&kind.as_str()) {
                sql.push_str(&format!(
                    " AND (kind = ${n} OR kind = '{}')",
                    groups::GROUP_KIND
                ));
            } else {
                sql.push_str(&format!(" AND kind = ${n}"));
            }
        }
        sql.push_str(&format!(" ORDER BY time, {id} LIMIT ${}", binds.len() + 4));
        let want = usize::try_from(limit).unwrap_or(usize::MAX);
        // Rows per query: enough that events filtered out after expanding
        // do not cost a query each, few enough that large rows of session
        // events stay a bounded read (small in unit tests, so searches
        // there cross many pages).
        let (least, most) = if cfg!(test) { (3, 9) } else { (64, 256) };
        let page = limit.clamp(least, most);
        let mut found: Vec<AuditRow> = Vec::new();
        // Pages of rows after `after`. No event sorts before its row, so
        // once a page is read every event sorting before its last row is
        // known; and only the first `limit` found can be in the answer.
        let mut after = (i64::MIN, String::new());
        loop {
            // A row's time is its earliest event's, up to SPAN_MS before
            // the rest: rows from that much before `since` may hold some.
            let mut q = sqlx::query(&sql)
                .bind(since.saturating_sub(groups::SPAN_MS))
                .bind(after.0)
                .bind(after.1.as_str());
            for b in &binds {
                q = q.bind(*b);
            }
            let rows = q.bind(page).fetch_all(&self.pool).await?;
            let more = rows.len() as i64 == page;
            for r in &rows {
                let row = audit_from_row(r)?;
                after = (row.time_ms, row.id.clone());
                found.extend(groups::expand(row).into_iter().filter(|e| {
                    e.time_ms >= since && f.kind.as_ref().is_none_or(|k| *k == e.kind)
                }));
            }
            found.sort_by(|a, b| (a.time_ms, &a.id).cmp(&(b.time_ms, &b.id)));
            found.truncate(want);
            let known = |e: &AuditRow| (e.time_ms, e.id.as_str()) <= (after.0, after.1.as_str());
            if !more || (found.len() == want && found.last().is_some_and(known)) {
                break;
            }
        }
        Ok(found)
    }

    /// Actions taken under request `request_id`: the session events of
    /// `audit::SESSION_ACTION_KINDS` that name it.
    pub async fn count_request_actions(&self, request_id: &str) -> Result<i64> {
        let kinds = crate::audit::SESSION_ACTION_KINDS;
        let marks: Vec<String> = (0..kinds.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(CASE WHEN actions IS NOT NULL THEN actions \
             WHEN kind IN ({}) THEN 1 ELSE 0 END), 0) AS BIGINT) FROM audit_events WHERE {BY_REQUEST}",
            marks.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(request_id);
        for k in kinds {
            q = q.bind(*k);
        }
        Ok(q.fetch_one(&self.pool).await?.try_get::<i64, _>(0)?)
    }

    /// Walks the audit chain from its first event to its head and reports
    /// every place where it does not hold: an event whose hash does not
    /// follow (changed, or put in), places missing (removed), events outside
    /// the chain (inserted), and a head that does not match the last event.
    /// At most `max_problems` are listed; all are counted.
    pub async fn verify_audit(&self, max_problems: usize) -> Result<AuditVerification> {
        let mut v = AuditVerification::default();
        let note = |v: &mut AuditVerification, p: String| {
            v.problem_count += 1;
            if v.problems.len() < max_problems {
                v.problems.push(p);
            }
        };
        // One at a time on this wicketd: each holds a store connection for
        // its whole walk.
        let _one = self.verifying.lock().await;
        // What it reads is one moment's chain (a snapshot), so events
        // appended while it walks are neither missed nor "removed".
        let mut tx = self.begin_read().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let mut walk = ChainWalk::default();
        let mut last_id = None::<String>;
        loop {
            let page = walk.page(&mut tx).await?;
            // The links the page's events name, checked a page at a time.
            let mut named = PageLinks::default();
            if page.is_empty() {
                break;
            }
            for l in &page {
                let (seq, e) = (l.seq, &l.event);
                let held = groups::held(e);
                match walk.step(l, Link::Keyed(&self.chain)) {
                    LinkCheck::Gap(from, to) => {
                        let after = last_id
                            .as_deref()
                            .map_or("the start".to_owned(), |id| format!("event {id}"));
                        note(
                            &mut v,
                            format!(
                                "events #{from}..#{to} were removed (between {after} and event {})",
                                e.id
                            ),
                        );
                    }
                    LinkCheck::Broken if !l.hash.starts_with(KEYED) => note(
                        &mut v,
                        format!("event #{seq} ({}) has a link made without the chain's key: put in, or written by a wicketd older than schema 10 still running", e.id),
                    ),
                    LinkCheck::Broken => note(
                        &mut v,
                        format!("event #{seq} ({}) was changed or put in: its hash does not follow the chain", e.id),
                    ),
                    LinkCheck::Follows => {
                        if let Some(problem) = groups::check(e, held.as_deref()) {
                            note(&mut v, format!("event #{seq} ({}): {problem}", e.id));
                        }
                    }
                }
                // Not in the hash: checked against what the row holds.
                match l.actions {
                    None if e.kind != groups::GROUP_KIND => {}
                    Some(n) if n == groups::actions(e, held.as_deref()) => {}
                    _ => note(
                        &mut v,
                        format!("event #{seq} ({}): its count of actions was changed", e.id),
                    ),
                }
                v.events += held.map_or(1, |h| h.len() as u64);
                last_id = Some(e.id.clone());
                named.add(e);
            }
            for p in named.problems(&mut tx).await? {
                note(&mut v, p);
            }
        }
        for p in PageLinks::orphans(&mut tx).await? {
            note(&mut v, p);
        }
        let (last_seq, prev) = (walk.last_seq, walk.prev);
        let outside =
            sqlx::query("SELECT id FROM audit_events WHERE seq IS NULL ORDER BY time, id")
                .fetch_all(&mut *tx)
                .await?;
        for r in &outside {
            let id: String = r.try_get(0)?;
            note(&mut v, format!("event {id} is not in the chain: inserted"));
        }
        let head =
            sqlx::query("SELECT seq, hash, key_id, keyed_problems FROM audit_chain WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        tx.rollback().await?;
        let (head_seq, head_hash): (i64, String) = (head.try_get(0)?, head.try_get(1)?);
        let key_id: Option<String> = head.try_get(2)?;
        if key_id.as_deref() != Some(self.chain.id()) {
            note(
                &mut v,
                format!(
                    "the chain's key id was changed to {} (this CA key set's is {})",
                    key_id.as_deref().unwrap_or("nothing"),
                    self.chain.id()
                ),
            );
        }
        let sealed = head.try_get::<Option<String>, _>(3)?;
        match sealed.as_deref().and_then(|t| KeyedProblems::open(t, &self.chain)) {
            Some(before) => {
                let listed = before.problems.len() as u64;
                for p in before.problems {
                    note(
                        &mut v,
                        format!("before the chain was keyed (schema 10): {p}"),
                    );
                }
                // Counted, beyond the ones kept.
                v.problem_count += before.count.saturating_sub(listed);
            }
            None => note(
                &mut v,
                "the record of what keying the chain found (audit_chain.keyed_problems) was removed or changed".to_owned(),
            ),
        }
        if head_seq > last_seq {
            note(
                &mut v,
                format!(
                    "events #{}..#{head_seq} were removed from the end",
                    last_seq + 1
                ),
            );
        } else if head_seq < last_seq {
            note(
                &mut v,
                format!("events after #{head_seq} are past the chain's head: inserted"),
            );
        } else if head_hash != prev {
            note(
                &mut v,
                format!("the chain's head does not match event #{last_seq}"),
            );
        }
        match self.seen_head() {
            Ok(seen) => {
                if let Some(p) = self.check_seen(seen.as_ref()).await? {
                    note(&mut v, p);
                }
            }
            Err(e) => note(&mut v, e.to_string()),
        }
        v.head_seq = head_seq;
        v.head_hash = head_hash;
        Ok(v)
    }

    /// Checks that the chain still holds the head this host last saw, then
    /// records the current head as seen (run every few seconds). The
    /// problem, if the chain lost what was seen (the record is kept then).
    pub async fn note_chain_head(&self) -> Result<Option<String>> {
        let seen = match self.seen_head() {
            Ok(seen) => seen,
            Err(e) => return Ok(Some(e.to_string())),
        };
        let head = sqlx::query("SELECT seq, hash FROM audit_chain WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        let (seq, hash): (i64, String) = (head.try_get(0)?, head.try_get(1)?);
        // The head where it was seen: nothing was lost (a head moved back and
        // on to the same place has another link) and nothing is new.
        if seen
            .as_ref()
            .is_some_and(|(at, h)| *at == seq && *h == hash)
        {
            return Ok(None);
        }
        if let Some(problem) = self.check_seen(seen.as_ref()).await? {
            return Ok(Some(problem));
        }
        // (An empty chain has nothing to keep.)
        if seq > 0 && seen.is_none_or(|(at, _)| seq > at) {
            let path = self.seen.clone();
            tokio::task::spawn_blocking(move || {
                crate::keystore::write_file_atomic(
                    &path,
                    format!("{seq} {hash}\n").as_bytes(),
                    0o600,
                )
            })
            .await
            .map_err(|e| Error::Internal(format!("recording the chain head: {e}")))??;
        }
        Ok(None)
    }

    /// The head recorded in [`SEEN_FILE`], if any.
    fn seen_head(&self) -> Result<Option<(i64, String)>> {
        let text = match std::fs::read_to_string(&*self.seen) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Store(format!(
                    "cannot read {} (the audit chain head this host saw): {e}",
                    self.seen.display()
                )))
            }
        };
        text.strip_suffix('\n')
            .and_then(|line| line.split_once(' '))
            .and_then(|(seq, hash)| Some((seq.parse().ok()?, hash.to_owned())))
            .map(Some)
            .ok_or_else(|| {
                Error::Store(format!(
                    "{} (the audit chain head this host saw) is not `<seq> <hash>`; remove it to start again",
                    self.seen.display()
                ))
            })
    }

    /// Whether the chain still holds the head this host saw, as it was.
    async fn check_seen(&self, seen: Option<&(i64, String)>) -> Result<Option<String>> {
        let Some((seq, hash)) = seen else {
            return Ok(None);
        };
        let row = sqlx::query("SELECT hash FROM audit_events WHERE seq = $1")
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?;
        let found = row.map(|r| r.try_get::<Option<String>, _>(0)).transpose()?;
        let what = match found.flatten() {
            Some(h) if &h == hash => return Ok(None),
            Some(_) => "its link is not the one seen then",
            None => "it is gone: the newest events were removed, or lost (a crash of the store's host, a failover to a replica behind it), and the head moved back",
        };
        Ok(Some(format!(
            "this host saw the chain's head at event #{seq} ({}), and {what} (if the store was restored from a backup on purpose, remove that file)",
            self.seen.display()
        )))
    }
}

/// What [`Store::verify_audit`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditVerification {
    /// Events in the chain that were checked.
    pub events: u64,
    pub head_seq: i64,
    pub head_hash: String,
    pub problems: Vec<String>,
    pub problem_count: u64,
}

fn audit_from_row(r: &AnyRow) -> Result<AuditRow> {
    Ok(AuditRow {
        id: r.try_get(0)?,
        time_ms: r.try_get(1)?,
        kind: r.try_get(2)?,
        actor: r.try_get(3)?,
        request_id: r.try_get(4)?,
        session_id: r.try_get(5)?,
        data: r.try_get(6)?,
    })
}

/// An access request row: indexed columns plus the JSON document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    pub id: String,
    pub requester: String,
    pub state: String,
    pub next_deadline: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub doc: String,
    /// Whether it awaits a review (see migration 15): what reviewers'
    /// listing reads.
    pub awaiting_review: bool,
}

/// A PostgreSQL cancel key handed to a client (`pid`, `secret`) and the
/// backend's own key it stands for. Not `Debug`: the keys cancel queries.
#[derive(Clone, PartialEq, Eq)]
pub struct CancelKeyRow {
    pub pid: u32,
    pub secret: u32,
    /// The Wicket user whose session it is: only they may cancel with it.
    pub user: String,
    pub resource: String,
    pub db_user: String,
    pub backend_pid: u32,
    pub backend_secret: u32,
    pub created_ms: i64,
}

/// A queued notification (the outbox that delivery channels read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationRow {
    pub id: String,
    pub time_ms: i64,
    pub request_id: Option<String>,
    pub recipients: Vec<String>,
    pub subject: String,
    pub urgent: bool,
}

fn recording_from_row(r: &AnyRow) -> Result<(RecordingMeta, u64)> {
    let size: i64 = r.try_get(6)?;
    Ok((
        RecordingMeta {
            session_id: r.try_get(0)?,
            user: r.try_get(1)?,
            node: r.try_get(2)?,
            login: r.try_get(3)?,
            request_ids: parse_list("request_ids", &r.try_get::<String, _>(4)?)?,
            started: r.try_get(5)?,
        },
        u64::try_from(size).unwrap_or(0),
    ))
}

/// The columns [`stored_from_row`] reads, in its order.
const REQUEST_COLUMNS: &str =
    "id, requester, state, next_deadline, created_at, updated_at, doc, awaiting_review";

fn stored_from_row(r: &AnyRow) -> Result<StoredRequest> {
    Ok(StoredRequest {
        id: r.try_get(0)?,
        requester: r.try_get(1)?,
        state: r.try_get(2)?,
        next_deadline: r.try_get(3)?,
        created_at: r.try_get(4)?,
        updated_at: r.try_get(5)?,
        doc: r.try_get(6)?,
        awaiting_review: r.try_get::<i64, _>(7)? != 0,
    })
}

async fn insert_notification(
    tx: &mut Transaction<'static, Any>,
    n: &NotificationRow,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO notifications (id, time, request_id, recipients, subject, urgent) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&n.id)
    .bind(n.time_ms)
    .bind(&n.request_id)
    .bind(json_list(&n.recipients)?)
    .bind(&n.subject)
    .bind(i64::from(n.urgent))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Most keys in one `IN (...)` list (SQLite before 3.32 allows 999 bound
/// values per statement).
const KEYS_PER_QUERY: usize = 500;

/// Appends `n` bound-value placeholders, comma separated, numbered from
/// `first`.
fn push_placeholders(sql: &mut String, backend: Backend, first: usize, n: usize) {
    for i in first..first + n {
        if i > first {
            sql.push_str(", ");
        }
        sql.push_str(&placeholder(backend, i));
    }
}

/// The placeholder of bound value number `i` (from 1). Anonymous on SQLite,
/// which looks a named one (`$N`) up in a list on every bind, quadratic in
/// a long list; so values must be bound in the order they appear.
fn placeholder(backend: Backend, i: usize) -> String {
    match backend {
        Backend::Sqlite => "?".to_owned(),
        Backend::Postgres => format!("${i}"),
    }
}

/// Inserts audit rows, many per INSERT (statement overhead, not row count,
/// dominates small inserts), with each session's statement events in a run
/// stored as one row ([`groups`]).
async fn insert_audit(
    backend: Backend,
    key: &ChainKey,
    tx: &mut Transaction<'static, Any>,
    rows: &[AuditRow],
) -> Result<()> {
    const ROWS_PER_INSERT: usize = 256;
    // And at most this much text per INSERT (one row is far smaller), so
    // no batch grows past what a server takes in one statement.
    const BYTES_PER_INSERT: usize = 4 << 20;
    const COLUMNS: usize = 10;
    if rows.is_empty() {
        return Ok(());
    }
    let stored = groups::coalesce(rows);
    let mut chain = ChainHead::lock(tx).await?;
    let mut rest = &stored[..];
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        while n < rest.len().min(ROWS_PER_INSERT) && (n == 0 || bytes < BYTES_PER_INSERT) {
            bytes += rest[n].row.data.len() + 128;
            n += 1;
        }
        let (chunk, after) = rest.split_at(n);
        rest = after;
        let mut sql = String::from(
            "INSERT INTO audit_events (seq, hash, id, time, kind, actor, request_id, session_id, data, actions) VALUES ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            push_placeholders(&mut sql, backend, i * COLUMNS + 1, COLUMNS);
            sql.push(')');
        }
        let links: Vec<(i64, String)> = chunk
            .iter()
            .map(|s| chain.append(Link::Keyed(key), &s.row))
            .collect();
        let mut q = sqlx::query(&sql);
        for (s, (seq, hash)) in chunk.iter().zip(&links) {
            let e = &*s.row;
            q = q
                .bind(*seq)
                .bind(hash.as_str())
                // Borrowed: the driver then copies each value once, not twice.
                .bind(e.id.as_str())
                .bind(e.time_ms)
                .bind(e.kind.as_str())
                .bind(e.actor.as_deref())
                .bind(e.request_id.as_deref())
                .bind(e.session_id.as_deref())
                .bind(e.data.as_str())
                .bind(s.actions);
        }
        q.execute(&mut **tx).await?;
    }
    for r in rows {
        if let Some((noted, key)) = noted_under(r) {
            note_requests(tx, noted, key, &r.data).await?;
        }
    }
    chain.store(tx).await
}

/// Whether `row`'s requests past the first are noted, in which table and
/// under what: a session's start under its session, an event of
/// [`MANY_REQUEST_KINDS`] under itself.
fn noted_under(row: &AuditRow) -> Option<(Noted, &str)> {
    if row.kind == "session_started" {
        row.session_id.as_deref().map(|s| (Noted::Session, s))
    } else if MANY_REQUEST_KINDS.contains(&row.kind.as_str()) {
        Some((Noted::Event, row.id.as_str()))
    } else {
        None
    }
}

/// The links (`session_requests`, `event_requests`) that a page of chained
/// events name: a search by a session's (or event's) second request goes
/// through them, and they are not chained themselves, so `verify` checks
/// each against the event it comes from, a page at a time.
#[derive(Default)]
struct PageLinks {
    /// What each link is to: the sessions and events of the page.
    keys: std::collections::BTreeMap<Noted, Vec<String>>,
    /// (table, key, request) that the events name.
    links: std::collections::BTreeSet<(Noted, String, String)>,
}

impl PageLinks {
    fn add(&mut self, e: &AuditRow) {
        if let Some((noted, key)) = noted_under(e) {
            self.keys.entry(noted).or_default().push(key.to_owned());
            for r in requests_past_first(&e.data) {
                self.links.insert((noted, key.to_owned(), r));
            }
        }
    }

    /// A link to one of the page's sessions or events that its event does
    /// not name (put in), and one it names that is not there (removed).
    async fn problems(mut self, conn: &mut sqlx::AnyConnection) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (noted, keys) in &self.keys {
            let (table, column) = noted.table();
            for chunk in keys.chunks(500) {
                let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                let sql = format!(
                    "SELECT request_id, {column} FROM {table} WHERE {column} IN ({}) ORDER BY {column}, request_id",
                    marks.join(", ")
                );
                let mut q = sqlx::query(&sql);
                for k in chunk {
                    q = q.bind(k.as_str());
                }
                for r in q.fetch_all(&mut *conn).await? {
                    let (request, of): (String, String) = (r.try_get(0)?, r.try_get(1)?);
                    if !self.links.remove(&(*noted, of.clone(), request.clone())) {
                        out.push(format!("{table} links {of} to request {request}, which its event does not name: put in"));
                    }
                }
            }
        }
        for (noted, of, request) in self.links {
            let (table, _) = noted.table();
            let since = match noted {
                Noted::Session => SESSION_REQUESTS_MIGRATION,
                Noted::Event => EVENT_REQUESTS_MIGRATION,
            };
            out.push(format!(
                "{table} lost {of}'s link to request {request}: a search by that request does not \
                 find it (removed, or written by a wicketd older than schema {since} still running)"
            ));
        }
        Ok(out)
    }

    /// Links to a session or event that no chained event starts or is.
    async fn orphans(conn: &mut sqlx::AnyConnection) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for noted in [Noted::Session, Noted::Event] {
            let (table, column) = noted.table();
            let (events, key) = noted.events();
            let sql = format!(
                "SELECT request_id, {column} FROM {table} WHERE {column} NOT IN \
                 (SELECT {key} FROM audit_events WHERE {events} AND seq IS NOT NULL) \
                 ORDER BY {column}, request_id"
            );
            for r in sqlx::query(&sql).fetch_all(&mut *conn).await? {
                let (request, of): (String, String) = (r.try_get(0)?, r.try_get(1)?);
                out.push(format!(
                    "{table} links {of} to request {request}, but no event in the chain is {of}: put in"
                ));
            }
        }
        Ok(out)
    }
}

/// The requests past the first that an event's data names
/// (`request_ids`); none when it names one or none, or does not decode.
fn requests_past_first(data: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        #[serde(default)]
        request_ids: Vec<String>,
    }
    serde_json::from_str::<Named>(data)
        .map(|s| s.request_ids.into_iter().skip(1).collect())
        .unwrap_or_default()
}

/// What [`note_requests`] links requests to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Noted {
    /// A session (`session_requests`): every event of it.
    Session,
    /// One event (`event_requests`).
    Event,
}

impl Noted {
    /// Its table, and the column naming what a request is linked to.
    fn table(self) -> (&'static str, &'static str) {
        match self {
            Noted::Session => ("session_requests", "session_id"),
            Noted::Event => ("event_requests", "event_id"),
        }
    }

    /// [`noted_under`] in SQL: the `audit_events` rows whose requests are
    /// noted here (a condition), and the column they are noted under.
    fn events(self) -> (String, &'static str) {
        match self {
            Noted::Session => (
                "kind = 'session_started' AND session_id IS NOT NULL".to_owned(),
                "session_id",
            ),
            Noted::Event => {
                let kinds: Vec<String> = MANY_REQUEST_KINDS
                    .iter()
                    .map(|k| format!("'{k}'"))
                    .collect();
                (format!("kind IN ({})", kinds.join(", ")), "id")
            }
        }
    }
}

/// Records the requests past the first that an event names, from its data
/// (`request_ids`): linked to `key`, the session it starts or the event.
async fn note_requests(
    tx: &mut Transaction<'static, Any>,
    noted: Noted,
    key: &str,
    data: &str,
) -> Result<()> {
    let ids = requests_past_first(data);
    if ids.is_empty() {
        return Ok(());
    }
    let (table, column) = noted.table();
    let sql = format!(
        "INSERT INTO {table} (request_id, {column}) VALUES ($1, $2) ON CONFLICT DO NOTHING"
    );
    for id in ids {
        sqlx::query(&sql)
            .bind(id)
            .bind(key)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Lowercase or uppercase hex to bytes; `None` if it is not hex.
fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Seals the TOTP secrets stored in clear before [`SEAL_MIGRATION`].
async fn seal_totp_secrets(tx: &mut Transaction<'static, Any>, key: &ChainKey) -> Result<()> {
    let rows = sqlx::query(
        "SELECT name, totp_secret FROM users WHERE totp_secret IS NOT NULL AND totp_secret NOT LIKE 'sealed1:%'",
    )
    .fetch_all(&mut **tx)
    .await?;
    for r in &rows {
        let (name, secret): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        sqlx::query("UPDATE users SET totp_secret = $1 WHERE name = $2")
            .bind(key.seal_secret(&name, &secret)?)
            .bind(&name)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Migrations 16 and 18: the sessions (or events) stored before them that
/// named several requests, [`Noted::events`], read a page at a time and
/// each noted as a new one is.
async fn requests_from_events(tx: &mut Transaction<'static, Any>, noted: Noted) -> Result<()> {
    const PAGE: i64 = 1000;
    let (events, key) = noted.events();
    let select = format!(
        "SELECT id, {key}, data FROM audit_events WHERE {events} AND id > $1 ORDER BY id LIMIT $2"
    );
    let mut after = String::new();
    loop {
        let rows = sqlx::query(&select)
            .bind(&after)
            .bind(PAGE)
            .fetch_all(&mut **tx)
            .await?;
        for r in &rows {
            let (key, data): (String, String) = (r.try_get(1)?, r.try_get(2)?);
            note_requests(tx, noted, &key, &data).await?;
        }
        match rows.last() {
            Some(last) if rows.len() as i64 == PAGE => after = last.try_get(0)?,
            _ => return Ok(()),
        }
    }
}

/// The audit chain's head (last place and hash) inside a transaction that
/// holds its lock.
struct ChainHead {
    seq: i64,
    hash: String,
}

impl ChainHead {
    /// Takes the head row's lock (PostgreSQL) or the write lock (SQLite)
    /// until the transaction ends, then reads it: appends are serialized
    /// across every wicketd sharing the store.
    async fn lock(tx: &mut Transaction<'static, Any>) -> Result<Self> {
        let row = sqlx::query("UPDATE audit_chain SET seq = seq WHERE id = 1 RETURNING seq, hash")
            .fetch_one(&mut **tx)
            .await?;
        Ok(Self {
            seq: row.try_get(0)?,
            hash: row.try_get(1)?,
        })
    }

    /// Links `e` after the head; its place and hash.
    fn append(&mut self, link: Link<'_>, e: &AuditRow) -> (i64, String) {
        self.seq += 1;
        self.hash = chain_hash(link, &self.hash, self.seq, e);
        (self.seq, self.hash.clone())
    }

    /// Writes the head back (the transaction's commit makes it so).
    async fn store(self, tx: &mut Transaction<'static, Any>) -> Result<()> {
        sqlx::query("UPDATE audit_chain SET seq = $1, hash = $2 WHERE id = 1")
            .bind(self.seq)
            .bind(self.hash)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// How a link is hashed.
#[derive(Clone, Copy)]
pub enum Link<'a> {
    /// SHA-256, as links were before schema 10 (checked once, when
    /// [`key_chain`] hashes them again).
    Plain,
    /// HMAC-SHA256 with the chain's key; such a hash starts with [`KEYED`].
    Keyed(&'a ChainKey),
}

/// What a keyed link's hash starts with, so a link written without the key
/// (an older wicketd, or a forger) is told apart from a changed one.
pub const KEYED: &str = "k1:";

/// The hash of event `e` at place `seq` after an event whose hash is
/// `prev` (empty for the first), in hex: over `prev`, a newline and the
/// event's fields as a JSON array (unambiguous). A row of session events
/// ([`groups`]) is long and its data already JSON: the array ends with the
/// data's length instead, and the data's bytes follow as they are (no
/// escaping to hash).
pub fn chain_hash(link: Link<'_>, prev: &str, seq: i64, e: &AuditRow) -> String {
    /// Feeds what serde writes straight into the digest or MAC (no copy).
    enum Digest {
        Plain(ring::digest::Context),
        Keyed(ring::hmac::Context),
    }
    impl Digest {
        fn update(&mut self, b: &[u8]) {
            match self {
                Digest::Plain(c) => c.update(b),
                Digest::Keyed(c) => c.update(b),
            }
        }
    }
    impl std::io::Write for Digest {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.update(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut d = match link {
        Link::Plain => Digest::Plain(ring::digest::Context::new(&ring::digest::SHA256)),
        Link::Keyed(k) => Digest::Keyed(ring::hmac::Context::with_key(&k.keys.mac)),
    };
    d.update(prev.as_bytes());
    d.update(b"\n");
    /// The fields as a JSON array, ending with `last`. Serializing plain
    /// strings and integers into memory cannot fail.
    fn fields(d: &mut Digest, seq: i64, e: &AuditRow, last: impl serde::Serialize) {
        let all = (
            seq,
            &e.id,
            e.time_ms,
            &e.kind,
            &e.actor,
            &e.request_id,
            &e.session_id,
            last,
        );
        let _ = serde_json::to_writer(d, &all);
    }
    if e.kind == groups::GROUP_KIND {
        fields(&mut d, seq, e, e.data.len());
        d.update(e.data.as_bytes());
    } else {
        fields(&mut d, seq, e, &e.data);
    }
    match d {
        Digest::Plain(c) => hex(c.finish().as_ref()),
        Digest::Keyed(c) => format!("{KEYED}{}", hex(c.sign().as_ref())),
    }
}

/// Chains the events stored before the chain existed, oldest first.
async fn chain_existing(tx: &mut Transaction<'static, Any>) -> Result<()> {
    let rows = sqlx::query(
        "SELECT id, time, kind, actor, request_id, session_id, data FROM audit_events WHERE seq IS NULL ORDER BY time, id",
    )
    .fetch_all(&mut **tx)
    .await?;
    let mut chain = ChainHead::lock(tx).await?;
    for r in &rows {
        let e = audit_from_row(r)?;
        // Keyed afterwards, by `key_chain` (schema 10).
        let (seq, hash) = chain.append(Link::Plain, &e);
        sqlx::query("UPDATE audit_events SET seq = $1, hash = $2 WHERE id = $3")
            .bind(seq)
            .bind(hash)
            .bind(e.id.as_str())
            .execute(&mut **tx)
            .await?;
    }
    chain.store(tx).await
}

/// One link of the chain as stored.
struct StoredLink {
    seq: i64,
    event: AuditRow,
    hash: String,
    actions: Option<i64>,
}

/// How a stored link stands against the stored link before it.
enum LinkCheck {
    /// Places were skipped: these (first, last) are missing.
    Gap(i64, i64),
    /// Its hash is not what the link's hashing gives after the one before.
    Broken,
    Follows,
}

/// The chain read in order of place, a page at a time, each link checked
/// against the stored hash before it (so one bad link is one problem):
/// what verifying and keying the chain both walk.
#[derive(Default)]
struct ChainWalk {
    /// The last place stepped past, and its stored hash.
    last_seq: i64,
    prev: String,
    /// The last place read, and whether the pages ended.
    read_to: i64,
    done: bool,
}

impl ChainWalk {
    const PAGE: i64 = 2000;

    /// The next page of links; empty at the end.
    async fn page(&mut self, conn: &mut sqlx::AnyConnection) -> Result<Vec<StoredLink>> {
        if self.done {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT id, time, kind, actor, request_id, session_id, data, seq, hash, actions FROM audit_events \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(self.read_to)
        .bind(Self::PAGE)
        .fetch_all(&mut *conn)
        .await?;
        self.done = (rows.len() as i64) < Self::PAGE;
        let page = rows
            .iter()
            .map(|r| {
                Ok(StoredLink {
                    event: audit_from_row(r)?,
                    seq: r.try_get(7)?,
                    hash: r.try_get::<Option<String>, _>(8)?.unwrap_or_default(),
                    actions: r.try_get(9)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(l) = page.last() {
            self.read_to = l.seq;
        }
        Ok(page)
    }

    /// Checks `l`, the next link, as hashed by `link`; then moves past it.
    fn step(&mut self, l: &StoredLink, link: Link<'_>) -> LinkCheck {
        let check = if l.seq != self.last_seq + 1 {
            LinkCheck::Gap(self.last_seq + 1, l.seq - 1)
        } else if chain_hash(link, &self.prev, l.seq, &l.event) != l.hash {
            LinkCheck::Broken
        } else {
            LinkCheck::Follows
        };
        self.last_seq = l.seq;
        self.prev.clone_from(&l.hash);
        check
    }
}

/// What [`key_chain`] found in the chain as it was: kept in
/// `audit_chain.keyed_problems` after a MAC with the chain's key (see
/// [`KeyedProblems::seal`]), reported by every verification.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct KeyedProblems {
    count: u64,
    problems: Vec<String>,
}

impl KeyedProblems {
    const LABEL: &'static [u8] = b"wicket keyed problems\n";

    /// `<hex tag> <json>`: the tag makes a changed or emptied record show.
    fn seal(&self, key: &ChainKey) -> Result<String> {
        let json = serde_json::to_string(self).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(format!("{} {json}", Self::tag(key, &json)))
    }

    /// The record, if `text` is one sealed with `key` (tags compared in
    /// constant time).
    fn open(text: &str, key: &ChainKey) -> Option<Self> {
        let (tag, json) = text.split_once(' ')?;
        let expected = Self::tag(key, json);
        if !crate::auth::ring_eq(expected.as_bytes(), tag.as_bytes()) {
            return None;
        }
        serde_json::from_str(json).ok()
    }

    fn tag(key: &ChainKey, json: &str) -> String {
        hex(ring::hmac::sign(&key.keys.mac, &[Self::LABEL, json.as_bytes()].concat()).as_ref())
    }
}

/// What keying the chain did, for the marker and the log.
struct Keyed {
    events: i64,
    problems: u64,
    head: String,
}

/// Hashes every link again with `key` (schema 10), oldest first, after
/// checking it as it was: an event that did not follow, missing places and
/// a head that did not match are counted (the first 100 kept) in
/// `keyed_problems`, so keying the chain hides nothing a verification
/// would have found before. A non-empty chain is refused when `marker`
/// exists: this CA key set keyed a chain before, so one that is not keyed
/// now was rolled back (or restored from an old backup), which is how
/// someone who can write the store would make their own SHA-256 chain
/// look keyed.
async fn key_chain(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    key: &ChainKey,
    marker: &Path,
) -> Result<Keyed> {
    const PER_UPDATE: usize = 200;
    const KEEP: usize = 100;
    let events: i64 = sqlx::query("SELECT COUNT(*) FROM audit_events")
        .fetch_one(&mut **tx)
        .await?
        .try_get(0)?;
    if events > 0 && marker.exists() {
        return Err(Error::Store(format!(
            "this store's audit chain ({events} events) is not keyed, but this CA key set keyed one before ({}): the store was rolled back to before schema 10, or restored from an older backup. Find out why (a rollback can hide changed events); to key it anyway, remove that file",
            marker.display()
        )));
    }
    let mut found = KeyedProblems::default();
    let mut note = |p: String| {
        found.count += 1;
        if found.problems.len() < KEEP {
            found.problems.push(p);
        }
    };
    let mut walk = ChainWalk::default();
    let mut new_prev = String::new();
    loop {
        let page = walk.page(tx).await?;
        if page.is_empty() {
            break;
        }
        let mut links: Vec<(i64, String)> = Vec::with_capacity(page.len());
        for l in &page {
            match walk.step(l, Link::Plain) {
                LinkCheck::Gap(from, to) => note(format!("events #{from}..#{to} were missing")),
                LinkCheck::Broken => note(format!(
                    "event #{} ({}) did not follow the chain (changed or put in)",
                    l.seq, l.event.id
                )),
                LinkCheck::Follows => {}
            }
            new_prev = chain_hash(Link::Keyed(key), &new_prev, l.seq, &l.event);
            links.push((l.seq, new_prev.clone()));
        }
        // Many links per UPDATE (one statement per event took minutes on
        // a large log, inside the migration's transaction).
        for chunk in links.chunks(PER_UPDATE) {
            let ph = |i| placeholder(backend, i);
            let mut sql = String::from("UPDATE audit_events SET hash = CASE seq");
            for k in 0..chunk.len() {
                sql.push_str(&format!(" WHEN {} THEN {}", ph(2 * k + 1), ph(2 * k + 2)));
            }
            let n = 2 * chunk.len();
            sql.push_str(&format!(
                " ELSE hash END WHERE seq >= {} AND seq <= {}",
                ph(n + 1),
                ph(n + 2)
            ));
            let mut q = sqlx::query(&sql);
            for (seq, hash) in chunk {
                q = q.bind(*seq).bind(hash.as_str());
            }
            let (first, last) = (chunk[0].0, chunk[chunk.len() - 1].0);
            q.bind(first).bind(last).execute(&mut **tx).await?;
        }
    }
    let (last_seq, old_prev) = (walk.last_seq, walk.prev);
    let head = sqlx::query("SELECT seq, hash FROM audit_chain WHERE id = 1")
        .fetch_one(&mut **tx)
        .await?;
    let (head_seq, head_hash): (i64, String) = (head.try_get(0)?, head.try_get(1)?);
    if head_seq != last_seq || head_hash != old_prev {
        note(format!(
            "the chain's head (#{head_seq}) did not match its last event (#{last_seq})"
        ));
    }
    sqlx::query(
        "UPDATE audit_chain SET seq = $1, hash = $2, key_id = $3, keyed_problems = $4 WHERE id = 1",
    )
    .bind(last_seq)
    .bind(new_prev.as_str())
    .bind(key.id())
    .bind(found.seal(key)?)
    .execute(&mut **tx)
    .await?;
    Ok(Keyed {
        events,
        problems: found.count,
        head: new_prev,
    })
}

fn user_from_row(r: &AnyRow, key: &ChainKey) -> Result<UserRecord> {
    let name: String = r.try_get(0)?;
    let totp_secret = r
        .try_get::<Option<String>, _>(4)?
        .map(|t| key.open_secret(&name, &t))
        .transpose()?;
    Ok(UserRecord {
        roles: parse_list("roles", &r.try_get::<String, _>(1)?)?,
        name,
        team: r.try_get(2)?,
        password_hash: r.try_get(3)?,
        totp_secret,
        created_at: r.try_get(5)?,
        disabled: r.try_get::<i64, _>(6)? != 0,
    })
}

/// A description of the storage for messages, without credentials.
pub fn describe(storage: &Storage) -> String {
    match storage {
        Storage::Sqlite => "SQLite".into(),
        Storage::Postgres(_) => format!("PostgreSQL ({})", storage.redacted()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sqlite_store(dir: &std::path::Path) -> Store {
        Store::open(&crate::config::Storage::Sqlite, dir, ChainKey::for_tests())
            .await
            .unwrap()
    }

    /// Creates user `name` with role `dev` (and a TOTP secret).
    async fn add_dev(store: &Store, name: &str, totp: Option<&str>) {
        let user = UserRecord {
            name: name.into(),
            roles: vec!["dev".into()],
            team: None,
            password_hash: None,
            totp_secret: totp.map(str::to_owned),
            created_at: 1,
            disabled: false,
        };
        let event = AuditRow {
            id: format!("e-{name}"),
            time_ms: 1,
            kind: "user_created".into(),
            actor: Some("admin".into()),
            request_id: None,
            session_id: None,
            data: "{}".into(),
        };
        store.create_user(&user, &event).await.unwrap();
    }

    /// Each SQLite connection syncs every commit (`synchronous = FULL`).
    #[tokio::test]
    async fn every_sqlite_connection_syncs_its_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        let mut conns = Vec::new();
        for _ in 0..4 {
            conns.push(store.pool.acquire().await.unwrap());
        }
        for c in &mut conns {
            let v: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut **c)
                .await
                .unwrap();
            assert_eq!(v, 2, "FULL");
        }
    }

    /// A user row that does not decode (edited by hand) is left out of the
    /// list instead of failing it: creating a request lists users.
    #[tokio::test]
    async fn a_user_row_that_does_not_decode_does_not_fail_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        for name in ["ann", "bob"] {
            add_dev(&store, name, None).await;
        }
        sqlx::query("UPDATE users SET roles = 'dev' WHERE name = 'ann'")
            .execute(&store.pool)
            .await
            .unwrap();
        let names: Vec<String> = store
            .list_users()
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.name)
            .collect();
        assert_eq!(names, ["bob"]);
        assert_eq!(
            store.users_with_roles(&["dev".into()]).await.unwrap(),
            ["bob"]
        );
        // An admin's listing names it, and says why.
        let rows = store.list_user_rows().await.unwrap();
        assert_eq!(rows.len(), 2);
        let bad = rows[0].as_ref().unwrap_err();
        assert_eq!(bad.name, "ann");
        assert!(
            bad.reason.contains("column roles is not a JSON list"),
            "{}",
            bad.reason
        );
        assert_eq!(rows[1].as_ref().map(|u| u.name.as_str()), Ok("bob"));
    }

    /// TOTP secrets are stored sealed with the CA key set's key, bound to
    /// their user; those stored in clear before are sealed by migration 20.
    #[tokio::test]
    async fn totp_secrets_are_stored_sealed() {
        let key = ChainKey::for_tests();
        let secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";
        let sealed = key.seal_secret("ann", secret).unwrap();
        assert!(
            sealed.starts_with(SEALED) && !sealed.contains(secret),
            "{sealed}"
        );
        assert_ne!(
            sealed,
            key.seal_secret("ann", secret).unwrap(),
            "fresh nonce"
        );
        assert_eq!(key.open_secret("ann", &sealed).unwrap(), secret);
        for (who, stored, why) in [
            ("bob", sealed.as_str(), "does not open"),
            ("ann", secret, "is not sealed"),
            ("ann", "sealed1:zz", "is not a seal"),
            ("ann", "sealed1:00", "is not a seal"),
        ] {
            let e = key.open_secret(who, stored).unwrap_err().to_string();
            assert!(e.contains(why), "{who} {stored}: {e}");
        }
        let other = ChainKey::for_tests();
        assert!(other.open_secret("ann", &sealed).is_err());

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Storage::Sqlite, dir.path(), key.clone())
            .await
            .unwrap();
        add_dev(&store, "ann", Some(secret)).await;
        // Stored sealed, read as it was.
        let sealed_and_read = |store: Store| async move {
            let stored: String =
                sqlx::query_scalar("SELECT totp_secret FROM users WHERE name = 'ann'")
                    .fetch_one(&store.pool)
                    .await
                    .unwrap();
            assert!(
                stored.starts_with(SEALED) && !stored.contains(secret),
                "{stored}"
            );
            let read = store.get_user("ann").await.unwrap().unwrap();
            assert_eq!(read.totp_secret.as_deref(), Some(secret));
        };
        sealed_and_read(store.clone()).await;
        // A secret stored in clear (before schema 20) is sealed when it runs.
        sqlx::query("UPDATE users SET totp_secret = $1 WHERE name = 'ann'")
            .bind(secret)
            .execute(&store.pool)
            .await
            .unwrap();
        assert!(
            store.get_user("ann").await.is_err(),
            "a clear secret is refused"
        );
        sqlx::query("DELETE FROM schema_migrations WHERE version = 20")
            .execute(&store.pool)
            .await
            .unwrap();
        store.pool.close().await;
        let store = Store::open(&Storage::Sqlite, dir.path(), key)
            .await
            .unwrap();
        sealed_and_read(store).await;
    }

    #[test]
    fn a_user_record_never_prints_its_secrets() {
        let u = UserRecord {
            name: "ann".into(),
            roles: vec!["dev".into()],
            team: None,
            password_hash: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
            totp_secret: Some("JBSWY3DPEHPK3PXP".into()),
            created_at: 1,
            disabled: false,
        };
        let shown = format!("{u:?} {u:#?}");
        assert!(shown.contains("ann") && shown.contains("<set>"), "{shown}");
        assert!(
            !shown.contains("argon2id") && !shown.contains("JBSWY3"),
            "{shown}"
        );
    }

    #[test]
    fn chain_hash_covers_every_field_and_the_previous_hash() {
        let e = AuditRow {
            id: "e1".into(),
            time_ms: 5,
            kind: "login_succeeded".into(),
            actor: Some("alice".into()),
            request_id: None,
            session_id: None,
            data: "{}".into(),
        };
        // SHA-256 of "\n[1,\"e1\",5,\"login_succeeded\",\"alice\",null,null,\"{}\"]".
        let h = chain_hash(Link::Plain, "", 1, &e);
        let sha256 = |input: &[u8]| -> String {
            let digest = ring::digest::digest(&ring::digest::SHA256, input);
            digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
        };
        assert_eq!(
            h,
            sha256(b"\n[1,\"e1\",5,\"login_succeeded\",\"alice\",null,null,\"{}\"]")
        );
        let changed = [
            chain_hash(Link::Plain, "x", 1, &e),
            chain_hash(Link::Plain, "", 2, &e),
            chain_hash(
                Link::Plain,
                "",
                1,
                &AuditRow {
                    actor: None,
                    ..e.clone()
                },
            ),
            chain_hash(
                Link::Plain,
                "",
                1,
                &AuditRow {
                    data: "{ }".into(),
                    ..e.clone()
                },
            ),
        ];
        assert!(changed.iter().all(|c| *c != h));

        // A row of session events: its data's length, then its bytes.
        let g = AuditRow {
            kind: groups::GROUP_KIND.into(),
            data: r#"{"events":[]}"#.into(),
            ..e.clone()
        };
        assert_eq!(
            chain_hash(Link::Plain, "p", 1, &g),
            sha256(b"p\n[1,\"e1\",5,\"session_events\",\"alice\",null,null,13]{\"events\":[]}")
        );

        // Keyed: HMAC-SHA256 over the same bytes, marked; another key gives
        // another hash, and nothing without the key matches it.
        let (k1, k2) = (ChainKey::for_tests(), ChainKey::for_tests());
        let keyed = chain_hash(Link::Keyed(&k1), "", 1, &e);
        let mac = ring::hmac::sign(
            &k1.keys.mac,
            b"\n[1,\"e1\",5,\"login_succeeded\",\"alice\",null,null,\"{}\"]",
        );
        assert_eq!(keyed, format!("{KEYED}{}", hex(mac.as_ref())));
        assert_ne!(keyed, chain_hash(Link::Keyed(&k2), "", 1, &e));
        assert_ne!(keyed, format!("{KEYED}{h}"));
        assert_ne!(k1.id(), k2.id());
        assert_eq!(
            format!("{k1:?}"),
            format!("ChainKey {{ id: {:?} }}", k1.id())
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// Search over rows of session events finds what a search over the
        /// events themselves finds, whatever the filters, the limit and
        /// how the events came in batches (pages of rows included).
        #[test]
        fn search_finds_what_the_events_hold(
            spec in proptest::collection::vec((0usize..3, 0usize..7, 0i64..12, 0u8..12), 200..500),
            cuts in proptest::collection::vec(1usize..120, 1..8),
            queries in proptest::collection::vec(
                (proptest::option::of(0usize..3), proptest::option::of(0usize..7),
                 proptest::option::of(0i64..4_000), proptest::option::of(proptest::bool::ANY), 1i64..300),
                6,
            ),
        ) {
            const SESSIONS: [&str; 3] = ["s1", "s2", "s3"];
            // Mostly statements; a session's runs break at its other events
            // and where its actor changes (rarely).
            const KINDS: [&str; 7] = ["db_query", "db_execute", "db_execute", "db_execute", "db_query", "db_error", "session_note"];
            let mut time = 1_000i64;
            let events: Vec<AuditRow> = spec
                .iter()
                .enumerate()
                .map(|(n, &(s, k, step, flip))| {
                    time += step;
                    let bob = (s == 2) != (flip == 0);
                    AuditRow {
                        id: format!("{time:013}-{n:05}"),
                        time_ms: time,
                        kind: KINDS[k].into(),
                        actor: Some(if bob { "bob" } else { "alice" }.into()),
                        request_id: Some("r1".into()),
                        session_id: Some(SESSIONS[s].into()),
                        data: format!(r#"{{"n":{n},"s":"x \"y\""}}"#),
                    }
                })
                .collect();
            let dir = tempfile::tempdir().map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            rt.block_on(async {
                let store = Store::open(&Storage::Sqlite, dir.path(), ChainKey::for_tests()).await.unwrap();
                let mut rest = &events[..];
                for cut in cuts.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (batch, after) = rest.split_at((*cut).min(rest.len()));
                    store.append_audit_batch(batch).await.unwrap();
                    rest = after;
                }
                for (session, kind, since, bob, limit) in &queries {
                    let f = AuditFilter {
                        session_id: session.map(|s| SESSIONS[s].to_owned()),
                        kind: kind.map(|k| KINDS[k].to_owned()),
                        since_ms: *since,
                        actor: bob.map(|b| if b { "bob" } else { "alice" }.to_owned()),
                        limit: *limit,
                        ..Default::default()
                    };
                    let want: Vec<AuditRow> = events
                        .iter()
                        .filter(|e| {
                            f.session_id.as_ref().is_none_or(|s| e.session_id.as_ref() == Some(s))
                                && f.kind.as_ref().is_none_or(|k| *k == e.kind)
                                && f.actor.as_ref().is_none_or(|a| e.actor.as_ref() == Some(a))
                                && e.time_ms >= f.since_ms.unwrap_or(i64::MIN)
                        })
                        .take(usize::try_from(*limit).unwrap())
                        .cloned()
                        .collect();
                    assert_eq!(store.search_audit(&f).await.unwrap(), want, "{f:?}");
                }
                let v = store.verify_audit(10).await.unwrap();
                assert_eq!((v.events, v.problem_count), (events.len() as u64, 0), "{v:?}");
            });
        }
    }
}
