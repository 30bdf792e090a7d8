//! The daemon's services: login, certificate reissue, what a user can reach.
//! Handlers in `api` parse and serialize; decisions come from `policy`,
//! certificate bytes from `ca`, persistence from `store`. Time is passed in.

use crate::audit::AuditEvent;
use crate::auth::{self, Guesses};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::sessions::StandingBasis;
use crate::store::{Reservation, Store, UserRecord};
use chrono::{DateTime, Utc};
use ring::rand::SystemRandom;
use std::net::IpAddr;
use std::sync::Arc;
use wicket_api::{
    Certificates, DatabaseInfo, KubeClusterInfo, LoginRequest, Me, NodeInfo, ReissueRequest,
    Resources,
};
use wicket_ca::{
    AuthorityKeys, Identity, SshCertKind, SshCertificateRequest, SshPermissions, SshPublicKey,
    TrustedX509Cas, Validity, X509Ca,
};
use wicket_policy::{
    AccessRequest, Decision, GrantScope, ResourceKind, RoleSet, ScopedRole, Subject,
};

/// Certificates without grants start this much before they are issued, so a
/// wicketd or sshd whose clock runs a little behind accepts them (as
/// Teleport's do). Grant certificates keep the grant's exact window.
const CLOCK_SKEW_SECS: i64 = 60;

/// Everything a request handler needs; shared behind an `Arc`.
pub struct Wicket {
    pub config: Config,
    pub store: Store,
    /// Shared with the listeners' TLS, which renews its certificates.
    pub keys: std::sync::Arc<AuthorityKeys>,
    pub trusted_tls: TrustedX509Cas,
    pub sessions: std::sync::Arc<crate::sessions::Sessions>,
    /// Users and grants in force, for access decisions (see [`crate::index`]).
    pub index: crate::index::Shared,
    /// What the session watcher last read of each live grant and user.
    pub(crate) checks: crate::sessions::Checks,
    /// Session events (statements, commands) on their way to the store.
    pub audit_sink: crate::audit::AuditSink,
    /// The proxy listeners' bound ports, for clients (`wicket db connect`).
    pub proxy_ports: wicket_api::ProxyPorts,
    pub(crate) rng: SystemRandom,
    /// Which rate-limit refusals are recorded (see [`crate::auth::RefusalLog`]).
    refusals: std::sync::Mutex<crate::auth::RefusalLog>,
    /// Which refusals of signed-in users' calls are recorded (see
    /// [`crate::auth::DenialLog`]).
    pub(crate) denials: std::sync::Mutex<crate::auth::DenialLog>,
    /// Password checks that may run at once: each argon2id check takes
    /// 19 MiB and tens of milliseconds of CPU, so clients trying many
    /// passwords at once (from many sources) cannot take the memory.
    pub password_checks: std::sync::Arc<tokio::sync::Semaphore>,
}

/// How long a login waits for a place among the password checks before it
/// is answered "busy, try again".
const PASSWORD_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Checks `password` against `hash` (none: a dummy of the same cost) off
/// the async workers, since argon2id takes tens of milliseconds of CPU.
/// The check holds `place` until it is done, not its caller: a login whose
/// client went away (its future dropped) cannot free the place of a check
/// still running.
fn spawn_password_check(
    place: tokio::sync::OwnedSemaphorePermit,
    password: wicket_api::Secret,
    hash: Option<String>,
) -> tokio::task::JoinHandle<bool> {
    tokio::task::spawn_blocking(move || {
        let ok = auth::verify_password(password.expose(), hash.as_deref());
        drop(place);
        ok
    })
}

/// Password checks at once: two per CPU, at least 2 and at most 16.
fn password_check_places() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get() * 2)
        .clamp(2, 16)
}

impl std::fmt::Debug for Wicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wicket")
            .field("cluster", &self.config.cluster_name)
            .finish_non_exhaustive()
    }
}

/// Every role name in force, scoped or not (a certificate's identity).
pub fn role_names(roles: &[String], scoped: &[ScopedRole]) -> Vec<String> {
    let mut out = roles.to_vec();
    for s in scoped {
        if !out.contains(&s.role) {
            out.push(s.role.clone());
        }
    }
    out
}

/// Role names for display: scoped ones as `dba (only on prod-pg)`.
pub fn describe_roles(roles: &[String], scoped: &[ScopedRole]) -> Vec<String> {
    roles
        .iter()
        .cloned()
        .chain(scoped.iter().map(ToString::to_string))
        .collect()
}

/// What a caller holds now: see [`Wicket::roles_in_force`].
#[derive(Debug, Clone, Default)]
pub struct InForce {
    /// Standing roles (while the login behind the certificate lasts) plus
    /// granted roles of grants approved before Wicket recorded where they
    /// were judged: they hold everywhere their labels reach.
    pub roles: Vec<String>,
    /// Granted roles of the other grants: each holds only on the resources
    /// its request named, or reached when it was approved.
    pub scoped: Vec<ScopedRole>,
    /// The certificate's request IDs whose grants are active now.
    pub request_ids: Vec<String>,
    /// Why each of the certificate's other requests does not count, and
    /// that standing roles do not once the login has ended.
    pub not_counted: Vec<String>,
    /// The grants in force, each with where its roles hold.
    pub grants: Vec<GrantScope>,
    /// The requests of those grants, as read for this decision.
    pub requests: Vec<Arc<AccessRequest>>,
    /// The standing roles that count (none once the login has ended).
    pub standing: Vec<String>,
}

