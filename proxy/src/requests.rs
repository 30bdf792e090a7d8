//! Access requests in the daemon: load a request, hand the event to the
//! policy state machine, persist the new state and its effects (audit rows,
//! queued notifications) in one transaction with an optimistic version check,
//! and drive timers from the store.

use crate::audit::AuditEvent;
use crate::auth::Guesses;
use crate::config::parse_duration;
use crate::error::{Error, Result};
use crate::service::{Caller, Wicket};
use crate::store::{AsRead, AuditRow, NotificationRow, StoredRequest, UserRecord};
use chrono::{DateTime, Duration, Utc};
use wicket_api::{
    ActionBody, BreakGlassBody, CreateRequest, Grant, Notification, ReviewBody, ReviewView,
};
use wicket_policy::{
    AccessRequest, Actor, Effect, Engine, Event, NewRequest, Recipients, RequestError, Requester,
    ReviewerSet, State, Subject, Urgency, Verdict,
};

/// The caller acting on requests (see [`Wicket::caller_actor`]).
struct Acting {
    actor: Actor,
    /// Why their standing roles do not count, when they do not.
    ended: Option<String>,
    /// Their user record as read for this decision: a change written
    /// after that read refuses the transition (see
    /// [`crate::store::Store::update_request`]).
    record: std::sync::Arc<UserRecord>,
}

/// Which requests to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Mine,
    Reviewable,
    /// Everything the caller may see.
    All,
}

/// The most requests one listing shows, newest first.
const LISTED: i64 = 500;
/// The most rows one listing reads to find them (the newest this many
/// that match its state and kind).
const LISTING_READS_AT_MOST: usize = 20_000;

fn request_error(e: RequestError) -> Error {
    match e {
        RequestError::Invalid(m) => Error::BadRequest(m),
        RequestError::Forbidden(m) => Error::Forbidden(m),
        RequestError::Limited(m) => Error::Conflict(m),
        e @ RequestError::IllegalTransition { .. } => Error::Conflict(e.to_string()),
    }
}

fn parse_dur(field: &str, s: &str) -> Result<Duration> {
    parse_duration(s).map_err(|e| Error::BadRequest(format!("{field}: {e}")))
}

pub(crate) fn decode(stored: &StoredRequest) -> Result<AccessRequest> {
    serde_json::from_str(&stored.doc)
        .map_err(|e| Error::Store(format!("request {} is corrupt: {e}", stored.id)))
}

