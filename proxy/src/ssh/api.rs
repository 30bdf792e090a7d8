//! Recordings over the API: list them and fetch one, as the policy allows
//! (your own sessions, or everyone's with a role that has `audit: true`).

use super::recording;
use crate::error::{Error, Result};
use crate::service::{Caller, Wicket};
use chrono::{DateTime, Utc};
use wicket_api::RecordingInfo;
use wicket_policy::Subject;

impl Wicket {
    async fn recording_access(&self, caller: &Caller, owner: Option<&str>) -> Result<()> {
        let user = self.active_user(caller).await?;
        let roles = self.standing_roles(&user);
        let subject = Subject::new(&user.name, &roles);
        let d = self
            .config
            .policy
            .roles
            .decide_recording_read(&subject, owner);
        if !d.allowed {
            let now = crate::clock::now();
            return Err(self
                .deny_audited(&user.name, "recordings.read", d.reason, now)
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
            None => self.recording_access(caller, None).await.is_err(),
        };
        let data_dir = self.config.data_dir.clone();
        let metas = tokio::task::spawn_blocking(move || recording::list(&data_dir))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(metas
            .into_iter()
            .filter(|m| !own_only || m.user == caller.user)
            .filter(|m| user.as_ref().is_none_or(|u| &m.user == u))
            .filter(|m| {
                request
                    .as_ref()
                    .is_none_or(|r| m.request_ids.iter().any(|x| x == r))
            })
            .map(|m| {
                let size = recording::path(&self.config.data_dir, &m.session_id)
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map(|md| md.len())
                    .unwrap_or(0);
                RecordingInfo {
                    started: DateTime::<Utc>::from_timestamp(m.started, 0).unwrap_or_default(),
                    session_id: m.session_id,
                    user: m.user,
                    node: m.node,
                    login: m.login,
                    request_ids: m.request_ids,
                    size,
                }
            })
            .collect())
    }

    /// `GET /v1/recordings/{id}`: the asciicast file.
    pub async fn recording(&self, caller: &Caller, session_id: &str) -> Result<Vec<u8>> {
        let path = recording::path(&self.config.data_dir, session_id)
            .ok_or_else(|| Error::BadRequest("not a session ID".into()))?;
        let meta = recording::read_meta(&path)
            .ok_or_else(|| Error::NotFound(format!("no recording of session {session_id}")))?;
        self.recording_access(caller, Some(&meta.user)).await?;
        Ok(tokio::fs::read(&path).await?)
    }
}
