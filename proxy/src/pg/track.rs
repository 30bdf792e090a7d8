//! Which statement each Execute really ran: the prepared statements and
//! portals the server holds, as its responses confirm them.
//!
//! Clients pipeline Parse, Bind, Execute, Close and Sync without waiting, and
//! the server may refuse any of them (a named statement that already exists,
//! a syntax error, a Close skipped after an earlier error). Taking each Parse
//! at its word would let a client make the audit log lie: prepare `s1` as a
//! `DELETE`, send a Parse of `s1` as `SELECT 1` that the server refuses, then
//! execute `s1` — audited as `SELECT 1`. So the tracker queues what the
//! client sent, matches the server's answers to it in order (ParseComplete,
//! BindComplete, CloseComplete, RowDescription/NoData, CommandComplete,
//! ErrorResponse, ReadyForQuery), drops the work an ErrorResponse makes the
//! server skip (everything up to the next Sync), and reports an Execute only
//! when the server answers it — with the statement of the portal as the
//! server bound it. Simple Queries and function calls are audited as sent;
//! those the server skips this way are reported by [`Tracker::take_skipped`]. A simple Query destroys the unnamed statement and portal;
//! a transaction's end drops every portal. During COPY FROM STDIN the server
//! ignores Sync until CopyDone/CopyFail, and so does the tracker; but an
//! error that ends the COPY before the server reads such a Sync makes it
//! count again, so after an error in a COPY that took Syncs the tracker
//! accepts only answers that fit either way, and every ReadyForQuery must
//! answer the message at the front (one more than expected is a
//! [`Desync`]).
//!
//! It fails closed: an answer that does not fit what is queued (or a client
//! message the server would swallow during COPY) is a [`Desync`], and the
//! proxy then ends the session rather than audit guesses. SQL that touches
//! protocol names is not parsed: after a `PREPARE`, `DEALLOCATE`, `CLOSE`
//! (of a cursor), `DISCARD` or `DO` the tracker forgets the named statements
//! or portals it may have changed (see [`Tracker::completed`]), and an
//! Execute of one it does not know is audited with [`unknown_statement`] or
//! an unknown-portal text (the SQL itself is audited as a query). Dynamic
//! SQL inside a function called by another statement (`SELECT f()` where
//! `f` re-opens a cursor or re-prepares a statement) is not seen as it
//! happens; the server's command tag for the Execute goes on the record,
//! and when it names another command than the bound text begins with, the
//! Execute is marked and the tracker forgets its names
//! ([`Tracker::completed`]). A change to another command of the
//! same kind (one `SELECT` for another) still shows only in the function's
//! definition and call, which are on the record as queries. Executes still
//! unanswered when the connection ends are reported by [`Tracker::unanswered`].
//!
//! Pure bookkeeping: no I/O; the proxy feeds it messages in wire order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A Bind's recorded parameter values (`None`: NULL), kept by its portal
/// until its first Execute carries them. It may hold fewer than the Bind's
/// parameter count: the rest were over what one event records.
pub type Values = Arc<[Option<String>]>;

/// What holding one value costs besides its text (a NULL or an empty one
/// too): counted, so a Bind of 65,535 NULLs weighs what it holds.
pub const VALUE_COST: usize = std::mem::size_of::<Option<String>>();

/// A portal's statement text, parameter count, (if recorded) values, and
/// whether an Execute of it was reported (and took the values).
pub type BoundPortal = (Arc<str>, usize, Option<Values>, bool);

fn values_weight(values: &Option<Values>) -> usize {
    values
        .iter()
        .flat_map(|v| v.iter())
        .map(|v| VALUE_COST + v.as_ref().map_or(0, String::len))
        .sum()
}

/// A client message that the server answers (or, for `CopyEnd`, that ends
/// a COPY FROM STDIN).
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    Parse {
        name: String,
        text: String,
    },
    Bind {
        portal: String,
        statement: String,
        params: usize,
        values: Option<Values>,
    },
    Describe,
    Execute {
        portal: String,
    },
    Close {
        statement: bool,
        name: String,
    },
    Sync,
    /// A simple Query, with its text.
    Query(Arc<str>),
    /// A FunctionCall, described.
    FunctionCall(Arc<str>),
    /// CopyDone or CopyFail: no answer of its own.
    CopyEnd,
}

impl Sent {
    /// Bytes of text and values it holds while unanswered.
    fn weight(&self) -> usize {
        match self {
            Sent::Parse { text, .. } => text.len(),
            Sent::Bind { values, .. } => values_weight(values),
            Sent::Query(text) | Sent::FunctionCall(text) => text.len(),
            _ => 0,
        }
    }

    /// Part of the extended protocol: an error skips to the next Sync.
    fn extended(&self) -> bool {
        !matches!(
            self,
            Sent::Sync | Sent::Query(_) | Sent::FunctionCall(_) | Sent::CopyEnd
        )
    }

    fn name(&self) -> &'static str {
        match self {
            Sent::Parse { .. } => "Parse",
            Sent::Bind { .. } => "Bind",
            Sent::Describe => "Describe",
            Sent::Execute { .. } => "Execute",
            Sent::Close { .. } => "Close",
            Sent::Sync => "Sync",
            Sent::Query(_) => "Query",
            Sent::FunctionCall(_) => "FunctionCall",
            Sent::CopyEnd => "CopyDone/CopyFail",
        }
    }
}

/// An Execute the server ran (or, when `answered` is false, that was sent
/// and not answered before the connection ended): its portal and what the
/// portal was bound to.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    pub portal: String,
    /// Shared with the portal it ran: repeated Executes hold one copy.
    pub statement: Arc<str>,
    pub params: usize,
    /// The Bind's values, on the first Execute of its portal only.
    pub values: Option<Values>,
    /// An Execute of a portal executed before (fetching more of its rows):
    /// its values are on the first.
    pub continued: bool,
    pub answered: bool,
    /// The server's command tag when it completed (`DELETE 3`).
    pub completed: Option<String>,
    /// The tag names another command than the statement's text: the portal
    /// ran something else than it was bound to (see
    /// [`Tracker::completed`]).
    pub not_as_bound: bool,
}

/// The server's answers no longer fit what the client sent: the tracker
/// cannot tell which statement runs next, so the session must end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desync(pub String);

impl std::fmt::Display for Desync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The command tag a statement completes with, when its text says for
/// sure: it begins (after blanks, comments and opening parentheses) with
/// `SELECT`, `VALUES` or `TABLE` (tag `SELECT`), `INSERT`, `UPDATE`, `DELETE`
/// or `MERGE`. `WITH` may lead to any of them: not said.
fn expected_command(statement: &str) -> Option<&'static str> {
    let mut s = statement;
    loop {
        s = s.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(rest) = s.strip_prefix("--") {
            // PostgreSQL's lexer ends a line comment at either.
            s = rest.split_once(['\n', '\r']).map_or("", |(_, r)| r);
        } else if let Some(rest) = s.strip_prefix("/*") {
            // Block comments nest in PostgreSQL.
            let (mut depth, mut at) = (1usize, 0usize);
            let b = rest.as_bytes();
            while depth > 0 && at < b.len() {
                if b[at..].starts_with(b"/*") {
                    depth += 1;
                    at += 2;
                } else if b[at..].starts_with(b"*/") {
                    depth -= 1;
                    at += 2;
                } else {
                    at += 1;
                }
            }
            s = rest.get(at..).unwrap_or("");
        } else {
            break;
        }
    }
    let end = s
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(s.len());
    let word = &s[..end];
    [
        ("SELECT", "SELECT"),
        ("VALUES", "SELECT"),
        ("TABLE", "SELECT"),
        ("INSERT", "INSERT"),
        ("UPDATE", "UPDATE"),
        ("DELETE", "DELETE"),
        ("MERGE", "MERGE"),
    ]
    .into_iter()
    .find(|(w, _)| w.eq_ignore_ascii_case(word))
    .map(|(_, tag)| tag)
}