/// The outcome of [`Wicket::decide_session`].
#[derive(Debug, Clone)]
pub struct SessionDecision {
    pub user: String,
    /// Standing plus granted roles in force now (see [`InForce`]).
    pub roles: Vec<String>,
    pub scoped: Vec<ScopedRole>,
    /// The certificate's request IDs whose grants are active now.
    pub request_ids: Vec<String>,
    pub decision: Decision,
    /// When a session opened on this decision ends (Unix seconds, with
    /// `session.disconnect_on_expiry`): the certificate's end, or, when the
    /// grants in force behind it would not allow it alone, the login's end
    /// if that comes first.
    pub valid_until: i64,
    /// `None` when the grants in force allow it alone; else what stands
    /// behind it besides them (for [`crate::sessions::SessionInfo`]).
    pub basis: Option<Arc<StandingBasis>>,
    /// The standing roles in force (empty once the login has ended).
    pub standing_roles: Vec<String>,
    /// The roles of the grants in force alone (what holds once the login
    /// ends), as `roles` and `scoped` are for all.
    pub granted: (Vec<String>, Vec<ScopedRole>),
    /// The requests of the grants in force, as read for the decision: the
    /// session watcher's start ([`Wicket::open_session`]).
    pub requests: Vec<Arc<AccessRequest>>,
}

/// A caller's standing roles in force (see [`Wicket::standing_in_force`]).
pub(crate) struct Standing {
    pub roles: Vec<String>,
    /// Why the user's standing roles do not count, when they do not.
    pub ended: Option<String>,
}

impl Standing {
    /// A refusal's `reason`, saying why standing roles did not count.
    pub fn explain(&self, reason: String) -> String {
        explain_refusal(reason, self.ended.as_deref())
    }
}

/// A refusal's `reason`, with why the user's standing roles did not count
/// (`ended`, from [`Standing`]) when they did not.
pub(crate) fn explain_refusal(reason: String, ended: Option<&str>) -> String {
    match ended {
        Some(ended) => format!("{reason}; {ended}"),
        None => reason,
    }
}

/// The caller, as proven by a verified client certificate.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: String,
    pub request_ids: Vec<String>,
    pub source: IpAddr,
    /// When the password login behind the certificate ends (Unix seconds):
    /// no certificate is reissued from it after that.
    pub login_until: i64,
    /// When the certificate itself ends (Unix seconds): a session opened
    /// with it ends then (`session.disconnect_on_expiry`).
    pub valid_until: i64,
}

impl Caller {
    /// The caller a verified certificate with `identity`, valid until
    /// `not_after`, speaks for. A certificate made before identities carried
    /// the login's end stands for a login that ends with it.
    pub fn of_certificate(identity: &Identity, not_after: i64, source: IpAddr) -> Self {
        Caller {
            user: identity.user.clone(),
            request_ids: identity.request_ids.clone(),
            source,
            login_until: identity.login_ends(not_after),
            valid_until: not_after,
        }
    }

    /// Why the password login behind the certificate no longer counts, if
    /// it has ended.
    fn login_ended(&self, now: DateTime<Utc>) -> Option<String> {
        if wicket_policy::login_lasts(self.login_until, now.timestamp()) {
            return None;
        }
        let ended = DateTime::<Utc>::from_timestamp(self.login_until, 0).unwrap_or_default();
        Some(format!(
            "the login behind this certificate ended at {}",
            ended.to_rfc3339()
        ))
    }
}

const MAX_USER_LEN: usize = 64;
const MAX_KEY_LEN: usize = 16 * 1024;

fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USER_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// Parsed and proven public keys from a login or reissue request.
struct ClientKeys {
    ssh: SshPublicKey,
    tls_spki: Vec<u8>,
}

fn parse_client_keys(ssh_public_key: &str, tls_csr_pem: &str) -> Result<ClientKeys> {
    if ssh_public_key.len() > MAX_KEY_LEN || tls_csr_pem.len() > MAX_KEY_LEN {
        return Err(Error::BadRequest("public key or CSR is too large".into()));
    }
    let ssh = SshPublicKey::parse_user_key(ssh_public_key)
        .map_err(|e| Error::BadRequest(format!("ssh_public_key: {e}")))?;
    let tls_spki = X509Ca::spki_from_csr(tls_csr_pem.as_bytes())
        .map_err(|e| Error::BadRequest(format!("tls_csr_pem: {e}")))?;
    Ok(ClientKeys { ssh, tls_spki })
}

impl Wicket {
    /// Must run inside a Tokio runtime (it starts the audit writer).
    pub fn new(
        config: Config,
        store: Store,
        keys: impl Into<std::sync::Arc<AuthorityKeys>>,
        proxy_ports: wicket_api::ProxyPorts,
    ) -> Result<Self> {
        let keys = keys.into();
        let trusted_tls = TrustedX509Cas::new([keys.tls.cert_der().to_vec()])?;
        let audit_sink = crate::audit::AuditSink::start(store.clone(), &config.audit);
        Ok(Self {
            audit_sink,
            proxy_ports,
            config,
            store,
            keys,
            trusted_tls,
            sessions: Default::default(),
            checks: Default::default(),
            index: Default::default(),
            rng: SystemRandom::new(),
            refusals: Default::default(),
            denials: Default::default(),
            password_checks: std::sync::Arc::new(tokio::sync::Semaphore::new(
                password_check_places(),
            )),
        })
    }

