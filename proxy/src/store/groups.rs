//! A session's statement events stored together. The statement events
//! (`db_query`, `db_execute`, ...) of one session that reach the store in
//! one batch become one row of kind `session_events` holding them all, in
//! order. A busy session then pays for a row, its index entries and its
//! chain link once per batch instead of once per statement. The stored
//! form is the only thing that changes: search expands such a row back
//! into the events it holds (each with its own ID, time, kind and data), so
//! no reader ever sees one, and the chain's hash covers the row as a whole.
//!
//! A row also stores how many of its events are actions taken under a
//! grant (`actions`), so counting them needs no JSON.

use super::AuditRow;
use crate::audit::{SESSION_ACTION_KINDS, STATEMENT_KINDS};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashMap;

/// The kind of a row holding a session's statement events.
pub const GROUP_KIND: &str = "session_events";
/// Most events in one row.
const MAX_EVENTS: usize = 256;
/// Most bytes of events (data, ID, time, kind and keys) in one row.
const MAX_BYTES: usize = 64 << 10;
/// Most time between a row's earliest and latest event. A row's time is
/// its earliest event's, so a search from time T looks at rows from
/// `T - SPAN_MS` on.
pub const SPAN_MS: i64 = 1000;

/// A row to insert, with the number of actions among its events.
#[derive(Debug)]
pub struct ToStore<'a> {
    pub row: Cow<'a, AuditRow>,
    pub actions: i64,
}

impl<'a> ToStore<'a> {
    fn one(row: &'a AuditRow) -> Self {
        Self {
            actions: i64::from(is_action(&row.kind)),
            row: Cow::Borrowed(row),
        }
    }
}

fn is_action(kind: &str) -> bool {
    SESSION_ACTION_KINDS.contains(&kind)
}

/// The rows that store `rows`: each session's statement events in a run
/// not broken by another event of that session go into one row (up to the
/// limits above); every other event is a row of its own. Events of one
/// session keep their order; rows of different sessions may interleave
/// differently than their events did (each event keeps its own time).
pub fn coalesce(rows: &[AuditRow]) -> Vec<ToStore<'_>> {
    let mut slots: Vec<Slot<'_>> = Vec::with_capacity(rows.len().min(64));
    // The open run of each session: its index in `slots`.
    let mut open: HashMap<&str, usize> = HashMap::new();
    for r in rows {
        let Some(session) = r.session_id.as_deref() else {
            slots.push(Slot::One(r));
            continue;
        };
        // Only data that is one JSON value (no space around it, which the
        // row would not keep) can be held verbatim inside a row's JSON.
        let data = match STATEMENT_KINDS.contains(&r.kind.as_str()) {
            true => serde_json::from_str::<&RawValue>(&r.data)
                .ok()
                .filter(|raw| raw.get().len() == r.data.len()),
            false => None,
        };
        let Some(data) = data else {
            open.remove(session);
            slots.push(Slot::One(r));
            continue;
        };
        if let Some(Slot::Run(run)) = open.get(session).and_then(|&i| slots.get_mut(i)) {
            if run.accepts(r) {
                run.push(r, data);
                continue;
            }
        }
        open.insert(session, slots.len());
        slots.push(Slot::Run(Run::new(r, data)));
    }
    slots
        .into_iter()
        .map(|s| match s {
            Slot::One(r) => ToStore::one(r),
            Slot::Run(run) => run.into_row(),
        })
        .collect()
}

enum Slot<'a> {
    One(&'a AuditRow),
    Run(Run<'a>),
}

/// One session's statement events gathered for one row.
struct Run<'a> {
    events: Vec<(&'a AuditRow, &'a RawValue)>,
    bytes: usize,
    earliest: i64,
    latest: i64,
}

impl<'a> Run<'a> {
    fn new(r: &'a AuditRow, data: &'a RawValue) -> Self {
        Self {
            events: vec![(r, data)],
            bytes: held_size(r),
            earliest: r.time_ms,
            latest: r.time_ms,
        }
    }

    fn accepts(&self, r: &AuditRow) -> bool {
        let first = self.events[0].0;
        self.events.len() < MAX_EVENTS
            && self.bytes + held_size(r) <= MAX_BYTES
            && first.actor == r.actor
            && first.request_id == r.request_id
            && within_span(r.time_ms.min(self.earliest), r.time_ms.max(self.latest))
    }