/// The audited text of a statement the tracker does not know.
pub fn unknown_statement(name: &str) -> String {
    format!(
        "(prepared statement {name:?} not known to wicket: made with SQL PREPARE, \
         or beyond what one session may track; see this session's queries)"
    )
}

/// Most bytes of statement text and parameter values kept per session.
const MAX_HELD_BYTES: usize = 32 << 20;

/// Prepared statements and portals of one session.
#[derive(Debug)]
pub struct Tracker {
    statements: Weighed<Arc<str>>,
    portals: Weighed<BoundPortal>,
    pending: VecDeque<Sent>,
    /// Bytes of text and values in `pending`.
    pending_bytes: usize,
    /// How many statements, portals and unanswered messages are kept.
    limit: usize,
    /// An error made the server skip to the next Sync, which is not sent
    /// yet: what is sent until then is skipped too.
    skipping: bool,
    /// The front message has had an answer: an Execute whose COPY began
    /// (reported then), or a Query or function call, which gets one before
    /// its ReadyForQuery.
    front_answered: bool,
    /// The server is in COPY FROM STDIN and the client has not ended it.
    copy_in: bool,
    /// Syncs sent during the COPY FROM STDIN now running were taken as
    /// ignored, which holds only if the server read them before any error
    /// ended the COPY (see [`Tracker::received`] on ErrorResponse).
    copy_syncs_taken: bool,
    /// Skipping to the next Sync after such an error: only COPY messages,
    /// which the server drops either way, may come before it.
    skipping_after_copy: bool,
    /// Queries and function calls the server skipped (an error in the
    /// extended protocol before the next Sync), not yet taken.
    skipped: Vec<Arc<str>>,
}

/// What a kept value costs, in bytes of text.
trait Weight {
    fn weight(&self) -> usize;
}

impl Weight for Arc<str> {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// A portal holds its text (shared with its statement, counted again: a
/// statement closed after binding stays alive in its portals) and values.
impl Weight for BoundPortal {
    fn weight(&self) -> usize {
        self.0.len() + values_weight(&self.2)
    }
}

/// A map by name that keeps the total weight of its values.
#[derive(Debug)]
struct Weighed<V> {
    map: HashMap<String, V>,
    bytes: usize,
}

impl<V: Weight> Weighed<V> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            bytes: 0,
        }
    }

    fn get(&self, name: &str) -> Option<&V> {
        self.map.get(name)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn insert(&mut self, name: String, v: V) {
        self.remove(&name);
        self.bytes += v.weight();
        self.map.insert(name, v);
    }

    fn remove(&mut self, name: &str) {
        if let Some(v) = self.map.remove(name) {
            self.bytes -= v.weight();
        }
    }

    /// Changes `name`'s value in place (if held), weighing it again.
    fn update<R>(&mut self, name: &str, change: impl FnOnce(&mut V) -> R) -> Option<R> {
        let v = self.map.get_mut(name)?;
        self.bytes -= v.weight();
        let r = change(v);
        self.bytes += v.weight();
        Some(r)
    }

    fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        let bytes = &mut self.bytes;
        self.map.retain(|name, v| {
            let kept = keep(name);
            if !kept {
                *bytes -= v.weight();
            }
            kept
        });
    }
}

impl Tracker {
    pub fn new(limit: usize) -> Self {
        Self {
            statements: Weighed::new(),
            portals: Weighed::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            limit,
            skipping: false,
            front_answered: false,
            copy_in: false,
            copy_syncs_taken: false,
            skipping_after_copy: false,
            skipped: Vec::new(),
        }
    }

    /// Too many unanswered messages, or too many bytes of their text and
    /// values: the proxy stops reading the client until the server catches
    /// up (a client that does not read its answers cannot make it hold more).
    pub fn is_full(&self) -> bool {
        self.pending.len() >= self.limit || self.pending_bytes >= MAX_HELD_BYTES
    }

    /// A client message, in wire order.
    pub fn sent(&mut self, s: Sent) -> Result<(), Desync> {
        if self.copy_in {
            match s {
                // Ignored by the server during COPY FROM STDIN, unless an
                // error ended the COPY before the server read it.
                Sent::Sync => {
                    self.copy_syncs_taken = true;
                    return Ok(());
                }
                Sent::CopyEnd => {
                    self.copy_in = false;
                    return Ok(());
                }
                other => {
                    return Err(Desync(format!(
                        "the client sent {} during COPY FROM STDIN",
                        other.name()
                    )))
                }
            }
        }
        if self.skipping {
            if s != Sent::Sync {
                if self.skipping_after_copy && s != Sent::CopyEnd {
                    // Skipped if the server read the COPY's Syncs before
                    // the error, run if one of them ended the skip.
                    return Err(Desync(format!(
                        "the client sent {} after an error ended a COPY FROM STDIN during \
                         which it had sent Sync, and before another Sync",
                        s.name()
                    )));
                }
                self.note_skipped(s);
                return Ok(());
            }
            self.skipping = false;
            self.skipping_after_copy = false;
        }
        // A COPY end with nothing before it that could start a COPY is
        // ignored by the server (a COPY that failed to start).
        if s == Sent::CopyEnd && self.pending.is_empty() {
            return Ok(());
        }
        self.pending_bytes += s.weight();
        self.pending.push_back(s);
        Ok(())
    }

    /// A message the server skips: a query or function call among them is
    /// kept for [`Tracker::take_skipped`] (it was audited as sent).
    fn note_skipped(&mut self, s: Sent) {
        if let Sent::Query(text) | Sent::FunctionCall(text) = s {
            self.skipped.push(text);
        }
    }