    pub(crate) async fn audit(&self, event: AuditEvent, now: DateTime<Utc>) -> Result<()> {
        tracing::info!(kind = event.kind(), actor = event.actor(), "audit");
        self.store
            .append_audit(&event.to_row(now.timestamp_millis()))
            .await
    }

    /// Refuses what needs a live password login (new certificates, new or
    /// reviewed requests, break-glass) once the login behind `caller`'s
    /// certificate has ended, though a grant certificate may outlive it;
    /// a refusal is audited as a denial of `action`.
    pub(crate) async fn require_login(
        &self,
        caller: &Caller,
        action: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let Some(reason) = caller.login_ended(now) else {
            return Ok(());
        };
        let refused = Error::Unauthenticated(format!("{reason}; run `wicket login`"));
        Err(self
            .refusal_audited(&caller.user, action, reason, refused, now)
            .await)
    }

    /// The caller's standing roles in force: none once the password login
    /// behind their certificate has ended (a grant certificate may outlive
    /// it). API decisions that stand on standing roles alone (reading the
    /// audit log, recordings, others' requests) then refuse.
    pub(crate) fn standing_in_force(
        &self,
        caller: &Caller,
        user: &UserRecord,
        now: DateTime<Utc>,
    ) -> Standing {
        if wicket_policy::login_lasts(caller.login_until, now.timestamp()) {
            return Standing {
                roles: self.standing_roles(user),
                ended: None,
            };
        }
        let ended = DateTime::<Utc>::from_timestamp(caller.login_until, 0).unwrap_or_default();
        Standing {
            roles: Vec::new(),
            ended: Some(format!(
                "standing roles ended with the login behind this certificate at {} (run `wicket login`)",
                ended.to_rfc3339()
            )),
        }
    }

    /// The user's standing roles that exist in the current policy.
    pub(crate) fn standing_roles(&self, user: &UserRecord) -> Vec<String> {
        user.roles
            .iter()
            .filter(|r| self.config.policy.roles.contains(r))
            .cloned()
            .collect()
    }