impl Wicket {
    pub fn engine(&self) -> Engine<'_> {
        Engine::new(&self.config.policy)
    }

    /// The policy's new request `new` by `user` (standing roles, team).
    /// The policy's decision on `new`, with `awaiting_review` of the
    /// user's requests awaiting review (as the store counted them).
    fn engine_create(
        &self,
        user: &UserRecord,
        new: NewRequest,
        awaiting_review: i64,
        now: DateTime<Utc>,
    ) -> std::result::Result<(AccessRequest, Vec<Effect>), RequestError> {
        let standing = self.standing_roles(user);
        let requester = Requester {
            name: &user.name,
            roles: &standing,
            team: user.team.as_deref(),
            awaiting_review: usize::try_from(awaiting_review).unwrap_or(usize::MAX),
        };
        self.engine().create(new, &requester, now)
    }

    /// `user` as a reviewer (whom the policy would let review), with their
    /// standing roles.
    fn actor_of(&self, user: &UserRecord) -> Actor {
        Actor {
            name: user.name.clone(),
            roles: self.standing_roles(user),
        }
    }

    /// The caller as the one acting: their standing roles count only while
    /// the login behind their certificate lasts.
    fn caller_actor(
        &self,
        caller: &Caller,
        user: &std::sync::Arc<UserRecord>,
        now: DateTime<Utc>,
    ) -> Acting {
        let standing = self.standing_in_force(caller, user, now);
        Acting {
            actor: Actor {
                name: user.name.clone(),
                roles: standing.roles,
            },
            ended: standing.ended,
            record: user.clone(),
        }
    }

    /// After a write refused because the acting user's record changed:
    /// the index reads the change feed at once.
    async fn refresh_after_conflict(&self, now: DateTime<Utc>) {
        // Bounded as the index's own refresher is: it holds the index's
        // refresh lock, which the session watcher waits on.
        match tokio::time::timeout(std::time::Duration::from_secs(1), self.refresh_index(now)).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "reading the change feed failed"),
            Err(_) => tracing::warn!("reading the change feed took over 1s"),
        }
    }

    fn encode(&self, req: &AccessRequest) -> Result<StoredRequest> {
        Ok(StoredRequest {
            id: req.id.clone(),
            requester: req.requester.clone(),
            state: req.state.as_str().to_owned(),
            next_deadline: self
                .engine()
                .next_deadline(req)
                .map(|d| d.timestamp_millis()),
            created_at: req.created_at.timestamp_millis(),
            updated_at: req.updated_at.timestamp_millis(),
            doc: serde_json::to_string(req).map_err(|e| Error::Internal(e.to_string()))?,
            awaiting_review: req.awaits_review(),
        })
    }

    /// Resolves reviewer sets to user names at `now`.
    async fn resolve(
        &self,
        req: &AccessRequest,
        sets: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        let mut out = std::collections::BTreeSet::new();
        let mut roles = Vec::new();
        for s in sets {
            match ReviewerSet::parse(s) {
                Ok(ReviewerSet::Role(r)) => roles.push(r),
                Ok(ReviewerSet::User(u)) => {
                    out.insert(u);
                }
                Ok(ReviewerSet::TeamLead) => {
                    if let Some(l) = &req.requester_team_lead {
                        out.insert(l.clone());
                    }
                }
                Ok(ReviewerSet::Oncall(name)) => {
                    if let Some(who) = self
                        .config
                        .policy
                        .directory
                        .oncall
                        .get(&name)
                        .and_then(|s| s.on_call(now))
                    {
                        out.insert(who.to_owned());
                    }
                }
                Err(_) => {}
            }
        }
        if !roles.is_empty() {
            out.extend(self.store.users_with_roles(&roles).await?);
        }
        Ok(out.into_iter().collect())
    }

    /// Turns effects into audit and notification rows.
    async fn effect_rows(
        &self,
        req: &AccessRequest,
        effects: &[Effect],
        now: DateTime<Utc>,
    ) -> Result<(Vec<AuditRow>, Vec<NotificationRow>)> {
        let mut audit = Vec::new();
        let mut notes = Vec::new();
        for e in effects {
            match e {
                Effect::Audit {
                    kind,
                    actor,
                    detail,
                } => {
                    let event = AuditEvent::AccessRequest {
                        action: kind.clone(),
                        actor: actor.clone(),
                        request_id: req.id.clone(),
                        state: req.state.as_str().to_owned(),
                        detail: detail.clone(),
                    };
                    tracing::info!(kind = %kind, actor = %actor, request = %req.id, "audit");
                    audit.push(event.to_row(now.timestamp_millis()));
                }
                Effect::Notify {
                    recipients,
                    subject,
                    urgent,
                } => {
                    let mut to = match recipients {
                        Recipients::User(u) => vec![u.clone()],
                        Recipients::Sets(sets) => self.resolve(req, sets, now).await?,
                    };
                    // Reviewers are told about a request; the requester is not a reviewer.
                    if matches!(recipients, Recipients::Sets(_)) {
                        to.retain(|u| u != &req.requester);
                    }
                    notes.push(NotificationRow {
                        id: uuid::Uuid::new_v4().to_string(),
                        time_ms: now.timestamp_millis(),
                        request_id: Some(req.id.clone()),
                        recipients: to,
                        subject: subject.clone(),
                        urgent: *urgent,
                    });
                }
                Effect::EndSessions { reason, by } => {
                    // Proxies re-read grant state at every check; this is the
                    // record that live sessions must end.
                    audit.push(
                        AuditEvent::AccessRequest {
                            action: "grant_ended".into(),
                            actor: by.clone(),
                            request_id: req.id.clone(),
                            state: req.state.as_str().to_owned(),
                            detail: reason.clone(),
                        }
                        .to_row(now.timestamp_millis()),
                    );
                }
            }
        }
        Ok((audit, notes))
    }

    pub(crate) async fn deny_audited(
        &self,
        user: &str,
        action: &str,
        reason: String,
        now: DateTime<Utc>,
    ) -> Error {
        let refused = Error::Forbidden(reason.clone());
        self.refusal_audited(user, action, reason, refused, now)
            .await
    }

    /// Audits a refusal of `action` to `user` (`reason`) and returns
    /// `refused`, the error the caller gets; when the event cannot be
    /// stored, the store's error instead (the call is refused either way,
    /// and an unrecorded refusal is not passed off as a recorded one).
    /// Past the burst for this user and action, a refusal is only counted,
    /// and the count written when its minute is over (see
    /// [`crate::auth::DenialLog`], [`Self::write_folded_denials`]).
    pub(crate) async fn refusal_audited(
        &self,
        user: &str,
        action: &str,
        reason: String,
        refused: Error,
        now: DateTime<Utc>,
    ) -> Error {
        let record = self.denial_log().record(user, action, now);
        // Past the burst for this user and action: counted, and written
        // when the window is over (or with the next recorded one).
        let Some(unrecorded_before) = record else {
            return refused;
        };
        let event = AuditEvent::AccessDenied {
            user: user.to_owned(),
            action: action.to_owned(),
            reason,
            unrecorded_before,
            session: None,
        };
        match self.audit(event, now).await {
            Ok(()) => refused,
            Err(e) => {
                tracing::error!(%action, error = %e, "a refusal could not be audited");
                // It, and what it carried, are written later.
                self.denial_log()
                    .give_back(user, action, unrecorded_before.saturating_add(1));
                e
            }
        }
    }

    fn denial_log(&self) -> std::sync::MutexGuard<'_, crate::auth::DenialLog> {
        self.denials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes the counts of folded refusals whose window is over at `now`
    /// (every count, with `all`: wicketd is stopping), one event for each
    /// user and action. A count that cannot be written is kept for the
    /// next call.
    pub async fn write_folded_denials(&self, now: DateTime<Utc>, all: bool) {
        let folded = {
            let mut log = self.denial_log();
            if log.is_empty() {
                return;
            }
            log.take_folded(now, all)
        };
        for f in folded {
            let event = AuditEvent::AccessDenied {
                user: f.user.clone(),
                action: f.action.clone(),
                reason: format!(
                    "refused {} more time(s) within a minute, as recorded before (folded)",
                    f.count
                ),
                unrecorded_before: f.count,
                session: None,
            };
            if let Err(e) = self.audit(event, now).await {
                tracing::error!(action = %f.action, error = %e, "folded refusals could not be audited");
                self.denial_log().give_back(&f.user, &f.action, f.count);
            }
        }
    }

    /// The request as stored now.
    /// The requests of `ids` that exist, by ID, each decoded on its own (a
    /// corrupt one does not hide the others).
    pub(crate) async fn load_requests(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, Result<AccessRequest>>> {
        Ok(self
            .store
            .get_requests(ids)
            .await?
            .into_iter()
            .map(|(stored, _)| (stored.id.clone(), decode(&stored)))
            .collect())
    }

    async fn load(&self, id: &str) -> Result<(AccessRequest, i64)> {
        let (stored, version) = self
            .store
            .get_request(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("access request {id:?} not found")))?;
        Ok((decode(&stored)?, version))
    }

    /// Loads, applies `event`, and saves with a version check, retrying when
    /// another proxy changed the request in between. `by` is the user who
    /// acts (`None`: wicketd's own timers); a request they may not see is
    /// not found for them (see [`Wicket::hidden`]).
    async fn transition(
        &self,
        id: &str,
        by: Option<&Acting>,
        action: &str,
        now: DateTime<Utc>,
        event: impl Fn(&AccessRequest) -> Event,
    ) -> Result<AccessRequest> {
        let actor = by.map_or(crate::audit::SYSTEM_ACTOR, |a| a.actor.name.as_str());
        for _ in 0..5 {
            let (current, version) = self.load(id).await?;
            if let Some(a) = by {
                let read = self.engine().decide_request_read(&current, &a.actor, now);
                if !read.allowed {
                    return Err(self.hidden(id, a, action, read.reason, now).await);
                }
            }
            let (next, effects) = match self.engine().apply(&current, event(&current), now) {
                Ok(x) => x,
                Err(RequestError::Forbidden(reason)) => {
                    return Err(self.deny_audited(actor, action, reason, now).await)
                }
                Err(e) => return Err(request_error(e)),
            };
            if next == current {
                return Ok(next);
            }
            let (audit, notes) = self.effect_rows(&next, &effects, now).await?;
            let stored = self
                .store
                .update_request(
                    &self.encode(&next)?,
                    version,
                    &audit,
                    &notes,
                    by.map(|a| AsRead::from(&*a.record)),
                )
                .await;
            if let Err(Error::Conflict(_)) = &stored {
                // The acting user changed since the (index's) read: read
                // the changes now, so that trying again decides on them.
                self.refresh_after_conflict(now).await;
            }
            if let Some(change) = stored? {
                // Out of the index at once, until the feed brings the new
                // state (or a newer one).
                self.index.forget_at(id, change);
                if effects
                    .iter()
                    .any(|e| matches!(e, Effect::EndSessions { .. }))
                {
                    // Deliver at once here; other proxies sharing the store
                    // see the new state on their next session check.
                    self.grant_ended_here(&next, now);
                }
                return Ok(next);
            }
        }
        Err(Error::Conflict(format!(
            "request {id} is changing concurrently; try again"
        )))
    }

    pub async fn create_request(
        &self,
        caller: &Caller,
        body: CreateRequest,
        now: DateTime<Utc>,
    ) -> Result<Grant> {
        self.require_login(caller, "request.create", now).await?;
        let user = self.active_user(caller).await?;
        let mut roles = body.roles;
        if let Some(r) = body.role {
            roles.push(r);
        }
        let duration = match (&body.duration, body.duration_hours) {
            (Some(_), Some(_)) => {
                return Err(Error::BadRequest(
                    "give duration or duration_hours, not both".into(),
                ))
            }
            (Some(d), None) => Some(parse_dur("duration", d)?),
            (None, Some(h)) if h.is_finite() && h > 0.0 && h < 24.0 * 366.0 => {
                Some(Duration::seconds((h * 3600.0).round() as i64))
            }
            (None, Some(_)) => {
                return Err(Error::BadRequest(
                    "duration_hours must be a positive number".into(),
                ))
            }
            (None, None) => None,
        };
        let urgency = match body.urgency.as_deref() {
            None | Some("normal") => Urgency::Normal,
            Some("low") => Urgency::Low,
            Some("high") => Urgency::High,
            Some(other) => {
                return Err(Error::BadRequest(format!(
                    "urgency {other:?}: use low, normal or high"
                )))
            }
        };
        let new = NewRequest {
            id: uuid::Uuid::new_v4().to_string(),
            roles,
            resources: body.resources,
            reason: body.reason,
            ticket_url: body.ticket_url,
            urgency,
            duration,
            start_at: body.start_at,
            break_glass: false,
            mfa_verified: false,
        };
        self.create(&user, new, "request.create", now).await
    }

    async fn create(
        &self,
        user: &UserRecord,
        new: NewRequest,
        action: &str,
        now: DateTime<Utc>,
    ) -> Result<Grant> {
        // Decided on a count of the user's requests awaiting review; stored
        // only if they are still under the limit when it is written (other
        // calls, other wicketds), else counted and decided again.
        // Break-glass awaits no review and is not limited.
        let limit =
            (!new.break_glass).then(|| i64::from(self.config.policy.requests.max_pending_per_user));
        // The requester's record as last read: when it changed before the
        // write, read again and decided again (break-glass has used its
        // code by now: asking for another would cost a 30 s step).
        let mut reread: Option<UserRecord> = None;
        for _ in 0..3 {
            let user = reread.as_ref().unwrap_or(user);
            let awaiting = self.store.count_awaiting_review(&user.name).await?;
            let (req, effects) = match self.engine_create(user, new.clone(), awaiting, now) {
                Ok(x) => x,
                Err(RequestError::Forbidden(reason)) => {
                    return Err(self.deny_audited(&user.name, action, reason, now).await)
                }
                // The cap is a policy decision too: on the record.
                Err(RequestError::Limited(reason)) => {
                    let refused = Error::Conflict(reason.clone());
                    return Err(self
                        .refusal_audited(&user.name, action, reason, refused, now)
                        .await);
                }
                Err(e) => return Err(request_error(e)),
            };
            let (audit, notes) = self.effect_rows(&req, &effects, now).await?;
            let stored = self
                .store
                .insert_request_unless_more_await(
                    &self.encode(&req)?,
                    &audit,
                    &notes,
                    limit,
                    Some(user.into()),
                )
                .await;
            match stored {
                Ok(true) => return self.view(&req, now).await,
                Ok(false) => {}
                Err(Error::Conflict(_)) => {
                    // The requester changed since the (index's) read.
                    self.refresh_after_conflict(now).await;
                    reread = Some(
                        self.store
                            .get_user(&user.name)
                            .await?
                            .filter(|u| !u.disabled)
                            .ok_or_else(|| {
                                Error::Unauthenticated(format!(
                                    "user {:?} no longer exists or is disabled",
                                    user.name
                                ))
                            })?,
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict(
            "your other requests changed while this one was made; try again".into(),
        ))
    }

    /// Break-glass: an active grant without approval, only with a fresh TOTP code.
    pub async fn break_glass(
        &self,
        caller: &Caller,
        body: BreakGlassBody,
        now: DateTime<Utc>,
    ) -> Result<Grant> {
        self.require_login(caller, "break-glass", now).await?;
        let user = self.active_user(caller).await?;
        let secret = user.totp_secret.clone().ok_or_else(|| {
            Error::Forbidden(
                "break-glass needs a TOTP second factor; enroll with `wicketd users add --totp`"
                    .into(),
            )
        })?;
        let mut new = NewRequest {
            id: uuid::Uuid::new_v4().to_string(),
            roles: body.roles,
            reason: body.reason,
            duration: body
                .duration
                .as_deref()
                .map(|d| parse_dur("duration", d))
                .transpose()?,
            urgency: Urgency::High,
            break_glass: true,
            mfa_verified: true,
            ..Default::default()
        };
        // Validate everything else first, so a typo does not burn the code
        // (break-glass awaits no review: the count does not matter).
        if let Err(e) = self.engine_create(&user, new.clone(), 0, now) {
            return Err(match e {
                RequestError::Forbidden(reason) => {
                    self.deny_audited(&user.name, "break-glass", reason, now)
                        .await
                }
                e => request_error(e),
            });
        }
        // Codes are guessable one by one: wrong ones are counted (apart
        // from failed logins, which anyone can make in this user's name),
        // and too many refuse the next try unchecked.
        let attempt = self
            .refuse_when_rate_limited(Guesses::BreakGlass, &user.name, caller.source, now, false)
            .await?;
        new.mfa_verified =
            match crate::auth::verify_totp(&secret, body.otp.expose(), now.timestamp()) {
                Some(step) => self.store.consume_totp_step(&user.name, step).await?,
                None => false,
            };
        if !new.mfa_verified {
            let reason = "invalid or already used OTP code".to_owned();
            let event = AuditEvent::AccessDenied {
                user: user.name.clone(),
                action: "break-glass".into(),
                reason: reason.clone(),
                // Wrong codes are rate-limited as guesses, not folded.
                unrecorded_before: 0,
                session: None,
            };
            self.record_failure(attempt, event, now).await?;
            return Err(Error::Forbidden(reason));
        }
        self.store.release_login_attempt(&attempt.id).await?;
        self.create(&user, new, "break-glass", now).await
    }

    pub async fn review_request(
        &self,
        caller: &Caller,
        id: &str,
        body: ReviewBody,
        now: DateTime<Utc>,
    ) -> Result<Grant> {
        self.require_login(caller, "request.review", now).await?;
        let user = self.active_user(caller).await?;
        let verdict = match body.verdict.as_str() {
            "approve" => Verdict::Approve,
            "deny" => Verdict::Deny,
            "ask-info" => Verdict::AskInfo,
            "acknowledge" => Verdict::Acknowledge,
            other => {
                return Err(Error::BadRequest(format!(
                    "verdict {other:?}: use approve, deny, ask-info or acknowledge"
                )))
            }
        };
        let duration = body
            .duration
            .as_deref()
            .map(|d| parse_dur("duration", d))
            .transpose()?;
        let acting = self.caller_actor(caller, &user, now);
        let req = self
            .transition(id, Some(&acting), "request.review", now, |_| {
                Event::Review {
                    by: acting.actor.clone(),
                    verdict,
                    reason: body.reason.clone(),
                    roles: body.roles.clone(),
                    duration,
                    start_at: body.start_at,
                }
            })
            .await?;
        self.view(&req, now).await
    }

    /// update / cancel / drop / revoke / extend.
    pub async fn request_action(
        &self,
        caller: &Caller,
        id: &str,
        action: &str,
        body: ActionBody,
        now: DateTime<Utc>,
    ) -> Result<Grant> {
        // What asks for more access (a longer grant, or an answer that
        // moves a request on) needs a live login, as asking did; what ends
        // access (cancel, drop, revoke) works with any valid certificate,
        // though revoking another's request stands on a standing role,
        // which counts only while the login lasts.
        if matches!(action, "update" | "extend") {
            self.require_login(caller, &format!("request.{action}"), now)
                .await?;
        }
        let user = self.active_user(caller).await?;
        let by = self.caller_actor(caller, &user, now);
        let actor = by.actor.clone();
        let name = user.name.clone();
        let event: Box<dyn Fn(&AccessRequest) -> Event + Send + Sync> = match action {
            "update" => Box::new(move |_| Event::Update {
                by: name.clone(),
                reason: body.reason.clone(),
            }),
            "cancel" => Box::new(move |_| Event::Cancel { by: name.clone() }),
            "drop" => Box::new(move |_| Event::Drop { by: name.clone() }),
            "revoke" => Box::new(move |_| Event::Revoke {
                by: actor.clone(),
                reason: body.reason.clone(),
            }),
            "extend" => {
                let d = parse_dur(
                    "duration",
                    body.duration
                        .as_deref()
                        .ok_or_else(|| Error::BadRequest("extend needs a duration".into()))?,
                )?;
                Box::new(move |_| Event::Extend {
                    by: name.clone(),
                    duration: d,
                })
            }
            other => return Err(Error::NotFound(format!("no request action {other:?}"))),
        };
        let req = self
            .transition(id, Some(&by), &format!("request.{action}"), now, event)
            .await?;
        self.view(&req, now).await
    }

    /// A request `actor` may not see is not found for them, whatever they
    /// try to do with it (the answers to a review or an action would
    /// otherwise tell its roles and state to anyone who has its ID). The
    /// attempt is audited with the policy's `reason`.
    async fn hidden(
        &self,
        id: &str,
        by: &Acting,
        action: &str,
        reason: String,
        now: DateTime<Utc>,
    ) -> Error {
        let reason = crate::service::explain_refusal(reason, by.ended.as_deref());
        let refused = Error::NotFound(format!("access request {id:?} not found"));
        self.refusal_audited(&by.actor.name, action, reason, refused, now)
            .await
    }

    pub async fn show_request(
        &self,
        caller: &Caller,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Grant> {
        let user = self.active_user(caller).await?;
        let (req, _) = self.load(id).await?;
        let by = self.caller_actor(caller, &user, now);
        let read = self.engine().decide_request_read(&req, &by.actor, now);
        if !read.allowed {
            return Err(self.hidden(id, &by, "request.show", read.reason, now).await);
        }
        self.view(&req, now).await
    }

    pub async fn list_requests(
        &self,
        caller: &Caller,
        listing: Listing,
        state: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Grant>> {
        let user = self.active_user(caller).await?;
        let actor = self.caller_actor(caller, &user, now).actor;
        let states: Vec<&str> = match state {
            Some(s) => {
                let st = State::parse(s)
                    .ok_or_else(|| Error::BadRequest(format!("unknown state {s:?}")))?;
                vec![st.as_str()]
            }

            None => vec![],
        };
        let requester = (listing == Listing::Mine).then_some(user.name.as_str());
        let awaiting_only = listing == Listing::Reviewable;
        let users = self.store.list_users().await?;
        let mut out = Vec::new();
        // Page by page, newest first, until LISTED are kept: the caller's
        // share of the newest rows may be none of them (others' requests,
        // ended break-glass grants left unacknowledged).
        let mut after: Option<(i64, String)> = None;
        let mut read = 0;
        loop {
            let page = after.as_ref().map(|(t, id)| (*t, id.as_str()));
            let rows = self
                .store
                .list_requests(requester, &states, awaiting_only, page, LISTED)
                .await?;
            read += rows.len();
            for row in &rows {
                let req = decode(row)?;
                let keep = match listing {
                    Listing::Mine => true,
                    Listing::Reviewable => self.engine().is_reviewable_by(&req, &actor, now),
                    Listing::All => self.engine().decide_request_read(&req, &actor, now).allowed,
                };
                if keep {
                    out.push(self.view_with(&req, now, &users).await?);
                    if out.len() as i64 == LISTED {
                        return Ok(out);
                    }
                }
            }
            let Some(last) = rows.last().filter(|_| rows.len() as i64 == LISTED) else {
                return Ok(out);
            };
            if read >= LISTING_READS_AT_MOST {
                // Older requests the caller may see are not listed.
                tracing::warn!(
                    user = %user.name,
                    listed = out.len(),
                    read,
                    "a request listing stopped at its read limit; older requests are not listed"
                );
                return Ok(out);
            }
            after = Some((last.created_at, last.id.clone()));
        }
    }

    /// The caller's grants named in `ids`, each active now.
    pub async fn active_grants(
        &self,
        user: &str,
        ids: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<AccessRequest>> {
        let mut out = Vec::new();
        for id in ids {
            let (req, _) = self.load(id).await?;
            // As for one that does not exist: the answer tells nothing of
            // another user's request.
            if req.requester != user {
                return Err(Error::NotFound(format!("access request {id:?} not found")));
            }
            if !req.grants_at(now) {
                let why = match req.state {
                    State::Approved => format!(
                        "is approved but starts at {}",
                        req.starts_at.map(|s| s.to_rfc3339()).unwrap_or_default()
                    ),
                    State::Active => "has expired".to_owned(),
                    s => format!(
                        "is {}{}",
                        s.as_str(),
                        req.end_reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ),
                };
                return Err(Error::Forbidden(format!("access request {id} {why}")));
            }
            out.push(req);
        }
        Ok(out)
    }

    /// Applies due timers (expiry, escalation, scheduled start). Returns how
    /// many requests changed. Driven from the store, so after a restart every
    /// overdue transition happens on the first run.
    pub async fn tick_due(&self, now: DateTime<Utc>) -> Result<usize> {
        let due = self.store.due_requests(now.timestamp_millis(), 500).await?;
        let mut changed = 0;
        for id in due {
            match self.tick_one(&id, now).await {
                Ok(true) => changed += 1,
                Ok(false) => {}
                // Tried again at the next tick (a store that did not
                // answer, another wicketd's change in between).
                Err(e) => tracing::warn!(request = %id, error = %e, "timer transition failed"),
            }
        }
        Ok(changed)
    }

    /// Applies the timers of one due request; whether it changed. One that
    /// was due by its stored deadline with nothing due (the deadline was
    /// worked out under other settings, say a shorter `escalate_after`)
    /// gets its deadline worked out again; one whose document does not
    /// decode is put off 30 s. Neither comes back at every tick.
    async fn tick_one(&self, id: &str, now: DateTime<Utc>) -> Result<bool> {
        let Some((stored, version)) = self.store.get_request(id).await? else {
            return Ok(false);
        };
        let current = match decode(&stored) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(request = %id, error = %e, "its timers cannot run; trying again in 30s");
                let later = (now + Duration::seconds(30)).timestamp_millis();
                self.store
                    .set_request_deadline(id, version, Some(later))
                    .await?;
                return Ok(false);
            }
        };
        let (next, _) = self
            .engine()
            .apply(&current, Event::Tick, now)
            .map_err(request_error)?;
        if next != current {
            self.transition(id, None, "request.tick", now, |_| Event::Tick)
                .await?;
            return Ok(true);
        }
        let deadline = match self.engine().next_deadline(&current) {
            // Due, yet nothing to do: put off, not worked on every tick.
            Some(d) if d <= now => Some(now + Duration::seconds(30)),
            d => d,
        }
        .map(|d| d.timestamp_millis());
        // (Stored to the millisecond: a deadline later in this one is due
        // at the next tick, as stored.)
        if deadline != stored.next_deadline {
            self.store
                .set_request_deadline(id, version, deadline)
                .await?;
        }
        Ok(false)
    }

    /// The newest notifications (`limit`, 1 to 10,000; 1,000 by default),
    /// oldest first.
    pub async fn notifications(
        &self,
        caller: &Caller,
        request_id: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Vec<Notification>> {
        let user = self.active_user(caller).await?;
        let now = crate::clock::now();
        let standing = self.standing_in_force(caller, &user, now);
        let subject = Subject::new(&user.name, &standing.roles);
        let d = self.config.policy.roles.decide_audit_read(&subject, None);
        if !d.allowed {
            let reason = standing.explain(d.reason);
            return Err(self
                .deny_audited(&user.name, "notifications.read", reason, now)
                .await);
        }
        let limit = match limit {
            None => 1000,
            Some(n) if (1..=10_000).contains(&n) => n,
            Some(n) => return Err(Error::BadRequest(format!("limit {n}: give 1 to 10000"))),
        };
        Ok(self
            .store
            .notifications(request_id, limit)
            .await?
            .into_iter()
            .map(|n| Notification {
                time: DateTime::<Utc>::from_timestamp_millis(n.time_ms).unwrap_or_default(),
                request_id: n.request_id,
                recipients: n.recipients,
                subject: n.subject,
                urgent: n.urgent,
            })
            .collect())
    }

    /// The JSON view: the grant schema fields plus details.
    pub async fn view(&self, req: &AccessRequest, now: DateTime<Utc>) -> Result<Grant> {
        // The user table is only read to say who may still review.
        let users = match req.state.is_open() {
            true => self.store.list_users().await?,
            false => Vec::new(),
        };
        self.view_with(req, now, &users).await
    }

    /// [`Wicket::view`] with the user table already loaded (for listings).
    async fn view_with(
        &self,
        req: &AccessRequest,
        now: DateTime<Utc>,
        users: &[UserRecord],
    ) -> Result<Grant> {
        let engine = self.engine();
        let risk = engine.risk(req);
        let mut perms: Vec<String> = Vec::new();
        perms.extend(risk.ssh.iter().map(|s| format!("ssh:{s}")));
        perms.extend(risk.databases.iter().map(|s| format!("db:{s}")));
        perms.extend(risk.kubernetes.iter().map(|s| format!("kube:{s}")));
        perms.extend(risk.permissions.iter().cloned());
        let (still_needed, can_review) = if req.state.is_open() {
            let needed = engine
                .requirement_status(req, &req.roles)
                .err()
                .unwrap_or_default();
            let who = users
                .iter()
                .filter(|u| !u.disabled && engine.is_reviewable_by(req, &self.actor_of(u), now))
                .map(|u| u.name.clone())
                .collect();
            (needed, who)
        } else {
            (Vec::new(), Vec::new())
        };
        let approvers = req.approvers();
        Ok(Grant {
            id: req.id.clone(),
            requester: req.requester.clone(),
            requester_normal_roles: req.requester_roles.clone(),
            requested_roles: req.roles.clone(),
            granted_roles: req.granted_roles.clone(),
            granted_permissions: perms,
            justification: req.reason.clone(),
            ticket_url: req.ticket_url.clone(),
            approved_by: if req.approved_at.is_some() {
                Some(if approvers.is_empty() {
                    if req.break_glass {
                        "break-glass".to_owned()
                    } else {
                        "self-approved".to_owned()
                    }
                } else {
                    approvers.join(",")
                })
            } else {
                None
            },
            approved_at: req.approved_at,
            starts_at: req.starts_at,
            expires_at: req.expires_at,
            status: req.state.as_str().to_owned(),
            // Sessions run only on a grant that was approved.
            actions_taken: match req.approved_at {
                Some(_) => self.store.count_request_actions(&req.id).await?,
                None => 0,
            },
            revoked_by: req.revoked_by.clone(),
            revoke_reason: req.revoke_reason.clone(),
            created_at: req.created_at,
            urgency: serde_json::to_value(req.urgency)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            requested_duration_secs: req.requested_duration_secs,
            requested_start: req.requested_start,
            resources: req.resources.clone(),
            break_glass: req.break_glass,
            acknowledged_by: req
                .reviews
                .iter()
                .find(|r| r.verdict == Verdict::Acknowledge)
                .map(|r| r.reviewer.clone()),
            escalated: req.escalated,
            extensions: req.extensions,
            ended_at: req.ended_at,
            end_reason: req.end_reason.clone(),
            reviews: req
                .reviews
                .iter()
                .map(|r| ReviewView {
                    reviewer: r.reviewer.clone(),
                    verdict: serde_json::to_value(r.verdict)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    reason: r.reason.clone(),
                    at: r.at,
                    as_member_of: r.matched.clone(),
                })
                .collect(),
            still_needed,
            can_review,
            risk: serde_json::to_value(&risk).unwrap_or_default(),
        })
    }
}