    /// The queries and function calls the server skipped since the last
    /// call, in the order sent.
    pub fn take_skipped(&mut self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.skipped)
    }

    fn front_is(&self, f: impl Fn(&Sent) -> bool) -> bool {
        self.pending.front().is_some_and(f)
    }

    /// Removes the answered front entry (and COPY ends that reach the front:
    /// nothing before them started a COPY, so the server ignores them).
    fn pop(&mut self) -> Option<Sent> {
        self.front_answered = false;
        let front = self.pending.pop_front();
        self.pending_bytes = self
            .pending_bytes
            .saturating_sub(front.as_ref().map_or(0, Sent::weight));
        while self.front_is(|s| *s == Sent::CopyEnd) {
            self.pending.pop_front();
        }
        front
    }

    fn desync(&self, answer: &str) -> Desync {
        Desync(format!(
            "the server sent {answer} while the next unanswered client message is {}",
            self.pending.front().map_or("none", Sent::name)
        ))
    }

    /// A server message (`tag`, and for ReadyForQuery its status byte), in
    /// wire order. Returns the Execute it shows the server ran, if any.
    pub fn received(&mut self, tag: u8, status: u8) -> Result<Option<Executed>, Desync> {
        Ok(match tag {
            b'1' => {
                let Some(Sent::Parse { name, text }) = self.pending.front().cloned() else {
                    return Err(self.desync("ParseComplete"));
                };
                self.pop();
                self.remember_statement(name, text);
                None
            }
            b'2' => {
                let Some(Sent::Bind {
                    portal,
                    statement,
                    params,
                    values,
                }) = self.pending.front().cloned()
                else {
                    return Err(self.desync("BindComplete"));
                };
                self.pop();
                self.remember_portal(portal, &statement, params, values);
                None
            }
            b'3' => {
                let Some(Sent::Close { statement, name }) = self.pending.front().cloned() else {
                    return Err(self.desync("CloseComplete"));
                };
                self.pop();
                self.closed(statement, &name);
                None
            }
            b'T' | b'n' => {
                if self.front_is(|s| *s == Sent::Describe) {
                    self.pop();
                } else if self.front_is(|s| matches!(s, Sent::Query(_))) {
                    self.front_answered = true;
                } else {
                    return Err(self.desync("a row description"));
                }
                None
            }
            // Execute done: CommandComplete, EmptyQueryResponse, PortalSuspended.
            b'C' | b'I' | b's' => {
                // The server read the end of any COPY that was running, and
                // so every Sync before it, in COPY: ignored, as taken.
                self.copy_syncs_taken = false;
                if self.front_is(|s| matches!(s, Sent::Execute { .. })) {
                    self.execute_answered(true, true)
                } else if tag != b's' && self.front_is(|s| matches!(s, Sent::Query(_))) {
                    self.front_answered = true;
                    None
                } else {
                    return Err(self.desync("a command's completion"));
                }
            }
            b'V' => {
                if !self.front_is(|s| matches!(s, Sent::FunctionCall(_))) {
                    return Err(self.desync("a function call's result"));
                }
                self.front_answered = true;
                None
            }
            // COPY began: report now (CommandComplete comes at its end).
            b'G' | b'H' | b'W' => {
                let ran = if self.front_is(|s| matches!(s, Sent::Execute { .. })) {
                    self.execute_answered(false, true)
                } else if self.front_is(|s| matches!(s, Sent::Query(_))) {
                    self.front_answered = true;
                    None
                } else {
                    return Err(self.desync("a COPY start"));
                };
                if tag == b'G' {
                    self.copy_in_began()?;
                }
                ran
            }
            b'E' => {
                // Whatever COPY was running ended with the error.
                self.copy_in = false;
                let syncs_taken = std::mem::take(&mut self.copy_syncs_taken);
                if !self.front_is(Sent::extended) {
                    // A simple Query's or a Sync's error (ReadyForQuery
                    // follows), or one answering nothing (a FATAL). A Sync
                    // taken as ignored by a COPY that this error ended may
                    // have come after it and get a ReadyForQuery of its
                    // own: one more than expected, which fails below.
                    if self.front_is(|s| matches!(s, Sent::Query(_) | Sent::FunctionCall(_))) {
                        self.front_answered = true;
                    }
                    return Ok(None);
                }
                // The server skips everything up to the next Sync it reads.
                // If it read one of the COPY's Syncs only after the error,
                // that one ended the skip, and what came after it runs.
                if syncs_taken && !matches!(self.pending.get(1), None | Some(Sent::Sync)) {
                    return Err(Desync(format!(
                        "an error ended a COPY FROM STDIN during which the client sent Sync, \
                         with {} sent after it: whether the server skips it depends on when \
                         the error came",
                        self.pending.get(1).map_or("none", Sent::name)
                    )));
                }
                let ran = self.execute_answered(true, false);
                while self.front_is(|s| !matches!(s, Sent::Sync)) {
                    if let Some(s) = self.pop() {
                        self.note_skipped(s);
                    }
                }
                self.skipping = self.pending.is_empty();
                self.skipping_after_copy = self.skipping && syncs_taken;
                ran
            }
            b'Z' => {
                // Each ReadyForQuery answers the front message: a Sync, or
                // a Query or function call after its own answer. Anything
                // else means the server ran what the tracker does not
                // expect (a Sync it took for ignored during a COPY).
                let fits = match self.pending.front() {
                    Some(Sent::Sync) => true,
                    Some(Sent::Query(_) | Sent::FunctionCall(_)) => self.front_answered,
                    _ => false,
                };
                if !fits {
                    return Err(self.desync("ReadyForQuery"));
                }
                if let Some(Sent::Query(_)) = self.pop() {
                    self.forget_unnamed();
                }
                if status == b'I' {
                    // Portals live until their transaction ends.
                    self.portals.clear();
                }
                None
            }
            _ => None,
        })
    }

    /// The command tag of a CommandComplete. SQL shares its names with the
    /// protocol: `PREPARE`, `DEALLOCATE` and `DISCARD` change the named
    /// statements; SQL cursors are portals, so `CLOSE` closes a protocol
    /// portal and `DISCARD ALL` every one; a transaction's end drops its
    /// portals even when another begins at once (`COMMIT AND CHAIN`,
    /// `PREPARE TRANSACTION`), and `ROLLBACK TO SAVEPOINT` those made since
    /// the savepoint; a `DO` block or a procedure (`CALL`) may do any of it
    /// through dynamic SQL. The tracker does not parse
    /// SQL, so it forgets what such a command may have changed: an Execute
    /// of it is then audited as unknown, never as the text it had before.
    ///
    /// `ran` is the Execute the tag completes, if the tracker reported one:
    /// the tag goes on its record. Dynamic SQL in a function called by
    /// another statement can close a portal and open a cursor of that name,
    /// or re-prepare a statement, unseen here. The server's tag always names
    /// the command it ran (a rule's `INSTEAD` keeps the original's type), so
    /// when the statement's text says which command it is and the tag names
    /// another, the portal was changed: the Execute is marked
    /// `not_as_bound`, and the tracker forgets every named statement and
    /// portal, whose texts it can no longer vouch for. A check, not a
    /// boundary: a change to a command of the same type, or behind a text
    /// that begins with `WITH`, passes. An empty tag (an oversized or
    /// malformed CommandComplete) says nothing.
    pub fn completed(&mut self, command_tag: &str, ran: Option<&mut Executed>) {
        let word = command_tag.split(' ').next().unwrap_or_default();
        let (mut statements, portals) = match word {
            // `PREPARE TRANSACTION` ends the transaction.
            "PREPARE" if command_tag == "PREPARE TRANSACTION" => (false, true),
            "PREPARE" | "DEALLOCATE" => (true, false),
            "CLOSE" | "COMMIT" | "ROLLBACK" | "RELEASE" => (false, true),
            // A procedure, like a `DO` block, may run any SQL, and commit.
            "DISCARD" | "DO" | "CALL" => (true, true),
            _ => (false, false),
        };
        let mut named_portals = false;
        if let Some(e) = ran.filter(|_| !command_tag.is_empty()) {
            e.completed = Some(command_tag.to_owned());
            if expected_command(&e.statement).is_some_and(|want| want != word) {
                e.not_as_bound = true;
                statements = true;
                named_portals = true;
            }
        }
        // The unnamed statement has no SQL name; the unnamed portal goes
        // too at a transaction's end (it is rebound before use).
        if statements {
            self.statements.retain(str::is_empty);
        }
        if portals {
            self.portals.clear();
        } else if named_portals {
            self.portals.retain(str::is_empty);
        }
    }

    /// The text of the simple Query the server is answering, if that is
    /// what it answers now (a COPY it started, say).
    pub fn answering_query(&self) -> Option<Arc<str>> {
        match self.pending.front() {
            Some(Sent::Query(text)) => Some(text.clone()),
            _ => None,
        }
    }

    /// Whether anything sent still awaits the server's answer.
    pub fn awaiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The connection ended: the Executes sent and not answered (the server
    /// may have run them), with the statements they would run if everything
    /// before them succeeded. SQL in a query or function call before them
    /// may have changed any named statement or portal (`PREPARE`, `CLOSE`,
    /// ...): after one, those are unknown, as after a `DISCARD`.
    pub fn unanswered(&mut self) -> Vec<Executed> {
        let mut out = Vec::new();
        self.pending_bytes = 0;
        let mut reported = self.front_answered;
        while let Some(s) = self.pending.pop_front() {
            match s {
                Sent::Parse { name, text } => self.remember_statement(name, text),
                Sent::Bind {
                    portal,
                    statement,
                    params,
                    values,
                } => self.remember_portal(portal, &statement, params, values),
                Sent::Execute { portal } if !reported => {
                    let mut e = self.executed(portal, true);
                    e.answered = false;
                    out.push(e);
                }
                Sent::Close { statement, name } => self.closed(statement, &name),
                Sent::Query(_) | Sent::FunctionCall(_) => {
                    self.statements.clear();
                    self.portals.clear();
                }
                _ => {}
            }
            reported = false;
        }
        out
    }

    /// Bytes of text and values kept for this session.
    fn held(&self) -> usize {
        self.statements.bytes + self.portals.bytes
    }

    /// A Close of a statement (or a portal) `name` took effect.
    fn closed(&mut self, statement: bool, name: &str) {
        if statement {
            self.statements.remove(name);
        } else {
            self.portals.remove(name);
        }
    }

    fn forget_unnamed(&mut self) {
        self.statements.remove("");
        self.portals.remove("");
    }

    fn remember_statement(&mut self, name: String, text: String) {
        self.statements.remove(&name);
        if self.statements.len() < self.limit && self.held() + text.len() <= MAX_HELD_BYTES {
            self.statements.insert(name, text.into());
        }
    }

    /// A portal bound to `statement`; past the session's limits it is kept
    /// without values, then with a marker instead of its text, and past the
    /// count limit not at all (its Execute is then audited as unknown).
    fn remember_portal(
        &mut self,
        name: String,
        statement: &str,
        params: usize,
        values: Option<Values>,
    ) {
        self.portals.remove(&name);
        if self.portals.len() >= self.limit {
            return;
        }
        let text = match self.statements.get(statement) {
            Some(t) => t.clone(),
            None => unknown_statement(statement).into(),
        };
        let mut portal = (text, params, values, false);
        if self.held() + portal.weight() > MAX_HELD_BYTES {
            // Recorded as none of them (its event counts them all as not
            // recorded), not as values that were never asked for.
            portal.2 = portal.2.map(|_| Values::from([]));
        }
        if self.held() + portal.weight() > MAX_HELD_BYTES {
            portal.0 = unknown_statement(statement).into();
        }
        self.portals.insert(name, portal);
    }

    /// What the Execute of `portal` ran. A portal the tracker does not hold
    /// is unknown when the server ran it (`ok`), and nothing when the server
    /// refused the Execute (no such portal). The first Execute of a portal
    /// takes its values (they are on the record once, however many
    /// Executes fetch its rows).
    fn executed(&mut self, portal: String, ok: bool) -> Executed {
        // In place: this runs once per Execute.
        let taken = self
            .portals
            .update(&portal, |(text, params, values, before)| {
                let continued = std::mem::replace(before, true);
                (text.clone(), *params, values.take(), continued)
            });
        let mut continued = false;
        let (statement, params, values) = match taken {
            Some((text, params, values, before)) => {
                continued = before;
                (text, params, values)
            }
            None if ok => (
                format!(
                    "(portal {portal:?} not known to wicket: an SQL cursor, or beyond what \
                     one session may track; see this session's queries)"
                )
                .into(),
                0,
                None,
            ),
            None => ("".into(), 0, None),
        };
        Executed {
            portal,
            statement,
            params,
            values,
            continued,
            answered: true,
            completed: None,
            not_as_bound: false,
        }
    }

    /// COPY FROM STDIN began for the front message: the server now ignores
    /// Sync until the client's CopyDone/CopyFail, and takes any other message
    /// as an error that aborts the COPY (which the tracker does not follow).
    fn copy_in_began(&mut self) -> Result<(), Desync> {
        let i = 1;
        while let Some(s) = self.pending.get(i) {
            match s {
                Sent::Sync => {
                    self.pending.remove(i);
                    self.copy_syncs_taken = true;
                }
                Sent::CopyEnd => {
                    self.pending.remove(i);
                    return Ok(());
                }
                other => {
                    return Err(Desync(format!(
                        "the client sent {} during COPY FROM STDIN",
                        other.name()
                    )))
                }
            }
        }
        self.copy_in = true;
        Ok(())
    }

    /// The Execute at the front was answered: reports it (once) and, when
    /// `done`, forgets it.
    fn execute_answered(&mut self, done: bool, ok: bool) -> Option<Executed> {
        let Some(Sent::Execute { portal }) = self.pending.front() else {
            return None;
        };
        let portal = portal.clone();
        let report = !self.front_answered;
        let ran = report.then(|| self.executed(portal, ok));
        self.front_answered = true;
        if done {
            self.pop();
        }
        ran
    }
}