    /// Password (+ TOTP) login. Rate-limited per user and per source; every
    /// outcome is audited; only public keys are received.
    pub async fn login(
        &self,
        req: LoginRequest,
        source: IpAddr,
        now: DateTime<Utc>,
    ) -> Result<Certificates> {
        if !valid_user_name(&req.user) {
            return Err(Error::BadRequest(
                "user: must be 1-64 characters of [A-Za-z0-9._@-]".into(),
            ));
        }
        let keys = parse_client_keys(&req.ssh_public_key, &req.tls_csr_pem)?;
        let src = source.to_string();
        // A place among the checks first: a login that gets none is not
        // counted as an attempt.
        let place = self.password_checks.clone();
        let place = tokio::time::timeout(PASSWORD_CHECK_WAIT, place.acquire_owned())
            .await
            .ok()
            .and_then(|p| p.ok())
            .ok_or_else(|| {
                Error::Busy("too many logins are being checked; try again in a moment".into())
            })?;
        // Failed logins in a user's name, from anywhere, reach the user's
        // limit; a login with a TOTP code still gets checked then (its
        // source's own limit holds), and lets in only the user's password
        // with a fresh code from their device.
        let attempt = self
            .refuse_when_rate_limited(Guesses::Login, &req.user, source, now, req.otp.is_some())
            .await?;
        // Past that limit, codes are guessed against a budget of their own
        // (as many as the user's limit), which only an attempt with the
        // right password spends: one who does not know it cannot lock the
        // user out, and one who does gets no more code guesses, from
        // however many sources, than before.
        let code_guess = match attempt.past_user_limit {
            None => None,
            Some(retry_after_secs) => {
                let key = format!("code-past-limit:{}", req.user);
                let limits = &self.config.auth;
                let reserved = self
                    .store
                    .reserve_login_attempt(
                        &key,
                        &key,
                        now.timestamp_millis(),
                        (now - limits.failure_window).timestamp_millis(),
                        (i64::from(limits.max_failures_per_user), i64::MAX),
                    )
                    .await?;
                match reserved {
                    Reservation::Granted(id) => Some(id),
                    _ => {
                        self.store.release_login_attempt(&attempt.id).await?;
                        return Err(Error::RateLimited { retry_after_secs });
                    }
                }
            }
        };

        let user = self.store.get_user(&req.user).await?;
        let hash = user.as_ref().and_then(|u| u.password_hash.clone());
        let password_ok = spawn_password_check(place, req.password.clone(), hash)
            .await
            .map_err(|e| Error::Internal(format!("password check: {e}")))?;
        let failure = match (&user, password_ok) {
            (None, _) => Some("unknown user"),
            (Some(_), false) => Some("wrong password"),
            (Some(u), true) if u.disabled => Some("user is disabled"),
            (Some(u), true) => match (&u.totp_secret, &req.otp) {
                (None, _) => None,
                (Some(_), None) => Some("OTP code required"),
                (Some(secret), Some(code)) => {
                    match auth::verify_totp(secret, code.expose(), now.timestamp()) {
                        None => Some("wrong OTP code"),
                        Some(step) => {
                            if self.store.consume_totp_step(&u.name, step).await? {
                                None
                            } else {
                                Some("OTP code already used")
                            }
                        }
                    }
                }
            },
        };
        let past_limit = attempt.past_user_limit;
        let failure = match (failure, &user, past_limit) {
            (None, Some(u), Some(_)) if u.totp_secret.is_none() => Some("no second factor"),
            (failure, _, _) => failure,
        };
        if let Some(id) = &code_guess {
            // Spent only by a code that was checked, after the right
            // password, and failed.
            let code_wrong = password_ok
                && failure.is_some()
                && user
                    .as_ref()
                    .is_some_and(|u| !u.disabled && u.totp_secret.is_some());
            if code_wrong {
                self.store.confirm_login_failure(id).await?;
            } else {
                self.store.release_login_attempt(id).await?;
            }
        }
        let user = match (failure, user) {
            (None, Some(u)) => u,
            (reason, _) => {
                let reason = reason.unwrap_or("unknown user");
                let event = AuditEvent::LoginFailed {
                    user: req.user.clone(),
                    source: src.clone(),
                    reason: match past_limit {
                        Some(_) => format!(
                            "{reason} (past the user's failure limit: only the password with a fresh TOTP code logs in)"
                        ),
                        None => reason.into(),
                    },
                };
                self.record_failure(attempt, event, now).await?;
                // Past the limit, every failure is the limit's refusal:
                // which part was wrong is not told.
                if let Some(retry_after_secs) = past_limit {
                    return Err(Error::RateLimited { retry_after_secs });
                }
                // The client learns nothing of which part was wrong (the
                // audit event says): naming an OTP problem would tell whoever
                // guesses that the password was right. The message depends
                // only on whether a code was sent.
                return Err(Error::Unauthenticated(
                    login_refusal(req.otp.is_some()).into(),
                ));
            }
        };
        self.store
            .clear_login_failures(
                (&attempt.user_key, &attempt.source_key, &attempt.id),
                now.timestamp_millis(),
            )
            .await?;
        let method = if user.totp_secret.is_some() {
            "password+totp"
        } else {
            "password"
        };
        let roles = self.standing_roles(&user);
        let window = Validity::new(
            now.timestamp() - CLOCK_SKEW_SECS,
            (now + self.config.login_ttl).timestamp(),
        )?;
        self.issue(
            &user.name,
            roles,
            Vec::new(),
            Vec::new(),
            window,
            window.not_after,
            &keys,
            method,
            &src,
            now,
        )
        .await
    }

    /// Refuses (and audits) a password or code check of kind `kind` for
    /// `user` from `source` when either has failed too often within
    /// `auth.failure_window`, counting the checks under way (on every
    /// wicketd sharing the store) as failures. Otherwise the check is under
    /// way, stored as a failure until it is released (it went well) or
    /// confirmed ([`Self::record_failure`]). With `past_user`, a check over
    /// the user's limit alone goes ahead too, marked
    /// ([`crate::auth::Attempt::past_user_limit`]).
    pub(crate) async fn refuse_when_rate_limited(
        &self,
        kind: Guesses,
        user: &str,
        source: IpAddr,
        now: DateTime<Utc>,
        past_user: bool,
    ) -> Result<crate::auth::Attempt> {
        let limits = &self.config.auth;
        let window_start = now - limits.failure_window;
        let (user_key, source_key) = kind.keys(user, source);
        let reserved = self
            .store
            .reserve_login_check(
                &user_key,
                &source_key,
                now.timestamp_millis(),
                window_start.timestamp_millis(),
                (
                    i64::from(limits.max_failures_per_user),
                    i64::from(limits.max_failures_per_source),
                ),
                past_user,
            )
            .await?;
        let retry = |oldest: Option<i64>| match oldest {
            // Rounded up: a client that waits this long is let in.
            Some(oldest) => {
                let left_ms =
                    oldest + limits.failure_window.num_milliseconds() - now.timestamp_millis();
                ((left_ms + 999) / 1000).max(1) as u64
            }
            // Only checks under way fill the budget: they end in moments.
            None => 1,
        };
        let retry = match reserved {
            Reservation::Granted(id) => {
                return Ok(crate::auth::Attempt {
                    id,
                    user_key,
                    source_key,
                    past_user_limit: None,
                })
            }
            Reservation::PastUserLimit {
                id,
                oldest_failure_ms,
            } => {
                return Ok(crate::auth::Attempt {
                    id,
                    user_key,
                    source_key,
                    past_user_limit: Some(retry(oldest_failure_ms)),
                })
            }
            Reservation::Refused { oldest_failure_ms } => retry(oldest_failure_ms),
        };
        let record = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(&user_key, &source_key, now);
        if let Some(unrecorded) = record {
            self.audit(
                AuditEvent::LoginRateLimited {
                    user: user.to_owned(),
                    source: source.to_string(),
                    retry_after_secs: retry,
                    unrecorded_for_user: unrecorded.for_user,
                    unrecorded_from_source: unrecorded.from_source,
                },
                now,
            )
            .await?;
        }
        Err(Error::RateLimited {
            retry_after_secs: retry,
        })
    }