    fn push(&mut self, r: &'a AuditRow, data: &'a RawValue) {
        self.events.push((r, data));
        self.bytes += held_size(r);
        self.earliest = self.earliest.min(r.time_ms);
        self.latest = self.latest.max(r.time_ms);
    }

    fn into_row(self) -> ToStore<'a> {
        if let [(only, _)] = self.events[..] {
            return ToStore::one(only);
        }
        let actions = self
            .events
            .iter()
            .filter(|(r, _)| is_action(&r.kind))
            .count();
        // The row sorts where its earliest event does (search relies on no
        // event sorting before its row).
        let first = self
            .events
            .iter()
            .map(|(r, _)| *r)
            .min_by(|a, b| (a.time_ms, &a.id).cmp(&(b.time_ms, &b.id)))
            .unwrap_or(self.events[0].0);
        let body = Body {
            event: GROUP_KIND,
            events: self
                .events
                .iter()
                .map(|(r, data)| Held {
                    id: Cow::Borrowed(&r.id),
                    time: r.time_ms,
                    kind: Cow::Borrowed(&r.kind),
                    data,
                })
                .collect(),
        };
        ToStore {
            row: Cow::Owned(AuditRow {
                id: first.id.clone(),
                time_ms: first.time_ms,
                kind: GROUP_KIND.to_owned(),
                actor: first.actor.clone(),
                request_id: first.request_id.clone(),
                session_id: first.session_id.clone(),
                // Strings, integers and JSON already checked: this cannot
                // fail.
                data: serde_json::to_string(&body).unwrap_or_default(),
            }),
            actions: count(actions),
        }
    }
}

/// What `r` adds to a row: its data, ID and kind, and the JSON around them.
fn held_size(r: &AuditRow) -> usize {
    r.data.len() + r.id.len() + r.kind.len() + 48
}

fn within_span(earliest: i64, latest: i64) -> bool {
    latest.abs_diff(earliest) <= SPAN_MS.unsigned_abs()
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[derive(Serialize, Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow)]
    events: Vec<Held<'a>>,
}

#[derive(Serialize, Deserialize)]
struct Held<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    time: i64,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// The events a stored row holds: itself, unless it is a row of session
/// events. One that does not decode (changed by hand; `audit verify` says
/// so) is returned as it is stored rather than lost from view.
pub fn expand(row: AuditRow) -> Vec<AuditRow> {
    match held(&row) {
        Some(events) => events,
        None => vec![row],
    }
}

/// The events in a row of session events; `None` for any other row or one
/// that does not decode.
pub fn held(row: &AuditRow) -> Option<Vec<AuditRow>> {
    if row.kind != GROUP_KIND {
        return None;
    }
    let body: Body<'_> = serde_json::from_str(&row.data).ok()?;
    Some(
        body.events
            .into_iter()
            .map(|h| AuditRow {
                id: h.id.into_owned(),
                time_ms: h.time,
                kind: h.kind.into_owned(),
                actor: row.actor.clone(),
                request_id: row.request_id.clone(),
                session_id: row.session_id.clone(),
                data: h.data.get().to_owned(),
            })
            .collect(),
    )
}

/// What is wrong with a stored row of session events that `coalesce`
/// would not have written (`held`: what it holds, if it decodes): search
/// relies on each event sorting at or after its row and within `SPAN_MS`
/// of it. `None` for a sound row, and for any other kind of row.
pub fn check(row: &AuditRow, held: Option<&[AuditRow]>) -> Option<&'static str> {
    if row.kind != GROUP_KIND {
        return None;
    }
    let Some(held) = held else {
        return Some("its session events do not decode");
    };
    let key = (row.time_ms, row.id.as_str());
    let sound = held.iter().any(|e| (e.time_ms, e.id.as_str()) == key)
        && held.iter().all(|e| {
            (e.time_ms, e.id.as_str()) >= key
                && within_span(row.time_ms, e.time_ms)
                && STATEMENT_KINDS.contains(&e.kind.as_str())
        });
    (!sound).then_some("its session events are not what the store writes (search would miss some)")
}

