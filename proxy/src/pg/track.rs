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
//! server bound it. A simple Query destroys the unnamed statement and portal;
//! a transaction's end drops every portal.
//!
//! Pure bookkeeping: no I/O; the proxy feeds it messages in wire order.
//! Statements made with SQL `PREPARE` and dropped with `DEALLOCATE`/`DISCARD`
//! are not followed (the SQL itself is audited as a query).

use std::collections::{HashMap, VecDeque};

/// A portal's statement text, parameter count and (if recorded) values.
pub type BoundPortal = (String, usize, Option<Vec<Option<String>>>);

/// A client message that the server answers.
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
        values: Option<Vec<Option<String>>>,
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
    Query,
    FunctionCall,
}

impl Sent {
    /// Answered by ReadyForQuery (and not skipped by an error before it).
    fn ends_cycle(&self) -> bool {
        matches!(self, Sent::Sync | Sent::Query | Sent::FunctionCall)
    }

    /// Part of the extended protocol: an error skips to the next Sync.
    fn extended(&self) -> bool {
        !matches!(self, Sent::Sync | Sent::Query | Sent::FunctionCall)
    }
}

/// An Execute the server ran: its portal and what the portal was bound to.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    pub portal: String,
    pub statement: String,
    pub params: usize,
    pub values: Option<Vec<Option<String>>>,
}

/// Prepared statements and portals of one session.
#[derive(Debug)]
pub struct Tracker {
    statements: HashMap<String, String>,
    portals: HashMap<String, BoundPortal>,
    pending: VecDeque<Sent>,
    /// How many statements, portals and unanswered messages are kept.
    limit: usize,
    /// An error made the server skip to the next Sync, which is not sent
    /// yet: what is sent until then is skipped too.
    skipping: bool,
    /// The Execute at the front was reported already (its COPY began).
    front_reported: bool,
}

impl Tracker {
    pub fn new(limit: usize) -> Self {
        Self {
            statements: HashMap::new(),
            portals: HashMap::new(),
            pending: VecDeque::new(),
            limit,
            skipping: false,
            front_reported: false,
        }
    }

    /// Too many unanswered messages: the proxy stops reading the client until
    /// the server catches up.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= self.limit
    }

    /// A client message, in wire order.
    pub fn sent(&mut self, s: Sent) {
        if self.skipping {
            if s != Sent::Sync {
                return;
            }
            self.skipping = false;
        }
        self.pending.push_back(s);
    }

    fn front_is(&self, f: impl Fn(&Sent) -> bool) -> bool {
        self.pending.front().is_some_and(f)
    }

    /// Removes the answered front entry.
    fn pop(&mut self) -> Option<Sent> {
        self.front_reported = false;
        self.pending.pop_front()
    }

    /// A server message (`tag`, and for ReadyForQuery its status byte), in
    /// wire order. Returns the Execute it shows the server ran, if any.
    pub fn received(&mut self, tag: u8, status: u8) -> Option<Executed> {
        match tag {
            b'1' if self.front_is(|s| matches!(s, Sent::Parse { .. })) => {
                if let Some(Sent::Parse { name, text }) = self.pop() {
                    remember(&mut self.statements, self.limit, name, text);
                }
                None
            }
            b'2' if self.front_is(|s| matches!(s, Sent::Bind { .. })) => {
                if let Some(Sent::Bind {
                    portal,
                    statement,
                    params,
                    values,
                }) = self.pop()
                {
                    let text = self.statements.get(&statement).cloned().unwrap_or_default();
                    remember(
                        &mut self.portals,
                        self.limit,
                        portal,
                        (text, params, values),
                    );
                }
                None
            }
            b'3' if self.front_is(|s| matches!(s, Sent::Close { .. })) => {
                if let Some(Sent::Close { statement, name }) = self.pop() {
                    if statement {
                        self.statements.remove(&name);
                    } else {
                        self.portals.remove(&name);
                    }
                }
                None
            }
            b'T' | b'n' if self.front_is(|s| matches!(s, Sent::Describe)) => {
                self.pop();
                None
            }
            // Execute done: CommandComplete, EmptyQueryResponse, PortalSuspended.
            b'C' | b'I' | b's' => self.execute_answered(true),
            // COPY began: report now (CommandComplete comes at its end).
            b'G' | b'H' | b'W' => self.execute_answered(false),
            b'E' => {
                if !self.front_is(Sent::extended) {
                    // A simple Query's or a Sync's error: ReadyForQuery follows.
                    return None;
                }
                let ran = self.execute_answered(true);
                // The server skips everything up to the next Sync.
                while self.front_is(|s| !matches!(s, Sent::Sync)) {
                    self.pop();
                }
                self.skipping = self.pending.is_empty();
                ran
            }
            b'Z' => {
                while let Some(s) = self.pop() {
                    if s == Sent::Query {
                        self.statements.remove("");
                        self.portals.remove("");
                    }
                    if s.ends_cycle() {
                        break;
                    }
                }
                if status == b'I' {
                    // Portals live until their transaction ends.
                    self.portals.clear();
                }
                None
            }
            _ => None,
        }
    }

    /// The Execute at the front was answered: reports it (once) and, when
    /// `done`, forgets it.
    fn execute_answered(&mut self, done: bool) -> Option<Executed> {
        let Some(Sent::Execute { portal }) = self.pending.front() else {
            return None;
        };
        let report = !self.front_reported;
        self.front_reported = true;
        let ran = report.then(|| {
            let (statement, params, values) = self
                .portals
                .get(portal.as_str())
                .cloned()
                .unwrap_or_default();
            Executed {
                portal: portal.clone(),
                statement,
                params,
                values,
            }
        });
        if done {
            self.pop();
        }
        ran
    }
}