    /// Confirms `attempt` as a failed check, with its audit event (counted
    /// by [`Self::refuse_when_rate_limited`]).
    pub(crate) async fn record_failure(
        &self,
        attempt: crate::auth::Attempt,
        event: AuditEvent,
        now: DateTime<Utc>,
    ) -> Result<()> {
        tracing::info!(kind = event.kind(), actor = event.actor(), "audit");
        self.store
            .record_login_failure(
                (&attempt.id, &attempt.user_key, &attempt.source_key),
                now.timestamp_millis(),
                (now - self.config.auth.failure_window * 4).timestamp_millis(),
                &event.to_row(now.timestamp_millis()),
            )
            .await
    }

    /// New certificates for new keys, authenticated by the current client
    /// certificate (never the password again), within the password login it
    /// was issued under: a certificate without grants ends when that login
    /// does, and none is issued after it ended (a certificate for grants is
    /// valid for the grants' window, which may run past it).
    pub async fn reissue(
        &self,
        caller: &Caller,
        req: ReissueRequest,
        now: DateTime<Utc>,
    ) -> Result<Certificates> {
        let keys = parse_client_keys(&req.ssh_public_key, &req.tls_csr_pem)?;
        self.require_login(caller, "certificates.reissue", now)
            .await?;
        let user = self.active_user(caller).await?;
        let mut ids = req.request_ids.clone();
        ids.sort();
        ids.dedup();
        let grants = self.active_grants(&user.name, &ids, now).await?;
        let scopes: Vec<GrantScope> = grants.iter().map(AccessRequest::scope).collect();
        let (roles, scoped) = self.roles_of_grants(&user, &scopes);
        // A certificate for grants is valid exactly for their common window;
        // without grants, for what is left of the login.
        let window = if grants.is_empty() {
            let end = (now + self.config.login_ttl)
                .timestamp()
                .min(caller.login_until);
            Validity::new(now.timestamp() - CLOCK_SKEW_SECS, end)?
        } else {
            let start = grants
                .iter()
                .filter_map(|g| g.starts_at)
                .max()
                .unwrap_or(now);
            let end = grants
                .iter()
                .filter_map(|g| g.expires_at)
                .min()
                .unwrap_or(now);
            Validity::new(start.timestamp(), end.timestamp()).map_err(|_| {
                Error::Forbidden("the requested grants have no time in common".into())
            })?
        };
        self.issue(
            &user.name,
            roles,
            scoped,
            ids,
            window,
            caller.login_until,
            &keys,
            "certificate",
            &caller.source.to_string(),
            now,
        )
        .await
    }