/// The number of actions `row` stands for, as [`coalesce`] counted them
/// (`held`: what [`held`] found in it): what `audit verify` checks the
/// stored count against.
pub fn actions(row: &AuditRow, held: Option<&[AuditRow]>) -> i64 {
    match held {
        Some(events) => count(events.iter().filter(|e| is_action(&e.kind)).count()),
        None => i64::from(is_action(&row.kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(n: usize, session: Option<&str>, kind: &str, time_ms: i64) -> AuditRow {
        AuditRow {
            // Time-ordered like real IDs.
            id: format!("{time_ms:08}-{n:06}"),
            time_ms,
            kind: kind.into(),
            actor: Some("alice".into()),
            request_id: Some("r1".into()),
            session_id: session.map(str::to_owned),
            data: format!(
                r#"{{"event":"{kind}","n":{n},{}}}"#,
                SHAPES[n % SHAPES.len()]
            ),
        }
    }

    /// Event data of several shapes: escapes, spaces inside, nesting.
    const SHAPES: [&str; 4] = [
        r#""statement":"select \"q\" é""#,
        r#""statement":"tab\tand \u00e9 and \\ slash""#,
        r#""params":[1, 2.5e3, null, true],"nested":{"a":{"b":[]}}"#,
        r#""statement":"  spaced  ""#,
    ];

    fn flatten(stored: &[ToStore<'_>]) -> Vec<AuditRow> {
        stored
            .iter()
            .flat_map(|s| expand(s.row.clone().into_owned()))
            .collect()
    }

    #[test]
    fn a_sessions_statements_share_a_row_until_another_of_its_events() {
        let rows = vec![
            ev(0, Some("s1"), "session_started", 1),
            ev(1, Some("s1"), "db_parse", 2),
            ev(2, Some("s2"), "db_query", 2),
            ev(3, Some("s1"), "db_execute", 3),
            ev(4, None, "login_failed", 3),
            ev(5, Some("s2"), "db_query", 4),
            ev(6, Some("s1"), "db_error", 5),
            ev(7, Some("s1"), "session_ended", 6),
            ev(8, Some("s1"), "db_query", 7),
        ];
        let stored = coalesce(&rows);
        let kinds: Vec<&str> = stored.iter().map(|s| s.row.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "session_started",
                GROUP_KIND, // s1: parse, execute, error
                GROUP_KIND, // s2: both queries
                "login_failed",
                "session_ended",
                "db_query", // alone: stored as itself
            ]
        );
        let actions: Vec<i64> = stored.iter().map(|s| s.actions).collect();
        assert_eq!(actions, [1, 1, 2, 0, 0, 1]);
        assert_eq!(
            stored[1].row.id, rows[1].id,
            "a row is keyed by its earliest event"
        );
        assert_eq!(stored[1].row.time_ms, 2);
        assert_eq!(actions_of(&stored), 5);
        let mut back = flatten(&stored);
        back.sort_by(|a, b| (a.time_ms, &a.id).cmp(&(b.time_ms, &b.id)));
        assert_eq!(back, rows, "every event comes back exactly");
    }

    fn actions_of(stored: &[ToStore<'_>]) -> i64 {
        stored
            .iter()
            .map(|s| {
                assert_eq!(
                    s.actions,
                    actions(&s.row, held(&s.row).as_deref()),
                    "{:?}",
                    s.row
                );
                s.actions
            })
            .sum()
    }

    #[test]
    fn rows_have_limits_and_data_that_is_not_json_stays_alone() {
        let mut rows: Vec<AuditRow> = (0..MAX_EVENTS + 5)
            .map(|n| ev(n, Some("s1"), "db_query", 10))
            .collect();
        rows.push(ev(9000, Some("s1"), "db_query", 10 + SPAN_MS + 1));
        for (n, data) in [(9001, "not json"), (9002, " {}")] {
            let mut odd = ev(n, Some("s1"), "db_query", 10 + SPAN_MS + 1);
            odd.data = data.into();
            rows.push(odd);
        }
        let stored = coalesce(&rows);
        let sizes: Vec<usize> = stored
            .iter()
            .map(|s| held(&s.row).map_or(1, |e| e.len()))
            .collect();
        assert_eq!(sizes, [MAX_EVENTS, 5, 1, 1, 1]);
        assert_eq!(stored[3].row.data, "not json");
        assert_eq!(stored[4].row.data, " {}");
        let big = "x".repeat(MAX_BYTES / 2);
        let rows: Vec<AuditRow> = (0..3)
            .map(|n| {
                let mut e = ev(n, Some("s1"), "db_query", 1);
                e.data = format!(r#"{{"statement":"{big}"}}"#);
                e
            })
            .collect();
        assert_eq!(
            coalesce(&rows).len(),
            3,
            "a row holds at most {MAX_BYTES} bytes of events"
        );
    }

    #[test]
    fn a_changed_row_that_does_not_decode_is_shown_as_stored() {
        let rows = vec![
            ev(1, Some("s1"), "db_query", 1),
            ev(2, Some("s1"), "db_query", 1),
        ];
        let mut row = coalesce(&rows).remove(0).row.into_owned();
        row.data.truncate(20);
        assert!(held(&row).is_none());
        assert_eq!(expand(row.clone()), vec![row.clone()]);
        assert_eq!(actions(&row, held(&row).as_deref()), 0);
        assert_eq!(check(&row, None), Some("its session events do not decode"));
    }

    #[test]
    fn a_row_the_store_would_not_write_is_found() {
        let rows = vec![
            ev(1, Some("s1"), "db_query", 5),
            ev(2, Some("s1"), "db_execute", 6),
        ];
        let row = coalesce(&rows).remove(0).row.into_owned();
        assert_eq!(check(&row, Some(&rows)), None);
        assert_eq!(check(&rows[0], None), None, "not a row of session events");
        let changed = |f: &dyn Fn(&mut Vec<AuditRow>)| {
            let mut held = rows.clone();
            f(&mut held);
            check(&row, Some(&held))
        };
        // An event before its row, past the span, of another kind; a row
        // keyed by no event it holds.
        for f in [
            &|h: &mut Vec<AuditRow>| h[1].time_ms = 4,
            &|h: &mut Vec<AuditRow>| h[1].time_ms = 6 + SPAN_MS,
            &|h: &mut Vec<AuditRow>| h[1].kind = "session_ended".into(),
            &|h: &mut Vec<AuditRow>| h[0].id = "other".into(),
        ] as [&dyn Fn(&mut Vec<AuditRow>); 4]
        {
            assert!(changed(f).is_some());
        }
    }

    proptest! {
        /// Whatever the mix of sessions, actors, kinds and times: every
        /// event is stored once and comes back exactly (its actor too),
        /// each session's events keep their order, no event sorts before
        /// its row, and the action counts add up.
        #[test]
        fn coalescing_loses_and_reorders_nothing(
            spec in proptest::collection::vec((0usize..4, 0usize..5, 0i64..3000, any::<bool>()), 0..300)
        ) {
            const KINDS: [&str; 5] = ["db_query", "db_parse", "db_execute", "session_ended", "db_error"];
            const SESSIONS: [Option<&str>; 4] = [Some("s1"), Some("s2"), Some("s3"), None];
            let rows: Vec<AuditRow> = spec
                .iter()
                .enumerate()
                .map(|(n, &(s, k, t, bob))| AuditRow {
                    actor: Some(if bob { "bob" } else { "alice" }.into()),
                    ..ev(n, SESSIONS[s], KINDS[k], t)
                })
                .collect();
            let stored = coalesce(&rows);
            for s in &stored {
                prop_assert_eq!(check(&s.row, held(&s.row).as_deref()), None);
                let events = expand(s.row.clone().into_owned());
                for e in &events {
                    prop_assert!((s.row.time_ms, &s.row.id) <= (e.time_ms, &e.id));
                    prop_assert!(e.time_ms - s.row.time_ms <= SPAN_MS);
                }
            }
            let expected_actions = rows.iter().filter(|r| is_action(&r.kind)).count() as i64;
            prop_assert_eq!(actions_of(&stored), expected_actions);
            let back = flatten(&stored);
            for session in SESSIONS {
                let want: Vec<&AuditRow> = rows.iter().filter(|r| r.session_id.as_deref() == session).collect();
                let got: Vec<&AuditRow> = back.iter().filter(|r| r.session_id.as_deref() == session).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