fn remember<V>(map: &mut HashMap<String, V>, limit: usize, key: String, v: V) {
    if map.len() < limit || map.contains_key(&key) {
        map.insert(key, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(t: &mut Tracker, name: &str, text: &str) {
        t.sent(Sent::Parse {
            name: name.into(),
            text: text.into(),
        });
    }

    fn bind(t: &mut Tracker, portal: &str, statement: &str) {
        t.sent(Sent::Bind {
            portal: portal.into(),
            statement: statement.into(),
            params: 0,
            values: None,
        });
    }

    fn execute(t: &mut Tracker, portal: &str) {
        t.sent(Sent::Execute {
            portal: portal.into(),
        });
    }

    /// Feeds server messages; returns the statements reported as run.
    fn answer(t: &mut Tracker, tags: &[u8]) -> Vec<String> {
        tags.iter()
            .filter_map(|&tag| t.received(tag, b'I'))
            .map(|e| e.statement)
            .collect()
    }

    #[test]
    fn a_pipelined_batch_reports_its_execute_when_answered() {
        let mut t = Tracker::new(100);
        parse(&mut t, "", "SELECT 1");
        bind(&mut t, "", "");
        execute(&mut t, "");
        t.sent(Sent::Sync);
        assert_eq!(answer(&mut t, b"12"), Vec::<String>::new());
        assert_eq!(answer(&mut t, b"DCZ"), vec!["SELECT 1"]);
        assert!(t.pending.is_empty());
    }

    #[test]
    fn a_refused_redefinition_does_not_change_the_audited_text() {
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "DELETE FROM accounts");
        t.sent(Sent::Sync);
        answer(&mut t, b"1Z");
        // The server refuses this Parse (s1 exists) and skips the rest.
        parse(&mut t, "s1", "SELECT 1");
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        t.sent(Sent::Sync);
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        t.sent(Sent::Sync);
        assert_eq!(answer(&mut t, b"EZ"), Vec::<String>::new());
        assert_eq!(answer(&mut t, b"2CZ"), vec!["DELETE FROM accounts"]);
    }

    #[test]
    fn a_close_skipped_after_an_error_keeps_the_statement() {
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "DELETE FROM accounts");
        t.sent(Sent::Sync);
        parse(&mut t, "bad", "SELEKT");
        t.sent(Sent::Close {
            statement: true,
            name: "s1".into(),
        });
        t.sent(Sent::Sync);
        parse(&mut t, "s1", "SELECT 1");
        t.sent(Sent::Sync);
        bind(&mut t, "", "s1");
        execute(&mut t, "");
        t.sent(Sent::Sync);
        assert_eq!(answer(&mut t, b"1ZEZEZ2CZ"), vec!["DELETE FROM accounts"]);
    }

    #[test]
    fn a_query_after_an_extended_error_is_skipped_too() {
        let mut t = Tracker::new(100);
        parse(&mut t, "s1", "DELETE FROM accounts");
        t.sent(Sent::Sync);
        // Execute of a missing portal fails; the Query and the Parse after
        // it are skipped until Sync.
        execute(&mut t, "nope");
        t.sent(Sent::Query);
        parse(&mut t, "s2", "SELECT 2");
        t.sent(Sent::Sync);
        bind(&mut t, "", "s2");
        execute(&mut t, "");
        t.sent(Sent::Sync);
        // The failed Execute is reported (with no statement: nothing bound).
        assert_eq!(answer(&mut t, b"1ZEZ"), vec![""]);
        // s2 was never made: Bind fails, nothing runs.
        assert_eq!(answer(&mut t, b"EZ"), Vec::<String>::new());
    }

    #[test]
    fn a_simple_query_destroys_the_unnamed_statement_and_portal() {
        let mut t = Tracker::new(100);
        parse(&mut t, "", "SELECT 1");
        t.sent(Sent::Sync);
        t.sent(Sent::Query);
        bind(&mut t, "", "");
        t.sent(Sent::Sync);
        answer(&mut t, b"1ZTDCZ");
        assert!(!t.statements.contains_key(""));
    }

    #[test]
    fn named_portals_live_until_the_transaction_ends() {
        let mut t = Tracker::new(100);
        t.sent(Sent::Query); // BEGIN
        parse(&mut t, "s", "SELECT * FROM big");
        bind(&mut t, "c1", "s");
        t.sent(Sent::Sync);
        for (tag, status) in [(b'C', 0), (b'Z', b'T'), (b'1', 0), (b'2', 0), (b'Z', b'T')] {
            t.received(tag, status);
        }
        execute(&mut t, "c1");
        t.sent(Sent::Sync);
        let ran = t.received(b's', 0);
        assert_eq!(
            ran.map(|e| e.statement).as_deref(),
            Some("SELECT * FROM big")
        );
        t.received(b'Z', b'T');
        t.sent(Sent::Query); // COMMIT
        t.received(b'C', 0);
        t.received(b'Z', b'I');
        assert!(t.portals.is_empty());
    }

    #[test]
    fn copy_is_reported_when_it_begins_once() {
        let mut t = Tracker::new(100);
        parse(&mut t, "", "COPY t FROM STDIN");
        bind(&mut t, "", "");
        execute(&mut t, "");
        t.sent(Sent::Sync);
        assert_eq!(answer(&mut t, b"12G"), vec!["COPY t FROM STDIN"]);
        assert_eq!(answer(&mut t, b"CZ"), Vec::<String>::new());
    }

    #[test]
    fn describe_answers_are_matched() {
        let mut t = Tracker::new(100);
        parse(&mut t, "", "SELECT 1");
        t.sent(Sent::Describe);
        bind(&mut t, "", "");
        t.sent(Sent::Describe);
        execute(&mut t, "");
        t.sent(Sent::Sync);
        assert_eq!(answer(&mut t, b"1tT2TDCZ"), vec!["SELECT 1"]);
        assert!(t.pending.is_empty());
    }

    #[test]
    fn the_queue_reports_full_at_its_limit() {
        let mut t = Tracker::new(2);
        t.sent(Sent::Sync);
        assert!(!t.is_full());
        t.sent(Sent::Sync);
        assert!(t.is_full());
        t.received(b'Z', b'I');
        assert!(!t.is_full());
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
                    Msg::Query(_) => Sent::Query,
                };
                t.sent(sent);
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
                }
                if deliver {
                    while let Some(a) = answers.pop_front() {
                        reported.extend(t.received(a, b'I').map(|e| e.statement));
                    }
                }
            }
            while let Some(a) = answers.pop_front() {
                reported.extend(t.received(a, b'I').map(|e| e.statement));
            }
            // Every run Execute of a bound portal reports its statement; a
            // failed lookup (nothing bound) reports empty text.
            prop_assert_eq!(reported, ran);
        }
    }
}
