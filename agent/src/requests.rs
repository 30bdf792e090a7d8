//! `wicket request ...` and `wicket break-glass`: thin calls to the API and
//! readable output. Decisions are all the daemon's.

use crate::cli::query_escape as esc;
use crate::cli::{authenticated_client, reissue, Format};
use anyhow::{bail, Result};
use std::time::Duration;
use wicket_api::{ActionBody, BreakGlassBody, CreateRequest, Grant, ReviewBody, Secret};

/// A parsed `wicket request` command.
#[derive(Debug)]
pub enum Cmd {
    Create {
        body: CreateRequest,
        wait: bool,
        format: Format,
    },
    Ls {
        mine: bool,
        reviewable: bool,
        state: Option<String>,
        format: Format,
    },
    Show {
        id: String,
        format: Format,
    },
    Review {
        id: String,
        body: ReviewBody,
        format: Format,
    },
    Action {
        id: String,
        action: &'static str,
        body: ActionBody,
        format: Format,
    },
    Drop {
        id: Option<String>,
        format: Format,
    },
}

fn hm(secs: i64) -> String {
    let (h, m) = (secs / 3600, (secs % 3600) / 60);
    match (h, m) {
        (0, m) => format!("{m}m"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h{m}m"),
    }
}

/// Prints a request for people, with what others wrote in it made safe
/// for the terminal ([`crate::term::printable`]).
pub fn print_grant(g: &Grant) {
    out!("{}", crate::term::printable(&grant_text(g)));
}

/// Text others wrote, as the value of a field: its later lines indented
/// under the value, so none of them passes for a field of its own (a
/// reviewer's reason that reads as another reviewer's approval).
fn field_value(text: &str) -> String {
    text.replace('\n', "\n              ")
}

/// A request for people.
fn grant_text(g: &Grant) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "Request:      {}", g.id);
    let _ = writeln!(
        o,
        "Requester:    {} (standing roles: {})",
        g.requester,
        g.requester_normal_roles.join(", ")
    );
    let _ = writeln!(o, "Roles:        {}", g.requested_roles.join(", "));
    if !g.granted_roles.is_empty() && g.granted_roles != g.requested_roles {
        let _ = writeln!(o, "Granted:      {}", g.granted_roles.join(", "));
    }
    let _ = writeln!(
        o,
        "Status:       {}{}",
        g.status,
        if g.break_glass { " [BREAK-GLASS]" } else { "" }
    );
    let _ = writeln!(o, "Reason:       {}", field_value(&g.justification));
    if let Some(t) = &g.ticket_url {
        let _ = writeln!(o, "Ticket:       {t}");
    }
    let _ = writeln!(o, "Urgency:      {}", g.urgency);
    let _ = writeln!(o, "Duration:     {}", hm(g.requested_duration_secs));
    if let (Some(s), Some(e)) = (g.starts_at, g.expires_at) {
        let _ = writeln!(o, "Window:       {} to {}", s.to_rfc3339(), e.to_rfc3339());
    }
    if let Some(a) = &g.approved_by {
        let _ = writeln!(o, "Approved by:  {a}");
    }
    if !g.granted_permissions.is_empty() {
        let _ = writeln!(
            o,
            "Grants:       {}",
            g.granted_permissions.join("\n              ")
        );
    }
    for r in &g.reviews {
        let _ = writeln!(
            o,
            "Review:       {} {} at {}: {} (as {})",
            r.reviewer,
            r.verdict,
            r.at.to_rfc3339(),
            field_value(&r.reason),
            r.as_member_of.join(", ")
        );
    }
    if !g.still_needed.is_empty() {
        let _ = writeln!(o, "Still needed: {}", g.still_needed.join("; "));
    }
    if !g.can_review.is_empty() {
        let _ = writeln!(o, "Can review:   {}", g.can_review.join(", "));
    }
    if let Some(r) = &g.end_reason {
        let _ = writeln!(o, "Ended:        {}", field_value(r));
    }
    if let (Some(by), false) = (&g.revoked_by, g.status == "revoked") {
        // Revoked after it ended, to end the sessions left draining.
        let _ = writeln!(
            o,
            "Revoked:      by {by} after it ended: {}",
            field_value(g.revoke_reason.as_deref().unwrap_or_default())
        );
    }
    let _ = writeln!(o, "Actions:      {}", g.actions_taken);
    o
}

fn output(g: &Grant, format: Format) -> Result<()> {
    match format {
        Format::Json => crate::out::json(g)?,
        Format::Text => print_grant(g),
    }
    Ok(())
}

