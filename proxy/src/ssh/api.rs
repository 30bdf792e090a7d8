//! Recordings over the API: list them and fetch one, as the policy allows
//! (your own sessions, or everyone's with a role that has `audit: true`).

use super::recording;
use crate::error::{Error, Result};
use crate::service::{Caller, Wicket};
use crate::store::RECORDING_PART;
use chrono::{DateTime, Utc};
use wicket_api::RecordingInfo;
use wicket_policy::Subject;

/// Recordings copied to the store at once (each holds a part in memory,
/// [`RECORDING_PART`], and a store connection): many sessions ending
/// together queue.
static SHARING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
/// Downloads from a shared store at once (each holds a part or two in
/// memory, or a whole file stored before parts, at most 64 MiB): more
/// wait. Files from this host's data directory are streamed and need no
/// such limit.
static LOADING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);
/// Of those, one user's at once: a user reading slowly holds their own
/// slots, not everyone's.
const LOADING_PER_USER: u32 = 2;
/// Downloads from the store under way, by user.
static LOADING_BY_USER: std::sync::Mutex<std::collections::BTreeMap<String, u32>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// One of a user's downloads from the store, given back when dropped.
struct UserLoad(String);

impl UserLoad {
    fn take(user: &str) -> Option<Self> {
        let mut by = lock_loads();
        let n = by.entry(user.to_owned()).or_insert(0);
        if *n >= LOADING_PER_USER {
            return None;
        }
        *n += 1;
        Some(Self(user.to_owned()))
    }
}

impl Drop for UserLoad {
    fn drop(&mut self) {
        let mut by = lock_loads();
        if let Some(n) = by.get_mut(&self.0) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by.remove(&self.0);
            }
        }
    }
}