#[cfg(test)]
mod tests {
    fn q() -> Sent {
        Sent::Query("SELECT 1".into())
    }
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_statements_text_says_its_command_only_when_sure() {
        for (text, want) in [
            ("SELECT 1", Some("SELECT")),
            ("  select 1", Some("SELECT")),
            ("((values (1)))", Some("SELECT")),
            ("TABLE t", Some("SELECT")),
            (
                "-- note\n/* a /* nested */ one */ DELETE FROM t",
                Some("DELETE"),
            ),
            ("insert into t values (1) returning x", Some("INSERT")),
            ("UPDATE t SET x = 1", Some("UPDATE")),
            (
                "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
                Some("MERGE"),
            ),
            (
                "WITH d AS (DELETE FROM t RETURNING x) SELECT * FROM d",
                None,
            ),
            ("-- note\rDELETE FROM t", Some("DELETE")),
            ("SELECTED", None),
            ("EXPLAIN SELECT 1", None),
            ("/* open comment SELECT", None),
            ("-- only a comment", None),
            ("", None),
            ("(prepared statement \"s\" not known to wicket: ...)", None),
        ] {
            assert_eq!(expected_command(text), want, "{text:?}");
        }
    }

    #[test]
    fn a_completion_naming_another_command_marks_the_execute_and_forgets_names() {
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "SELECT x FROM t");
        parse(&mut t, "", "SELECT 2");
        assert!(answer(&mut t, b"11").is_empty());
        bind(&mut t, "p", "s1");
        bind(&mut t, "", "");
        assert!(answer(&mut t, b"22").is_empty());
        let mut e = t.executed("p".into(), true);
        t.completed("SELECT 2", Some(&mut e));
        assert_eq!(
            (e.completed.as_deref(), e.not_as_bound),
            (Some("SELECT 2"), false)
        );
        assert!(t.statements.get("s1").is_some());
        // A tag that could not be read says nothing.
        let mut unread = t.executed("p".into(), true);
        t.completed("", Some(&mut unread));
        assert_eq!((unread.completed, unread.not_as_bound), (None, false));
        assert!(t.statements.get("s1").is_some());
        t.completed("DELETE 2", Some(&mut e));
        assert_eq!(
            (e.completed.as_deref(), e.not_as_bound),
            (Some("DELETE 2"), true)
        );
        assert!(t.statements.get("s1").is_none() && t.portals.get("p").is_none());
        // No protocol name can be given the unnamed ones through SQL.
        assert!(t.statements.get("").is_some() && t.portals.get("").is_some());
    }

    fn parse(t: &mut Tracker, name: &str, text: &str) {
        t.sent(Sent::Parse {
            name: name.into(),
            text: text.into(),
        })
        .unwrap();
    }

    fn bind(t: &mut Tracker, portal: &str, statement: &str) {
        t.sent(Sent::Bind {
            portal: portal.into(),
            statement: statement.into(),
            params: 0,
            values: None,
        })
        .unwrap();
    }

    fn execute(t: &mut Tracker, portal: &str) {
        t.sent(Sent::Execute {
            portal: portal.into(),
        })
        .unwrap();
    }

    /// Feeds server messages; returns the statements reported as run.
    /// Parses `text` as statement `name`, syncs, and reads the answers.
    fn keep_statement(t: &mut Tracker, name: &str, text: &str) {
        parse(t, name, text);
        t.sent(Sent::Sync).unwrap();
        answer(t, b"1Z");
    }

    /// The Executes the server's `tags` show ran.
    fn executes(t: &mut Tracker, tags: &[u8]) -> Vec<Executed> {
        tags.iter()
            .filter_map(|&tag| t.received(tag, b'I').unwrap())
            .collect()
    }

    fn answer(t: &mut Tracker, tags: &[u8]) -> Vec<String> {
        tags.iter()
            .filter_map(|&tag| t.received(tag, b'I').unwrap())
            .map(|e| e.statement.to_string())
            .collect()
    }

    /// A Bind's values weigh what holding them costs, NULLs too, and the
    /// first Execute of its portal takes them: the later ones (fetching more
    /// rows) say they continue it, and the portal no longer holds them.
    #[test]
    fn bound_values_are_weighed_per_value_and_taken_by_the_first_execute() {
        let mut t = Tracker::new(100);
        parse(&mut t, "", "SELECT 1");
        let values: Values = vec![None; 1000].into();
        let bind_p = |t: &mut Tracker| {
            t.sent(Sent::Bind {
                portal: "p".into(),
                statement: "".into(),
                params: 1000,
                values: Some(values.clone()),
            })
            .unwrap()
        };
        bind_p(&mut t);
        assert_eq!(t.pending_bytes, "SELECT 1".len() + 1000 * VALUE_COST);
        for _ in 0..3 {
            execute(&mut t, "p");
        }
        t.sent(Sent::Sync).unwrap();
        let ran = executes(&mut t, b"12sssZ");
        assert_eq!(ran.len(), 3);
        assert!(Arc::ptr_eq(ran[0].values.as_ref().unwrap(), &values));
        assert!(!ran[0].continued);
        for e in &ran[1..] {
            assert_eq!((e.values.is_none(), e.continued), (true, true), "{e:?}");
            assert_eq!((&*e.statement, e.params), ("SELECT 1", 1000));
        }
        assert!(t.held() < 1000 * VALUE_COST, "{}", t.held());
        // A new Bind of the same portal starts over.
        bind_p(&mut t);
        execute(&mut t, "p");
        t.sent(Sent::Sync).unwrap();
        let ran = executes(&mut t, b"2s");
        assert_eq!(ran.len(), 1);
        assert!(!ran[0].continued && ran[0].values.is_some());
    }

    #[test]
    fn a_pipelined_batch_reports_its_execute_when_answered() {
        let mut t = Tracker::new(100);
        parse(&mut t, "", "SELECT 1");
        bind(&mut t, "", "");
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"12"), Vec::<String>::new());
        assert_eq!(answer(&mut t, b"DCZ"), vec!["SELECT 1"]);
        assert!(t.pending.is_empty());
    }

    #[test]
    fn a_refused_redefinition_does_not_change_the_audited_text() {
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "DELETE FROM accounts");
        t.sent(Sent::Sync).unwrap();
        answer(&mut t, b"1Z");
        // The server refuses this Parse (s1 exists) and skips the rest.
        parse(&mut t, "s1", "SELECT 1");
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"EZ"), Vec::<String>::new());
        assert_eq!(answer(&mut t, b"2CZ"), vec!["DELETE FROM accounts"]);
    }

    #[test]
    fn a_close_skipped_after_an_error_keeps_the_statement() {
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "DELETE FROM accounts");
        t.sent(Sent::Sync).unwrap();
        parse(&mut t, "bad", "SELEKT");
        t.sent(Sent::Close {
            statement: true,
            name: "s1".into(),
        })
        .unwrap();
        t.sent(Sent::Sync).unwrap();
        parse(&mut t, "s1", "SELECT 1");
        t.sent(Sent::Sync).unwrap();
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"1ZEZEZ2CZ"), vec!["DELETE FROM accounts"]);
    }

    #[test]
    fn a_query_after_an_extended_error_is_skipped_too() {
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "DELETE FROM accounts");
        t.sent(Sent::Sync).unwrap();
        // Execute of a missing portal fails; the Query and the Parse after
        // it are skipped until Sync.
        execute(&mut t, "nope");
        t.sent(q()).unwrap();
        parse(&mut t, "s2", "SELECT 2");
        t.sent(Sent::Sync).unwrap();
        bind(&mut t, "", "s2");
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        // The failed Execute is reported (with no statement: nothing bound).
        assert_eq!(answer(&mut t, b"1ZEZ"), vec![""]);
        // s2 was never made: Bind fails, nothing runs.
        assert_eq!(answer(&mut t, b"EZ"), Vec::<String>::new());
    }

    #[test]
    fn queries_the_server_skips_are_reported() {
        let mut t = Tracker::new(100);
        let query = |text: &str| Sent::Query(text.into());
        // Pipelined: known when the error comes.
        parse(&mut t, "bad", "SELEKT");
        t.sent(query("INSERT 1")).unwrap();
        t.sent(Sent::FunctionCall("function call (OID 9)".into()))
            .unwrap();
        t.sent(Sent::Sync).unwrap();
        assert!(t.take_skipped().is_empty());
        answer(&mut t, b"E");
        let skipped: Vec<String> = t.take_skipped().iter().map(|s| s.to_string()).collect();
        assert_eq!(skipped, ["INSERT 1", "function call (OID 9)"]);
        answer(&mut t, b"Z");
        // Sent after the error came, before the Sync: known when sent.
        parse(&mut t, "bad", "SELEKT");
        answer(&mut t, b"E");
        t.sent(query("INSERT 2")).unwrap();
        let skipped: Vec<String> = t.take_skipped().iter().map(|s| s.to_string()).collect();
        assert_eq!(skipped, ["INSERT 2"]);
        t.sent(Sent::Sync).unwrap();
        // After the Sync a query runs again.
        t.sent(query("INSERT 3")).unwrap();
        answer(&mut t, b"ZCZ");
        assert!(t.take_skipped().is_empty());
        assert!(t.pending.is_empty());
    }

    #[test]
    fn a_simple_query_destroys_the_unnamed_statement_and_portal() {
        let mut t = Tracker::new(100);
        parse(&mut t, "", "SELECT 1");
        t.sent(Sent::Sync).unwrap();
        t.sent(q()).unwrap();
        bind(&mut t, "", "");
        t.sent(Sent::Sync).unwrap();
        answer(&mut t, b"1ZTDCZ");
        assert!(t.statements.get("").is_none());
    }

    #[test]
    fn named_portals_live_until_the_transaction_ends() {
        let mut t = Tracker::new(100);
        t.sent(q()).unwrap(); // BEGIN
        parse(&mut t, "s", "SELECT * FROM big");
        bind(&mut t, "c1", "s");
        t.sent(Sent::Sync).unwrap();
        for (tag, status) in [(b'C', 0), (b'Z', b'T'), (b'1', 0), (b'2', 0), (b'Z', b'T')] {
            t.received(tag, status).unwrap();
        }
        execute(&mut t, "c1");
        t.sent(Sent::Sync).unwrap();
        let ran = t.received(b's', 0).unwrap();
        assert_eq!(
            ran.map(|e| e.statement).as_deref(),
            Some("SELECT * FROM big")
        );
        t.received(b'Z', b'T').unwrap();
        t.sent(q()).unwrap(); // COMMIT
        t.received(b'C', 0).unwrap();
        t.received(b'Z', b'I').unwrap();
        assert_eq!(t.portals.len(), 0);
    }

    #[test]
    fn copy_is_reported_when_it_begins_once() {
        let mut t = Tracker::new(100);
        parse(&mut t, "", "COPY t FROM STDIN");
        bind(&mut t, "", "");
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"12G"), vec!["COPY t FROM STDIN"]);
        t.sent(Sent::CopyEnd).unwrap();
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"CZ"), Vec::<String>::new());
    }

    #[test]
    fn describe_answers_are_matched() {
        let mut t = Tracker::new(100);
        parse(&mut t, "", "SELECT 1");
        t.sent(Sent::Describe).unwrap();
        bind(&mut t, "", "");
        t.sent(Sent::Describe).unwrap();
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"1tT2TDCZ"), vec!["SELECT 1"]);
        assert!(t.pending.is_empty());
    }

    #[test]
    fn the_queue_reports_full_at_its_limit() {
        let mut t = Tracker::new(2);
        t.sent(Sent::Sync).unwrap();
        assert!(!t.is_full());
        t.sent(Sent::Sync).unwrap();
        assert!(t.is_full());
        t.received(b'Z', b'I').unwrap();
        assert!(!t.is_full());
    }

    #[test]
    fn copy_from_stdin_in_the_extended_protocol_ignores_the_syncs_it_swallows() {
        // libpq's PQexecParams("COPY ... FROM STDIN"): a Sync with the
        // Execute (ignored by the server in COPY), data, CopyDone, Sync.
        let mut t = Tracker::new(100);
        parse(&mut t, "", "COPY t FROM STDIN");
        bind(&mut t, "", "");
        t.sent(Sent::Describe).unwrap();
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"12nG"), vec!["COPY t FROM STDIN"]);
        t.sent(Sent::CopyEnd).unwrap();
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"CZ"), Vec::<String>::new());
        assert!(t.pending.is_empty() && !t.copy_in);
        // And the session goes on in step.
        parse(&mut t, "s1", "DELETE FROM accounts");
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"12CZ"), vec!["DELETE FROM accounts"]);
    }

    #[test]
    fn a_message_sent_during_copy_from_stdin_ends_the_session() {
        // The server would swallow the Parse as an error; the tracker would
        // then match the next ParseComplete to it.
        let mut t = Tracker::new(100);
        t.sent(q()).unwrap();
        answer(&mut t, b"G");
        let e = t
            .sent(Sent::Parse {
                name: "s1".into(),
                text: "SELECT 1".into(),
            })
            .unwrap_err();
        assert!(e.0.contains("Parse during COPY FROM STDIN"), "{e}");
        // Pipelined before the COPY began: found when it begins.
        let mut t = Tracker::new(100);
        t.sent(q()).unwrap();
        parse(&mut t, "s1", "SELECT 1");
        assert!(t.received(b'G', 0).is_err());
        // Sync is ignored during COPY, and a pipelined COPY end is matched.
        let mut t = Tracker::new(100);
        t.sent(q()).unwrap();
        t.sent(Sent::Sync).unwrap();
        t.sent(Sent::CopyEnd).unwrap();
        t.sent(q()).unwrap();
        assert_eq!(answer(&mut t, b"GCZTDCZ"), Vec::<String>::new());
        assert!(t.pending.is_empty());
    }

    /// A Sync sent during COPY FROM STDIN is ignored only if the server
    /// reads it before an error ends the COPY (bad data, a trigger, a
    /// timeout); after such an error it gets a ReadyForQuery of its own.
    #[test]
    fn a_sync_that_an_error_in_copy_makes_count_is_a_desync_not_a_lost_batch() {
        // Simple protocol: the extra ReadyForQuery would otherwise take
        // the next batch as answered, and match its answers to the one
        // after it (a DELETE audited as the SELECT).
        let mut t = Tracker::new(100);
        t.sent(Sent::Query("COPY t FROM STDIN".into())).unwrap();
        t.sent(Sent::Sync).unwrap();
        t.sent(Sent::CopyEnd).unwrap();
        parse(&mut t, "a", "DELETE FROM accounts");
        bind(&mut t, "pa", "a");
        execute(&mut t, "pa");
        t.sent(Sent::Sync).unwrap();
        parse(&mut t, "b", "SELECT pg_sleep(3600)");
        bind(&mut t, "pb", "b");
        execute(&mut t, "pb");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"GEZ"), Vec::<String>::new());
        let e = t.received(b'Z', b'I').unwrap_err();
        assert!(e.0.contains("ReadyForQuery"), "{e}");
        // Had the server read the Sync in COPY, the same start goes on
        // in step.
        let mut t = Tracker::new(100);
        t.sent(Sent::Query("COPY t FROM STDIN".into())).unwrap();
        t.sent(Sent::Sync).unwrap();
        t.sent(Sent::CopyEnd).unwrap();
        parse(&mut t, "a", "DELETE FROM accounts");
        bind(&mut t, "pa", "a");
        execute(&mut t, "pa");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"GCZ12CZ"), vec!["DELETE FROM accounts"]);
        assert!(t.pending.is_empty());
    }

    #[test]
    fn an_error_in_an_extended_copy_that_took_syncs_skips_nothing_by_guess() {
        // A Query after the COPY's end: skipped if the server read the
        // Sync in COPY, run if the Sync ended the error's skip. Neither is
        // put on the record as a guess.
        let copy = |t: &mut Tracker| {
            parse(t, "", "COPY t FROM STDIN");
            bind(t, "", "");
            execute(t, "");
            t.sent(Sent::Sync).unwrap();
        };
        let mut t = Tracker::new(100);
        copy(&mut t);
        t.sent(Sent::CopyEnd).unwrap();
        t.sent(Sent::Query("DELETE FROM accounts".into())).unwrap();
        assert_eq!(answer(&mut t, b"12G"), vec!["COPY t FROM STDIN"]);
        let e = t.received(b'E', 0).unwrap_err();
        assert!(e.0.contains("COPY FROM STDIN"), "{e}");
        assert!(t.take_skipped().is_empty());

        // libpq's order (Sync with the Execute, data, CopyDone, Sync) and
        // bad data: the error comes while data is still being sent. Only
        // COPY messages and a Sync may follow it; the Sync's answer fits
        // whichever way the server took the first one.
        let mut t = Tracker::new(100);
        copy(&mut t);
        answer(&mut t, b"12GE");
        t.sent(Sent::CopyEnd).unwrap();
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"Z"), Vec::<String>::new());
        assert!(t.pending.is_empty());
        parse(&mut t, "s1", "SELECT 1");
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"12CZ"), vec!["SELECT 1"]);
        // The server took the first Sync after the error: its answer
        // comes with nothing to answer.
        let mut t = Tracker::new(100);
        copy(&mut t);
        answer(&mut t, b"12GE");
        assert!(t.received(b'Z', b'I').is_err());
        // Anything but COPY messages before the next Sync is refused.
        let mut t = Tracker::new(100);
        copy(&mut t);
        answer(&mut t, b"12GE");
        t.sent(Sent::CopyEnd).unwrap();
        let e = t
            .sent(Sent::Query("DELETE FROM accounts".into()))
            .unwrap_err();
        assert!(e.0.contains("Query after an error ended a COPY"), "{e}");
        // Without a Sync in the COPY the skip is certain, as before.
        let mut t = Tracker::new(100);
        parse(&mut t, "", "COPY t FROM STDIN");
        bind(&mut t, "", "");
        execute(&mut t, "");
        answer(&mut t, b"12GE");
        t.sent(Sent::Query("INSERT 1".into())).unwrap();
        let skipped: Vec<String> = t.take_skipped().iter().map(|s| s.to_string()).collect();
        assert_eq!(skipped, ["INSERT 1"]);
    }

    #[test]
    fn a_query_or_call_is_ready_only_after_its_answer() {
        let mut t = Tracker::new(100);
        t.sent(q()).unwrap();
        assert!(t.received(b'Z', b'I').is_err());
        let mut t = Tracker::new(100);
        t.sent(Sent::FunctionCall("function call (OID 9)".into()))
            .unwrap();
        assert!(t.received(b'Z', b'I').is_err());
        let mut t = Tracker::new(100);
        t.sent(Sent::FunctionCall("function call (OID 9)".into()))
            .unwrap();
        t.sent(q()).unwrap();
        assert_eq!(answer(&mut t, b"VZ"), Vec::<String>::new());
        assert!(t.received(b'V', 0).is_err(), "a result for the query");
        assert_eq!(answer(&mut t, b"IZ"), Vec::<String>::new());
        assert!(t.pending.is_empty());
    }

    #[test]
    fn a_copy_that_never_began_leaves_its_end_ignored() {
        let mut t = Tracker::new(100);
        t.sent(q()).unwrap(); // COPY with a syntax error
        t.sent(Sent::CopyEnd).unwrap();
        parse(&mut t, "s1", "SELECT 1");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"EZ1Z"), Vec::<String>::new());
        assert_eq!(t.statements.get("s1").map(|s| &**s), Some("SELECT 1"));
        // A COPY end with nothing before it is dropped at once.
        t.sent(Sent::CopyEnd).unwrap();
        assert!(t.pending.is_empty());
    }

    #[test]
    fn answers_that_do_not_fit_what_was_sent_are_a_desync() {
        for (sent, tag) in [
            (vec![], b'1'),
            (vec![Sent::Sync], b'2'),
            (vec![Sent::Describe], b'3'),
            (vec![Sent::Sync], b'T'),
            (vec![Sent::Describe], b'C'),
            (vec![q()], b's'),
            (vec![Sent::Sync], b'G'),
            (vec![Sent::Describe], b'Z'),
            (vec![], b'Z'),
        ] {
            let mut t = Tracker::new(100);
            for s in sent.clone() {
                t.sent(s).unwrap();
            }
            let e = t.received(tag, b'I').unwrap_err();
            assert!(e.0.contains("the server sent"), "{sent:?} {tag}: {e}");
        }
        // An error answering nothing (a FATAL) is not.
        assert_eq!(Tracker::new(10).received(b'E', 0), Ok(None));
    }

    #[test]
    fn sql_prepare_and_deallocate_make_named_statements_unknown() {
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "SELECT 1");
        parse(&mut t, "", "SELECT 2");
        t.sent(Sent::Sync).unwrap();
        answer(&mut t, b"11Z");
        // Query("DEALLOCATE s1; PREPARE s1 AS DELETE FROM accounts")
        t.sent(q()).unwrap();
        t.received(b'C', 0).unwrap();
        t.completed("DEALLOCATE", None);
        t.received(b'C', 0).unwrap();
        t.completed("PREPARE", None);
        t.received(b'Z', b'I').unwrap();
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"2CZ"), vec![unknown_statement("s1")]);
        // Other commands change nothing.
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "SELECT 1");
        t.sent(Sent::Sync).unwrap();
        answer(&mut t, b"1Z");
        t.completed("SELECT 1", None);
        t.completed("PREPARED", None); // not the word PREPARE
        assert!(t.statements.get("s1").is_some());
    }

    /// SQL cursors are portals: `CLOSE p; DECLARE p CURSOR FOR ...` gives
    /// a bound protocol portal other text.
    #[test]
    fn sql_cursor_commands_make_named_portals_unknown() {
        let bound = |t: &mut Tracker| {
            parse(t, "s1", "SELECT 1");
            t.sent(q()).unwrap(); // BEGIN
            answer(t, b"1CZ");
            bind(t, "p", "s1");
            bind(t, "", "s1");
            t.sent(Sent::Sync).unwrap();
            t.received(b'2', 0).unwrap();
            t.received(b'2', 0).unwrap();
            t.received(b'Z', b'T').unwrap();
        };
        let run = |t: &mut Tracker, portal: &str| {
            execute(t, portal);
            t.sent(Sent::Sync).unwrap();
            let ran = t.received(b'C', 0).unwrap().unwrap();
            t.received(b'Z', b'T').unwrap();
            ran.statement.to_string()
        };
        for tag in [
            "CLOSE CURSOR",
            "CLOSE CURSOR ALL",
            "DISCARD ALL",
            "DO",
            "ROLLBACK",
            "COMMIT",
            "RELEASE",
            "PREPARE TRANSACTION",
            "CALL",
        ] {
            // Which also make the named statements unknown.
            let all = tag.starts_with('D') || tag == "CALL";
            let mut t = Tracker::new(100);
            bound(&mut t);
            // Query("CLOSE p; DECLARE p CURSOR FOR SELECT f()"), say.
            t.sent(q()).unwrap();
            t.received(b'C', 0).unwrap();
            t.completed(tag, None);
            t.received(b'C', 0).unwrap();
            t.completed("DECLARE CURSOR", None);
            t.received(b'Z', b'T').unwrap();
            let ran = run(&mut t, "p");
            assert!(ran.contains("not known to wicket"), "{tag}: {ran}");
            assert_eq!(t.statements.get("s1").is_some(), !all, "{tag}");
            // Binding again makes it known again.
            bind(&mut t, "p", "s1");
            t.sent(Sent::Sync).unwrap();
            answer(&mut t, b"2");
            t.received(b'Z', b'T').unwrap();
            let again = run(&mut t, "p");
            assert_eq!(again.contains("not known"), all, "{tag}: {again}");
        }
        // Declaring, fetching and plain statements change nothing bound.
        let mut t = Tracker::new(100);
        bound(&mut t);
        for tag in ["DECLARE CURSOR", "FETCH 1", "MOVE 1", "SELECT 1", "CLOSED"] {
            t.completed(tag, None);
        }
        assert_eq!(run(&mut t, "p"), "SELECT 1");
    }

    #[test]
    fn executes_left_unanswered_at_the_end_are_reported_as_such() {
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "DELETE FROM ledger");
        t.sent(Sent::Sync).unwrap();
        answer(&mut t, b"1Z");
        parse(&mut t, "", "UPDATE ledger SET x = 1");
        bind(&mut t, "", "");
        execute(&mut t, "");
        bind(&mut t, "p", "s1");
        execute(&mut t, "p");
        t.sent(Sent::Sync).unwrap();
        // The first Execute was answered, the second not.
        assert_eq!(answer(&mut t, b"12C"), vec!["UPDATE ledger SET x = 1"]);
        let left = t.unanswered();
        assert_eq!(left.len(), 1);
        assert_eq!(&*left[0].statement, "DELETE FROM ledger");
        assert!(!left[0].answered);
        assert!(t.pending.is_empty());
        // SQL before an unanswered Execute may have redefined its
        // statement (`DEALLOCATE s1; PREPARE s1 AS ...`): it is unknown.
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "SELECT 1");
        t.sent(Sent::Sync).unwrap();
        answer(&mut t, b"1Z");
        t.sent(q()).unwrap();
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        let left = t.unanswered();
        assert_eq!(&*left[0].statement, unknown_statement("s1"));
        // A Close before a Parse of the same name is followed.
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "SELECT 1");
        t.sent(Sent::Sync).unwrap();
        answer(&mut t, b"1Z");
        t.sent(Sent::Close {
            statement: true,
            name: "s1".into(),
        })
        .unwrap();
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        let left = t.unanswered();
        assert_eq!(&*left[0].statement, unknown_statement("s1"));
        // A COPY already reported is not reported again.
        let mut t = Tracker::new(100);
        parse(&mut t, "", "COPY t FROM STDIN");
        bind(&mut t, "", "");
        execute(&mut t, "");
        answer(&mut t, b"12G");
        assert!(t.unanswered().is_empty());
    }

    /// A client that sends without reading its answers fills the queue by
    /// bytes long before by count; answers empty it again.
    #[test]
    fn unanswered_text_is_bounded_by_bytes() {
        let mut t = Tracker::new(10_000);
        let big = "x".repeat(1 << 20);
        let mut sent = 0;
        while !t.is_full() {
            parse(&mut t, &format!("s{sent}"), &big);
            sent += 1;
            assert!(sent <= 40, "never full");
        }
        assert_eq!(sent, MAX_HELD_BYTES >> 20);
        t.sent(Sent::Sync).unwrap();
        let mut answers = vec![b'1'; sent];
        answers.push(b'Z');
        answer(&mut t, &answers);
        assert!(!t.is_full());
        assert!(t.pending.is_empty());
        assert_eq!(t.pending_bytes, 0);
    }

    #[test]
    fn held_text_is_bounded_and_what_is_not_kept_is_audited_as_unknown() {
        let mut t = Tracker::new(10_000);
        let big = "x".repeat(1 << 20);
        for i in 0..40 {
            keep_statement(&mut t, &format!("s{i}"), &big);
            assert!(t.held() <= MAX_HELD_BYTES);
        }
        bind(&mut t, "", "s39");
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"2CZ"), vec![unknown_statement("s39")]);
        // Statements closed after binding are still counted in their portals.
        let mut t = Tracker::new(10_000);
        t.sent(q()).unwrap(); // BEGIN
        answer(&mut t, b"C");
        t.received(b'Z', b'T').unwrap();
        for i in 0..40 {
            parse(&mut t, "s", &format!("{big}{i}"));
            bind(&mut t, &format!("p{i}"), "s");
            t.sent(Sent::Close {
                statement: true,
                name: "s".into(),
            })
            .unwrap();
            t.sent(Sent::Sync).unwrap();
            for tag in *b"123" {
                t.received(tag, 0).unwrap();
            }
            t.received(b'Z', b'T').unwrap();
            assert!(t.held() <= MAX_HELD_BYTES, "{i}: {}", t.held());
        }
        execute(&mut t, "p39");
        t.sent(Sent::Sync).unwrap();
        assert_eq!(answer(&mut t, b"CZ"), vec![unknown_statement("s")]);
    }

    /// A Bind whose values do not fit what the session holds keeps none of
    /// them, and its Execute says so (an empty list: every value counts as
    /// not recorded), not as though values were never asked for.
    #[test]
    fn values_past_what_a_session_holds_are_reported_as_left_out() {
        let mut t = Tracker::new(10_000);
        let big = "x".repeat(1 << 20);
        for i in 0..31 {
            keep_statement(&mut t, &format!("s{i}"), &big);
        }
        keep_statement(&mut t, "v", "SELECT $1, $2, $3");
        let value = Some("y".repeat(1 << 20));
        t.sent(Sent::Bind {
            portal: "".into(),
            statement: "v".into(),
            params: 3,
            values: Some(vec![value.clone(), value.clone(), value].into()),
        })
        .unwrap();
        execute(&mut t, "");
        t.sent(Sent::Sync).unwrap();
        let ran = executes(&mut t, b"2CZ");
        assert_eq!(ran.len(), 1);
        assert_eq!(
            (&*ran[0].statement, ran[0].params),
            ("SELECT $1, $2, $3", 3)
        );
        assert_eq!(ran[0].values.as_deref().map(<[_]>::len), Some(0));
    }

    /// Client messages for the model below (names 0 = unnamed).
    #[derive(Debug, Clone)]
    enum Msg {
        Parse(u8, u8),
        Bind(u8, u8),
        Execute(u8),
        Describe,
        Close(bool, u8),
        Sync,
        Query(bool),
        /// A simple-query COPY FROM STDIN and the client's CopyDone (or a
        /// row the server rejects).
        CopyIn(bool),
    }

    fn msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (0u8..3, 0u8..4).prop_map(|(n, t)| Msg::Parse(n, t)),
            (0u8..2, 0u8..3).prop_map(|(p, s)| Msg::Bind(p, s)),
            (0u8..2).prop_map(Msg::Execute),
            Just(Msg::Describe),
            (any::<bool>(), 0u8..3).prop_map(|(s, n)| Msg::Close(s, n)),
            Just(Msg::Sync),
            any::<bool>().prop_map(Msg::Query),
            any::<bool>().prop_map(Msg::CopyIn),
        ]
    }

    fn name(n: u8) -> String {
        if n == 0 {
            String::new()
        } else {
            format!("n{n}")
        }
    }

    proptest! {
        /// Any text, comments left open included, is read without a panic;
        /// blanks, comments and parentheses before the keyword change nothing.
        #[test]
        fn a_statements_command_is_read_from_any_text(
            text in "(\\PC|--|/\\*|\\*/|\\(|\n)*",
            lead in proptest::collection::vec(
                prop_oneof![Just(" "), Just("\n"), Just("("), Just("-- x\n"), Just("/* /* */ */")],
                0..5,
            ),
        ) {
            let _ = expected_command(&text);
            let sql = format!("{}DELETE FROM t", lead.concat());
            prop_assert_eq!(expected_command(&sql), Some("DELETE"));
        }

        /// A model of the server (PostgreSQL's rules: named duplicates fail,
        /// an extended-protocol error skips to Sync, a simple Query destroys
        /// the unnamed statement and portal, implicit transactions end at
        /// ReadyForQuery) runs the client's messages; the tracker, fed the
        /// same messages and the model's answers — delivered late, in
        /// chunks — must report exactly the statements the model ran.
        #[test]
        fn reports_exactly_what_the_server_ran(
            msgs in proptest::collection::vec((msg(), any::<bool>()), 0..60)
        ) {
            let mut t = Tracker::new(1000);
            let mut stmts: HashMap<String, String> = HashMap::new();
            let mut portals: HashMap<String, String> = HashMap::new();
            let mut skipping = false;
            let mut answers: VecDeque<u8> = VecDeque::new();
            let mut ran = Vec::new();
            let mut reported = Vec::new();
            for (m, deliver) in msgs {
                let sent = match &m {
                    Msg::Parse(n, q) => Sent::Parse { name: name(*n), text: format!("q{q}") },
                    Msg::Bind(p, s) => Sent::Bind { portal: name(*p), statement: name(*s), params: 0, values: None },
                    Msg::Execute(p) => Sent::Execute { portal: name(*p) },
                    Msg::Describe => Sent::Describe,
                    Msg::Close(s, n) => Sent::Close { statement: *s, name: name(*n) },
                    Msg::Sync => Sent::Sync,
                    Msg::Query(_) | Msg::CopyIn(_) => q(),
                };
                t.sent(sent).unwrap();
                if matches!(m, Msg::CopyIn(_)) {
                    t.sent(Sent::CopyEnd).unwrap();
                }
                if skipping && !matches!(m, Msg::Sync) {
                    continue;
                }
                let mut fail = || { answers.push_back(b'E'); true };
                match m {
                    Msg::Parse(n, q) => {
                        // q3 is a syntax error.
                        if (n != 0 && stmts.contains_key(&name(n))) || q == 3 {
                            skipping = fail();
                        } else {
                            stmts.insert(name(n), format!("q{q}"));
                            answers.push_back(b'1');
                        }
                    }
                    Msg::Bind(p, s) => match stmts.get(&name(s)) {
                        Some(text) if p == 0 || !portals.contains_key(&name(p)) => {
                            portals.insert(name(p), text.clone());
                            answers.push_back(b'2');
                        }
                        _ => skipping = fail(),
                    },
                    Msg::Execute(p) => match portals.get(&name(p)) {
                        Some(text) => {
                            ran.push(text.clone());
                            // q2 fails at run time.
                            if text == "q2" { skipping = fail(); } else { answers.extend(b"DC"); }
                        }
                        None => {
                            ran.push(String::new());
                            skipping = fail();
                        }
                    },
                    Msg::Describe => answers.push_back(b'n'),
                    Msg::Close(s, n) => {
                        if s { stmts.remove(&name(n)); } else { portals.remove(&name(n)); }
                        answers.push_back(b'3');
                    }
                    Msg::Sync => {
                        skipping = false;
                        portals.clear();
                        answers.push_back(b'Z');
                    }
                    Msg::Query(ok) => {
                        stmts.remove("");
                        portals.clear();
                        answers.extend(if ok { &b"TDCZ"[..] } else { &b"EZ"[..] });
                    }
                    Msg::CopyIn(ok) => {
                        stmts.remove("");
                        portals.clear();
                        answers.extend(if ok { &b"GCZ"[..] } else { &b"GEZ"[..] });
                    }
                }
                if deliver {
                    while let Some(a) = answers.pop_front() {
                        reported.extend(t.received(a, b'I').unwrap().map(|e| e.statement.to_string()));
                    }
                }
            }
            while let Some(a) = answers.pop_front() {
                reported.extend(t.received(a, b'I').unwrap().map(|e| e.statement.to_string()));
            }
            // Every run Execute of a bound portal reports its statement; a
            // failed lookup (nothing bound) reports empty text.
            prop_assert_eq!(reported, ran);
        }
    }
}