pub async fn run(cmd: Cmd) -> Result<()> {
    let (_, info, client) = authenticated_client()?;
    match cmd {
        Cmd::Create { body, wait, format } => {
            let g: Grant = client.post("/v1/requests", &body).await?;
            if !wait {
                return output(&g, format);
            }
            eprintln!(
                "request {} is {}; waiting for a decision (Ctrl-C to stop waiting; \
                 `wicket login --request-id {}` once it is approved)",
                g.id, g.status, g.id
            );
            let mut last = String::new();
            let mut unreachable = 0u32;
            loop {
                // wicketd restarting, or out of reach for a while, does not
                // end the wait: it is asked again, less often.
                let g: Grant = match client.get(&format!("/v1/requests/{}", esc(&g.id))).await {
                    Ok(g) => {
                        unreachable = 0;
                        g
                    }
                    Err(e)
                        if e.downcast_ref::<crate::client::ApiError>()
                            .is_none_or(|api| api.status.is_server_error()) =>
                    {
                        if unreachable == 0 {
                            eprintln!("  wicketd did not answer ({e:#}); still waiting");
                        }
                        unreachable += 1;
                        let backoff = Duration::from_secs(u64::from(unreachable.min(15)) * 2);
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let progress = format!("{} {}", g.status, g.still_needed.join("; "));
                if progress != last {
                    eprintln!(
                        "  {}{}",
                        g.status,
                        if g.still_needed.is_empty() {
                            String::new()
                        } else {
                            format!(": still needed: {}", g.still_needed.join("; "))
                        }
                    );
                    last = progress;
                }
                match g.status.as_str() {
                    "active" => {
                        eprintln!("approved; logging in with request {}", g.id);
                        return crate::cli::login_with_requests(
                            std::slice::from_ref(&g.id),
                            format,
                        )
                        .await;
                    }
                    "denied" | "expired" | "cancelled" | "revoked" => {
                        bail!(
                            "request {} {}: {}",
                            g.id,
                            g.status,
                            g.end_reason.unwrap_or_default()
                        )
                    }
                    _ => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        }
        Cmd::Ls {
            mine,
            reviewable,
            state,
            format,
        } => {
            let mut q = Vec::new();
            if mine {
                q.push("mine=true".to_owned());
            }
            if reviewable {
                q.push("reviewable=true".to_owned());
            }
            if let Some(s) = state {
                q.push(format!("state={}", esc(&s)));
            }
            let list: Vec<Grant> = client.get(&format!("/v1/requests?{}", q.join("&"))).await?;
            match format {
                Format::Json => crate::out::json(&list)?,
                Format::Text => {
                    outln!(
                        "{:<36}  {:<10}  {:<10}  {:<20}  {:<20}  REASON",
                        "ID",
                        "STATE",
                        "REQUESTER",
                        "ROLES",
                        "CREATED"
                    );
                    for g in &list {
                        let line = format!(
                            "{:<36}  {:<10}  {:<10}  {:<20}  {:<20}  {}",
                            g.id,
                            g.status,
                            g.requester,
                            g.requested_roles.join(","),
                            g.created_at.format("%Y-%m-%d %H:%M:%S"),
                            g.justification.lines().next().unwrap_or_default()
                        );
                        outln!("{}", crate::term::printable(&line).replace('\t', " "));
                    }
                }
            }
            Ok(())
        }
        Cmd::Show { id, format } => output(
            &client.get(&format!("/v1/requests/{}", esc(&id))).await?,
            format,
        ),
        Cmd::Review { id, body, format } => {
            if body.verdict.is_empty() {
                bail!("say --approve, --deny or --acknowledge");
            }
            let g: Grant = client
                .post(&format!("/v1/requests/{}/review", esc(&id)), &body)
                .await?;
            match format {
                Format::Json => crate::out::json(&g)?,
                Format::Text => outln!("request {} is now {}", g.id, g.status),
            }
            Ok(())
        }
        Cmd::Action {
            id,
            action,
            body,
            format,
        } => {
            let g: Grant = client
                .post(&format!("/v1/requests/{}/{action}", esc(&id)), &body)
                .await?;
            if format == Format::Json {
                return output(&g, format);
            }
            if action == "revoke" && g.status != "revoked" {
                outln!(
                    "request {} had already ended ({}); the revoke ends any sessions still draining under it",
                    g.id, g.status
                );
                return Ok(());
            }
            outln!(
                "request {} is now {}{}",
                g.id,
                g.status,
                g.expires_at
                    .filter(|_| action == "extend")
                    .map(|e| format!(" until {}", e.to_rfc3339()))
                    .unwrap_or_default()
            );
            Ok(())
        }
        Cmd::Drop { id, format } => {
            // Only live grants are dropped, and carried on (one revoked or
            // ended meanwhile needs neither).
            let held = crate::cli::active_held(&client, &info.request_ids).await?;
            let to_drop: Vec<String> = match id {
                Some(id) => vec![id],
                None => held.clone(),
            };
            if to_drop.is_empty() {
                bail!("you hold no active access requests in your current certificates");
            }
            for id in &to_drop {
                let g: Grant = client
                    .post(
                        &format!("/v1/requests/{}/drop", esc(id)),
                        &ActionBody::default(),
                    )
                    .await?;
                if format == Format::Text {
                    // Not `outln!`: a closed pipe must not stop the drops
                    // and the re-issue half way.
                    use std::io::Write;
                    let _ = writeln!(std::io::stdout(), "dropped request {} ({})", g.id, g.status);
                }
            }
            let keep: Vec<String> = held.into_iter().filter(|r| !to_drop.contains(r)).collect();
            reissue(&info.proxy, &info.user, &client, keep, format).await
        }
    }
}

pub async fn break_glass(
    roles: Vec<String>,
    reason: String,
    otp: String,
    duration: Option<String>,
    format: Format,
) -> Result<()> {
    let (_, info, client) = authenticated_client()?;
    // The grants held that are still live, carried on with the new one (an
    // ended one would make the server refuse the whole re-issue); asked
    // first, so that nothing stands between the grant and its certificate.
    let mut ids = crate::cli::active_held(&client, &info.request_ids).await?;
    let g: Grant = client
        .post(
            "/v1/break-glass",
            &BreakGlassBody {
                roles,
                reason,
                otp: Secret::new(otp),
                duration,
            },
        )
        .await?;
    eprintln!(
        "BREAK-GLASS grant {} is active until {}; security has been notified",
        g.id,
        g.expires_at.map(|e| e.to_rfc3339()).unwrap_or_default()
    );
    ids.push(g.id.clone());
    reissue(&info.proxy, &info.user, &client, ids, format).await
}