fn lock_loads() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<String, u32>> {
    LOADING_BY_USER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long a download waits for its turn to load from the store.
const LOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A recording to send: the file, streamed as it is read, or its copy from
/// the shared store, read a part at a time (counted) as it is sent.
pub enum RecordingData {
    File(tokio::fs::File),
    Stored(StoredParts),
}

/// A recording in a shared store, sent a part at a time.
pub struct StoredParts {
    store: crate::store::Store,
    session_id: String,
    /// Parts, or 0: whole in its row (stored before parts).
    parts: i64,
    _permit: tokio::sync::SemaphorePermit<'static>,
    _user: UserLoad,
}

impl StoredParts {
    /// Its data, part after part: an error (a part deleted meanwhile, the
    /// store failing) ends the stream, and the download breaks off.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = std::result::Result<bytes::Bytes, Error>> + Send + 'static
    {
        let missing = |id: &str| Error::NotFound(format!("the recording of session {id} is gone"));
        futures_util::stream::try_unfold((self, 0i64), move |(s, part)| async move {
            let data = match (s.parts, part) {
                (0, 0) => s.store.recording_data(&s.session_id).await?,
                (0, _) => return Ok(None),
                (n, p) if p >= n => return Ok(None),
                (_, p) => s.store.recording_part(&s.session_id, p).await?,
            };
            let data = data.ok_or_else(|| missing(&s.session_id))?;
            Ok(Some((bytes::Bytes::from(data), (s, part + 1))))
        })
    }
}

/// How long one try at storing a recording may take: this, and a second
/// more per part.
const SHARE_TRY: std::time::Duration = std::time::Duration::from_secs(30);

impl Wicket {
    /// Whether recordings go to the store too: it is shared by every
    /// wicketd (PostgreSQL), and a session may be recorded by any of them.
    fn shared_recordings(&self) -> bool {
        self.store.is_shared()
    }

    /// Copies an ended session's recording to a shared store, so that every
    /// wicketd lists and plays it (a few tries; failures are logged, and
    /// the file stays here either way).
    pub async fn share_recording(&self, session_id: &str) {
        if !self.shared_recordings() {
            return;
        }
        let Some(path) = recording::path(&self.config.data_dir, session_id) else {
            return;
        };
        let Ok(_permit) = SHARING.acquire().await else {
            return;
        };
        let cannot = |e: std::io::Error| {
            tracing::warn!(session = %session_id, error = %e, "cannot read the recording to share it");
        };
        let size = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(e) => return cannot(e),
        };
        let Some(meta) = recording::read_meta(&path) else {
            tracing::warn!(session = %session_id, "recording has no readable header; not shared");
            return;
        };
        let part = RECORDING_PART as u64;
        let limit = SHARE_TRY + std::time::Duration::from_secs(size.div_ceil(part));
        let mut delay = std::time::Duration::from_secs(1);
        for attempt in 1..=4 {
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) => return cannot(e),
            };
            let stored = crate::clock::now().timestamp();
            let put = self
                .store
                .put_recording(&meta, &mut file, stored, RECORDING_PART);
            let result = match tokio::time::timeout(limit, put).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {} s", limit.as_secs())),
            };
            match result {
                Ok(()) => return,
                Err(e) if attempt < 4 => {
                    tracing::warn!(session = %session_id, error = %e, "storing the recording failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::error!(session = %session_id, error = %e, "recording not shared: only this wicketd plays it");
                }
            }
        }
    }

    /// Deletes the recordings of sessions that ended longer than
    /// `session.recording_retention` before `now` (started before that, and
    /// not written since): this wicketd's files (not a live session's),
    /// and (with a shared store) the store's copies, whichever wicketd made
    /// them. Each deletion is audited (`recording_deleted`) first: a store
    /// row in the same transaction, a file just before it goes (no record,
    /// no deletion). Failures are logged and tried again at the next sweep.
    pub async fn expire_recordings(&self, now: DateTime<Utc>) {
        let Some(keep) = self.config.session.recording_retention else {
            return;
        };
        // One that reaches before the calendar keeps everything.
        let Some(before) = now.checked_sub_signed(keep).map(|t| t.timestamp()) else {
            return;
        };
        let kept_for = crate::config::format_duration(keep);
        let event = |m: &recording::RecordingMeta, from: &'static str| {
            crate::audit::AuditEvent::RecordingDeleted {
                session: std::sync::Arc::new(crate::audit::SessionRef {
                    session_id: m.session_id.clone(),
                    user: m.user.clone(),
                    protocol: "ssh".into(),
                    resource: m.node.clone(),
                    login: m.login.clone(),
                    request_ids: m.request_ids.clone(),
                }),
                started: DateTime::<Utc>::from_timestamp(m.started, 0).unwrap_or_default(),
                kept_for: kept_for.clone(),
                from,
            }
        };
        if self.shared_recordings() {
            let time_ms = now.timestamp_millis();
            let deleted = self
                .store
                .delete_recordings_ended_before(before, |m| event(m, "store").to_row(time_ms))
                .await;
            match deleted {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(recordings = n, kept_for = %kept_for, "deleted expired recordings from the shared store")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot delete the shared store's expired recordings")
                }
            }
        }
        let data_dir = self.config.data_dir.clone();
        let expired =
            tokio::task::spawn_blocking(move || recording::ended_before(&data_dir, before))
                .await
                .unwrap_or_default();
        let mut removed = 0;
        // A live session's recording is still being written.
        for m in expired
            .into_iter()
            .filter(|m| !self.sessions.is_live(&m.session_id))
        {
            if let Err(e) = self.audit(event(&m, "data_dir"), now).await {
                tracing::error!(error = %e, "cannot audit the deletion of an expired recording; kept");
                break;
            }
            let data_dir = self.config.data_dir.clone();
            let gone =
                tokio::task::spawn_blocking(move || recording::remove(&data_dir, &m.session_id))
                    .await
                    .unwrap_or(false);
            removed += usize::from(gone);
        }
        if removed > 0 {
            tracing::info!(recordings = removed, kept_for = %kept_for, "deleted expired recordings");
        }
    }

    /// Copies to a shared store the recordings here that it lacks: a copy
    /// lost to this wicketd stopping right after a session, or to a store
    /// that was down through every try. Run at start; a session that began
    /// since is left to copy its own at its end (its recording is still
    /// being written, and the store keeps the first copy it gets).
    pub async fn share_missing_recordings(&self) {
        if !self.shared_recordings() {
            return;
        }
        let stored: std::collections::HashSet<String> = match self.store.list_recordings().await {
            Ok(rows) => rows.into_iter().map(|(m, _)| m.session_id).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the store's recordings; local ones not copied");
                return;
            }
        };
        let data_dir = self.config.data_dir.clone();
        let local = tokio::task::spawn_blocking(move || recording::list(&data_dir))
            .await
            .unwrap_or_default();
        // A session live here writes its recording still: it copies its
        // own at its end.
        // (At start, after `expire_recordings`: what is past its
        // retention is gone already, not copied only to be deleted.)
        let missing: Vec<String> = local
            .into_iter()
            .map(|m| m.session_id)
            .filter(|id| !stored.contains(id) && !self.sessions.is_live(id))
            .collect();
        if missing.is_empty() {
            return;
        }
        tracing::info!(
            recordings = missing.len(),
            "copying recordings the shared store lacks"
        );
        for id in missing {
            self.share_recording(&id).await;
        }
    }

    /// May the caller (an enabled user) read `owner`'s recordings (`None`:
    /// everyone's)? The policy's decision, for the caller's name.
    async fn recording_decision(
        &self,
        caller: &Caller,
        owner: Option<&str>,
    ) -> Result<(String, wicket_policy::Decision)> {
        let user = self.active_user(caller).await?;
        let standing = self.standing_in_force(caller, &user, crate::clock::now());
        let subject = Subject::new(&user.name, &standing.roles);
        let mut d = self
            .config
            .policy
            .roles
            .decide_recording_read(&subject, owner);
        if !d.allowed {
            d.reason = standing.explain(d.reason);
        }
        Ok((user.name.clone(), d))
    }

    async fn recording_access(&self, caller: &Caller, owner: Option<&str>) -> Result<()> {
        let (user, d) = self.recording_decision(caller, owner).await?;
        if !d.allowed {
            let now = crate::clock::now();
            return Err(self
                .deny_audited(&user, "recordings.read", d.reason, now)
                .await);
        }
        Ok(())
    }

    /// `GET /v1/recordings[?request=ID][&user=U]`.
    pub async fn list_recordings(
        &self,
        caller: &Caller,
        request: Option<String>,
        user: Option<String>,
    ) -> Result<Vec<RecordingInfo>> {
        // Without a user filter, only an auditor sees everyone's; others see their own.
        let owner = user.clone();
        let own_only = match &owner {
            Some(u) => {
                self.recording_access(caller, Some(u)).await?;
                false
            }
            // Not a refusal (the list is narrowed, not denied), but a
            // disabled user or a failing store is.
            None => !self.recording_decision(caller, None).await?.1.allowed,
        };
        let data_dir = self.config.data_dir.clone();
        let local = tokio::task::spawn_blocking(move || {
            recording::list(&data_dir)
                .into_iter()
                .map(|m| {
                    let size = recording::path(&data_dir, &m.session_id)
                        .and_then(|p| std::fs::metadata(p).ok())
                        .map_or(0, |md| md.len());
                    (m, size)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
        // With a shared store, the other wicketds' ended sessions too (and
        // this one's, copied there: listed once).
        let mut metas = local;
        if self.shared_recordings() {
            let seen: std::collections::HashSet<String> =
                metas.iter().map(|(m, _)| m.session_id.clone()).collect();
            // The store failing must not hide this wicketd's own files.
            let stored = self.store.list_recordings().await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot list the shared store's recordings");
                Vec::new()
            });
            metas.extend(
                stored
                    .into_iter()
                    .filter(|(m, _)| !seen.contains(&m.session_id)),
            );
            metas.sort_by(|(a, _), (b, _)| {
                b.started
                    .cmp(&a.started)
                    .then(a.session_id.cmp(&b.session_id))
            });
        }
        Ok(metas
            .into_iter()
            .filter(|(m, _)| !own_only || m.user == caller.user)
            .filter(|(m, _)| user.as_ref().is_none_or(|u| &m.user == u))
            .filter(|(m, _)| {
                request
                    .as_ref()
                    .is_none_or(|r| m.request_ids.iter().any(|x| x == r))
            })
            .map(|(m, size)| RecordingInfo {
                started: DateTime::<Utc>::from_timestamp(m.started, 0).unwrap_or_default(),
                session_id: m.session_id,
                user: m.user,
                node: m.node,
                login: m.login,
                request_ids: m.request_ids,
                size,
            })
            .collect())
    }

    /// `GET /v1/recordings/{id}`: the asciicast file.
    pub async fn recording(&self, caller: &Caller, session_id: &str) -> Result<RecordingData> {
        let path = recording::path(&self.config.data_dir, session_id)
            .ok_or_else(|| Error::BadRequest("not a session ID".into()))?;
        let not_found = || {
            Error::NotFound(match self.config.session.recording_retention {
                Some(keep) => format!(
                    "no recording of session {session_id} (it may have been deleted: \
                     recordings are kept {} after their session ended, \
                     session.recording_retention)",
                    crate::config::format_duration(keep)
                ),
                None => format!("no recording of session {session_id}"),
            })
        };
        if let Some(meta) = recording::read_meta(&path) {
            self.recording_access(caller, Some(&meta.user)).await?;
            return Ok(RecordingData::File(tokio::fs::File::open(&path).await?));
        }
        // Recorded by another wicketd sharing the store.
        if !self.shared_recordings() {
            return Err(not_found());
        }
        // Checked before a loading slot is taken: callers without access
        // never make others wait.
        let meta = self
            .store
            .recording_meta(session_id)
            .await?
            .ok_or_else(not_found)?;
        self.recording_access(caller, Some(&meta.user)).await?;
        let busy = || Error::Busy("too many recordings are being loaded; try again".into());
        let user = UserLoad::take(&caller.user).ok_or_else(|| {
            Error::Busy(format!(
                "you are downloading {LOADING_PER_USER} recordings from the store already; try again when one is done"
            ))
        })?;
        let permit = tokio::time::timeout(LOAD_WAIT, LOADING.acquire())
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())?;
        let parts = self
            .store
            .recording_parts(session_id)
            .await?
            .ok_or_else(not_found)?;
        Ok(RecordingData::Stored(StoredParts {
            store: self.store.clone(),
            session_id: session_id.to_owned(),
            parts,
            _permit: permit,
            _user: user,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    /// A stored recording goes out a part at a time, in order, holding its
    /// download's permit until the last; a part gone meanwhile breaks the
    /// download off with an error, not a short file that looks whole.
    /// One user has at most two downloads from the store at once; a slot
    /// comes back when a download ends.
    #[test]
    fn a_user_holds_at_most_two_store_downloads() {
        let a = UserLoad::take("slots-test").unwrap();
        let b = UserLoad::take("slots-test").unwrap();
        assert!(UserLoad::take("slots-test").is_none());
        let other = UserLoad::take("slots-test-other").unwrap();
        drop(a);
        let c = UserLoad::take("slots-test").unwrap();
        drop((b, c, other));
        assert!(!lock_loads().contains_key("slots-test"));
    }

    #[tokio::test]
    async fn a_stored_recording_streams_its_parts_and_holds_its_permit() {
        static COUNTED: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(
            &crate::config::Storage::Sqlite,
            dir.path(),
            crate::store::ChainKey::for_tests(),
        )
        .await
        .unwrap();
        let meta = recording::RecordingMeta {
            session_id: "s1".into(),
            user: "alice".into(),
            node: "node-1".into(),
            login: "ops".into(),
            request_ids: vec![],
            started: 1,
        };
        let data: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        store
            .put_recording(&meta, &mut data.as_slice(), 2, 1000)
            .await
            .unwrap();
        let parts = |permit| StoredParts {
            store: store.clone(),
            session_id: "s1".into(),
            parts: 3,
            _permit: permit,
            _user: UserLoad::take("streams-test").unwrap(),
        };
        let mut stream = Box::pin(parts(COUNTED.acquire().await.unwrap()).into_stream());
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= 1000);
            got.extend_from_slice(&chunk);
            assert_eq!(COUNTED.available_permits(), 0);
        }
        assert_eq!(got, data);
        drop(stream);
        assert_eq!(COUNTED.available_permits(), 1);

        // The last part goes (a retention sweep) after the download began.
        let mut stream = Box::pin(parts(COUNTED.acquire().await.unwrap()).into_stream());
        assert_eq!(stream.next().await.unwrap().unwrap().len(), 1000);
        let mut tx = store.begin().await.unwrap();
        sqlx::query("DELETE FROM session_recording_parts WHERE part = 2")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap().len(), 1000);
        let err = stream.next().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("is gone"), "{err}");
    }
}