    /// The caller's user record, if it exists and is enabled: from the
    /// index when it vouches for it, from the store otherwise.
    pub(crate) async fn active_user(&self, caller: &Caller) -> Result<std::sync::Arc<UserRecord>> {
        if let Some(u) = self.index.read().user(&caller.user, crate::clock::now()) {
            return Ok(u);
        }
        match self.store.get_user(&caller.user).await? {
            Some(u) if !u.disabled => Ok(std::sync::Arc::new(u)),
            _ => Err(Error::Unauthenticated(format!(
                "user {:?} no longer exists or is disabled",
                caller.user
            ))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn issue(
        &self,
        user: &str,
        roles: Vec<String>,
        scoped: Vec<ScopedRole>,
        request_ids: Vec<String>,
        window: Validity,
        login_until: i64,
        keys: &ClientKeys,
        method: &str,
        source: &str,
        now: DateTime<Utc>,
    ) -> Result<Certificates> {
        let policy = &self.config.policy;
        let subject = Subject {
            user,
            roles: &roles,
            scoped: &scoped,
        };
        let principals = policy.roles.principals(&subject);
        let (port, agent, x11) = policy.roles.forwarding(&subject);
        let identity = Identity {
            user: user.to_owned(),
            roles: role_names(&roles, &scoped),
            request_ids: request_ids.clone(),
            login_until: Some(login_until),
        };
        let key_id = if request_ids.is_empty() {
            format!("user={user}")
        } else {
            format!("user={user} requests={}", request_ids.join(","))
        };
        let serial = wicket_ca::random_serial(&self.rng)?;
        let ssh_cert = self.keys.ssh_user.issue_openssh(
            &SshCertificateRequest {
                public_key: &keys.ssh,
                kind: SshCertKind::User,
                key_id: &key_id,
                principals: &principals,
                serial,
                validity: window,
                permissions: SshPermissions {
                    pty: true,
                    port_forwarding: port,
                    agent_forwarding: agent,
                    x11_forwarding: x11,
                    user_rc: false,
                },
                identity: Some(&identity),
            },
            &self.rng,
        )?;
        let tls =
            self.keys
                .tls
                .issue_client(&keys.tls_spki, user, Some(&identity), window, &self.rng)?;
        let tls_serial = tls.serial_hex.clone();
        let ts = |t: i64| DateTime::<Utc>::from_timestamp(t, 0).unwrap_or_default();
        self.audit(
            AuditEvent::LoginSucceeded {
                user: user.to_owned(),
                source: source.to_owned(),
                method: method.to_owned(),
                roles: roles.clone(),
                principals: principals.clone(),
                request_ids: request_ids.clone(),
                valid_after: ts(window.not_before),
                valid_before: ts(window.not_after),
                ssh_serial: serial,
                ssh_key_fingerprint: keys.ssh.fingerprint(),
                tls_serial,
            },
            now,
        )
        .await?;
        Ok(Certificates {
            cluster_name: self.config.cluster_name.clone(),
            user: user.to_owned(),
            roles,
            principals,
            request_ids,
            valid_after: ts(window.not_before),
            valid_before: ts(window.not_after),
            ssh_certificate: ssh_cert,
            tls_certificate_pem: tls.pem(),
            tls_ca_pem: self.keys.tls.cert_pem(),
            ssh_user_ca: self.keys.ssh_user.public_key_openssh("wicket-user-ca"),
            // The proxy's host CA, not the nodes': users trust only it.
            ssh_host_ca: self
                .keys
                .ssh_proxy
                .public_key_openssh("wicket-proxy-host-ca"),
        })
    }

    pub async fn me(&self, caller: &Caller) -> Result<Me> {
        let user = self.active_user(caller).await?;
        let InForce {
            roles,
            scoped,
            request_ids: active,
            standing,
            ..
        } = self
            .roles_in_force(&user, caller, crate::clock::now())
            .await;
        Ok(Me {
            user: user.name.clone(),
            roles: describe_roles(&roles, &scoped),
            standing_roles: standing,
            request_ids: active,
            team: user.team.clone(),
        })
    }

    /// Standing roles plus the granted roles of the caller's certificate's
    /// requests that are active now (from the grant index when it vouches
    /// for them, else re-read from the store, so a revoked, dropped or
    /// expired grant does not count), those request IDs, and why each of
    /// the others does not count.
    ///
    /// Standing roles last as long as the password login behind the
    /// certificate: a grant certificate may outlive the login, but then
    /// only its grants count (else a dropped or revoked grant would leave
    /// its certificate good for standing access until the grant's end).
    pub async fn roles_in_force(
        &self,
        user: &UserRecord,
        caller: &Caller,
        now: DateTime<Utc>,
    ) -> InForce {
        let mut active = Vec::new();
        let mut grants = Vec::new();
        let mut requests = Vec::new();
        let mut not_counted = Vec::new();
        for id in &caller.request_ids {
            // The index vouches for grants in force; anything else (and the
            // reason it does not count) comes from the store.
            let indexed = self.index.read().grant(&user.name, id, now);
            let found = match indexed {
                Some(g) => Ok(vec![g]),
                None => self
                    .active_grants(&user.name, std::slice::from_ref(id), now)
                    .await
                    .map(|g| g.into_iter().map(Arc::new).collect()),
            };
            match found {
                Ok(g) => {
                    grants.extend(g.iter().map(|r| r.scope()));
                    requests.extend(g);
                    active.push(id.clone());
                }
                Err(e) => not_counted.push(e.to_string()),
            }
        }
        let Standing {
            roles: standing,
            ended,
        } = self.standing_in_force(caller, user, now);
        not_counted.extend(ended);
        let (roles, scoped) = wicket_policy::roles_of_grants(standing.clone(), &grants);
        InForce {
            roles,
            scoped,
            request_ids: active,
            not_counted,
            grants,
            requests,
            standing,
        }
    }

    /// Standing roles plus the roles of `grants` where they hold (see
    /// [`wicket_policy::roles_of_grants`]).
    fn roles_of_grants(
        &self,
        user: &UserRecord,
        grants: &[GrantScope],
    ) -> (Vec<String>, Vec<ScopedRole>) {
        wicket_policy::roles_of_grants(self.standing_roles(user), grants)
    }

    /// The one authorization decision for a proxied connection. Grants are
    /// those in force now ([`Wicket::roles_in_force`]: a revoked, dropped
    /// or expired grant does not count even while the certificate is
    /// valid); `decide` is the policy call. A denial names what is missing: the grants behind the
    /// certificate that no longer count, or that there is none.
    ///
    /// When standing roles count, an allowed session is asked about once
    /// more, for the grants alone: if they would not allow it, it stands on
    /// the standing roles, so it ends with the login and when they change
    /// ([`SessionDecision::basis`]).
    pub async fn decide_session(
        &self,
        caller: &Caller,
        now: DateTime<Utc>,
        decide: impl Fn(&RoleSet, &Subject<'_>) -> Decision + Send + Sync + 'static,
    ) -> Result<SessionDecision> {
        let user = self.active_user(caller).await?;
        let InForce {
            roles,
            scoped,
            request_ids: active,
            not_counted,
            grants,
            requests,
            standing,
        } = self.roles_in_force(&user, caller, now).await;
        let subject = Subject {
            user: &user.name,
            roles: &roles,
            scoped: &scoped,
        };
        let mut decision = decide(&self.config.policy.roles, &subject);
        if !decision.allowed {
            let mut why = not_counted;
            if caller.request_ids.is_empty() {
                why.push("no access request grant in the certificate (request one, then `wicket login --request-id ID`)".into());
            }
            if !why.is_empty() {
                decision.reason = format!("{}; {}", why.join("; "), decision.reason);
            }
        }
        let granted = wicket_policy::roles_of_grants(Vec::new(), &grants);
        let on_standing = decision.allowed
            && !standing.is_empty()
            && (grants.is_empty() || {
                let alone = Subject {
                    user: &user.name,
                    roles: &granted.0,
                    scoped: &granted.1,
                };
                !decide(&self.config.policy.roles, &alone).allowed
            });
        let valid_until =
            wicket_policy::session_end(caller.valid_until, caller.login_until, !on_standing);
        let basis = on_standing.then(|| {
            Arc::new(StandingBasis {
                grants,
                decide: Arc::new(decide),
            })
        });
        Ok(SessionDecision {
            user: user.name.clone(),
            roles,
            scoped,
            request_ids: active,
            decision,
            valid_until,
            basis,
            standing_roles: standing,
            granted,
            requests,
        })
    }

    /// What the caller can reach now, by the policy's decision.
    pub async fn resources(&self, caller: &Caller) -> Result<Resources> {
        let user = self.active_user(caller).await?;
        let InForce { roles, scoped, .. } = self
            .roles_in_force(&user, caller, crate::clock::now())
            .await;
        let subject = Subject {
            user: &user.name,
            roles: &roles,
            scoped: &scoped,
        };
        let policy = &self.config.policy;
        let mut out = Resources {
            proxies: self.proxy_ports.clone(),
            ..Resources::default()
        };
        for (r, a, b) in policy.roles.reachable(&subject, &policy.resources) {
            match r.kind {
                ResourceKind::Node => out.nodes.push(NodeInfo {
                    name: r.name.clone(),
                    address: r.address.clone(),
                    labels: r.labels.clone(),
                    logins: a,
                }),
                ResourceKind::Database => out.databases.push(DatabaseInfo {
                    name: r.name.clone(),
                    labels: r.labels.clone(),
                    names: a,
                    users: b,
                }),
                ResourceKind::KubeCluster => out.kube_clusters.push(KubeClusterInfo {
                    name: r.name.clone(),
                    labels: r.labels.clone(),
                    groups: a,
                    users: b,
                }),
            }
        }
        Ok(out)
    }

    /// Audit search; who may read what is the policy's decision. A search
    /// by session alone is narrowed to the caller's own events when the
    /// caller may not read everyone's (so users can replay their sessions).
    pub async fn search_audit(
        &self,
        caller: &Caller,
        mut filter: crate::store::AuditFilter,
    ) -> Result<Vec<wicket_api::AuditEventView>> {
        let user = self.active_user(caller).await?;
        let now = crate::clock::now();
        let standing = self.standing_in_force(caller, &user, now);
        let subject = Subject::new(&user.name, &standing.roles);
        let policy = &self.config.policy.roles;
        if filter.actor.is_none()
            && filter.session_id.is_some()
            && !policy.decide_audit_read(&subject, None).allowed
        {
            filter.actor = Some(user.name.clone());
        }
        let decision = policy.decide_audit_read(&subject, filter.actor.as_deref());
        if !decision.allowed {
            let reason = standing.explain(decision.reason);
            return Err(self
                .deny_audited(&user.name, "audit.search", reason, now)
                .await);
        }
        let rows = self
            .store
            .search_audit(&crate::store::AuditFilter {
                limit: filter.limit.clamp(1, 10_000),
                ..filter
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| wicket_api::AuditEventView {
                id: r.id,
                time: DateTime::<Utc>::from_timestamp_millis(r.time_ms).unwrap_or_default(),
                kind: r.kind,
                actor: r.actor,
                request_id: r.request_id,
                session_id: r.session_id,
                data: serde_json::from_str(&r.data).unwrap_or(serde_json::Value::Null),
            })
            .collect())
    }
}

impl Wicket {
    /// Checks the whole audit hash chain (for those who may read everyone's
    /// events).
    pub async fn verify_audit(&self, caller: &Caller) -> Result<wicket_api::AuditVerifyView> {
        let user = self.active_user(caller).await?;
        let now = crate::clock::now();
        let standing = self.standing_in_force(caller, &user, now);
        let subject = Subject::new(&user.name, &standing.roles);
        let decision = self.config.policy.roles.decide_audit_read(&subject, None);
        if !decision.allowed {
            let reason = standing.explain(decision.reason);
            return Err(self
                .deny_audited(&user.name, "audit.verify", reason, now)
                .await);
        }
        let v = self.store.verify_audit(100).await?;
        Ok(wicket_api::AuditVerifyView {
            intact: v.problem_count == 0,
            events: v.events,
            head_seq: v.head_seq,
            head_hash: v.head_hash,
            problems: v.problems,
            problem_count: v.problem_count,
        })
    }
}

/// A user's standing roles must be some, each defined by the policy.
fn check_standing_roles(config: &Config, roles: &[String]) -> Result<()> {
    if roles.is_empty() {
        return Err(Error::BadRequest(
            "a user needs at least one role (--roles)".into(),
        ));
    }
    for r in roles {
        if !config.policy.roles.contains(r) {
            let known: Vec<&str> = config.policy.roles.names().collect();
            return Err(Error::BadRequest(format!(
                "unknown role {r:?}; the configuration defines: {}",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

/// Replaces user `name`'s standing roles (audited as `user_roles_set`):
/// new logins and sessions get the new ones at once, and the user's live
/// sessions that the old ones allowed, and the new ones do not, end within
/// a second on every wicketd sharing the store (like Teleport's `tctl
/// users update --set-roles`, which also ends nothing granted).
pub async fn set_user_roles(
    config: &Config,
    store: &Store,
    name: &str,
    mut roles: Vec<String>,
    now: DateTime<Utc>,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    roles.retain(|r| seen.insert(r.clone()));
    check_standing_roles(config, &roles)?;
    let row = |previous| {
        AuditEvent::UserRolesSet {
            user: name.to_owned(),
            roles: roles.clone(),
            previous,
        }
        .to_row(now.timestamp_millis())
    };
    store.set_user_roles(name, &roles, row).await
}

/// Creates a user in `store`, validated against `config`; returns the TOTP
/// provisioning URI when `totp` is set.
#[allow(clippy::too_many_arguments)]
pub async fn add_user(
    config: &Config,
    store: &Store,
    name: &str,
    roles: Vec<String>,
    team: Option<String>,
    password: Option<&str>,
    totp: bool,
    now: DateTime<Utc>,
) -> Result<Option<String>> {
    if !valid_user_name(name) {
        return Err(Error::BadRequest(format!(
            "user name {name:?} must be 1-64 characters of [A-Za-z0-9._@-]"
        )));
    }
    if name == crate::audit::SYSTEM_ACTOR {
        return Err(Error::BadRequest(format!(
            "user name {name:?} is the daemon's own in the audit log; choose another"
        )));
    }
    check_standing_roles(config, &roles)?;
    if let Some(t) = &team {
        if !config.policy.directory.teams.contains_key(t) {
            return Err(Error::BadRequest(format!("unknown team {t:?}")));
        }
    }
    let rng = SystemRandom::new();
    let password_hash = password.map(|p| auth::hash_password(p, &rng)).transpose()?;
    let (totp_secret, uri) = if totp {
        let (s, uri) = auth::new_totp_secret(name, &config.cluster_name, &rng)?;
        (Some(s), Some(uri))
    } else {
        (None, None)
    };
    let record = UserRecord {
        name: name.to_owned(),
        roles: roles.clone(),
        team: team.clone(),
        password_hash,
        totp_secret,
        created_at: now.timestamp_millis(),
        disabled: false,
    };
    let event = AuditEvent::UserCreated {
        user: name.to_owned(),
        roles,
        team,
        totp,
    };
    store
        .create_user(&record, &event.to_row(now.timestamp_millis()))
        .await?;
    Ok(uri)
}

/// What a refused login is told: one message whatever was wrong (unknown
/// user, password, disabled, OTP missing, wrong or used), so that a guess
/// at the password is never confirmed by what follows it.
fn login_refusal(otp_sent: bool) -> &'static str {
    if otp_sent {
        "invalid user name, password or OTP code (each code works once)"
    } else {
        "invalid user name or password (a user with an OTP device also needs --otp CODE)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A password check keeps its place until it is done, though the login
    /// that started it is gone (its client closed): the bound holds.
    #[tokio::test]
    async fn a_password_check_keeps_its_place_until_it_is_done() {
        let places = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let hash = auth::hash_password("the right one", &SystemRandom::new()).unwrap();
        let place = places.clone().acquire_owned().await.unwrap();
        drop(spawn_password_check(
            place,
            wicket_api::Secret::new("wrong"),
            Some(hash),
        ));
        assert_eq!(places.available_permits(), 0);
        let back = tokio::time::timeout(std::time::Duration::from_secs(60), places.acquire()).await;
        assert!(matches!(back, Ok(Ok(_))));
    }

    /// User certificates are issued for Ed25519 and ECDSA keys, which the
    /// SSH listener verifies, not for RSA keys of any size.
    #[test]
    fn user_keys_are_ed25519_or_ecdsa() {
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDpX1EEb68DszoojfbVZOLXXcWR9EH4IUcfRfz4GP15OJ7eoysiSeVJmLy5/RbWuSL8xOVU2PYRF/lvnqfU3Bf5mxa26/HhkBYBJWYroiGPkOTRA4R5omTd8KSnsMIr9oXi0wH7wt4SJKO40D9JtOkmCF9BMwe1Er2FIihFVhJjzQ== ";
        let e = parse_client_keys(rsa, "").err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("a ssh-rsa key is not accepted")),
            "{e:?}"
        );
        for good in ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKUmdPnBxi6tCSFEWJhVco3faXDGbfRWt24jeOSN4DLN ", "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBGeUCJv8POYAbKIpfE0LgPeSZWeqPz6UN1P6/TJNg9nXFV51JNA/ul9RaCU0ToK+VY5m9Wf2153UeNdHfCp1+yg= "] {
            // Accepted: it is the CSR, checked next, that fails.
            let e = parse_client_keys(good, "").err().map(|e| e.to_string());
            assert!(e.as_deref().is_some_and(|e| e.contains("tls_csr_pem")), "{e:?}");
        }
    }
}
