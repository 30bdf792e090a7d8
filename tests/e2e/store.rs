//! The store against both backends: SQLite in a temp dir and a real
//! PostgreSQL 15 started by the harness. Same assertions for each.

use wicket_e2e::harness_postgres::Postgres;
use wicket_e2e::harness_wicket::{WicketCli, Wicketd};
use wicketd::config::Storage;
use wicketd::ssh::recording::RecordingMeta;
use wicketd::store::{
    chain_hash, AuditFilter, AuditRow, CancelKeyRow, ChainKey, Link, Reservation, Store,
    StoredRequest, UserRecord, KEYED, RECORDING_PART,
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn event(id: &str, kind: &str, actor: &str, time_ms: i64) -> AuditRow {
    AuditRow {
        id: id.into(),
        time_ms,
        kind: kind.into(),
        actor: Some(actor.into()),
        request_id: None,
        session_id: None,
        data: "{\"event\":\"x\"}".into(),
    }
}

/// The audit chain's key for the CA key set in `dir` (made on first use,
/// as wicketd does at its first start).
fn key_in(dir: &std::path::Path) -> ChainKey {
    let (keys, _) = wicketd::keystore::load_or_generate(dir, "test", 1_700_000_000).unwrap();
    ChainKey::from_authority(&keys)
}

/// The key of a CA key set nobody else has.
fn another_key() -> ChainKey {
    let rng = ring::rand::SystemRandom::new();
    let (keys, _) = wicket_ca::AuthorityKeys::generate("other", 1_700_000_000, &rng).unwrap();
    ChainKey::from_authority(&keys)
}

/// An enabled user with `roles`, no team, password or TOTP.
fn user(name: &str, roles: &[&str], created_at: i64) -> UserRecord {
    UserRecord {
        name: name.into(),
        roles: roles.iter().map(|r| (*r).into()).collect(),
        team: None,
        password_hash: None,
        totp_secret: None,
        created_at,
        disabled: false,
    }
}

async fn exercise(store: &Store) {
    assert!(store.schema_version().await.unwrap() >= 1);
    let alice = UserRecord {
        team: Some("payments".into()),
        password_hash: Some("$argon2id$placeholder".into()),
        ..user("alice", &["dev", "sre"], 1_000)
    };
    store
        .create_user(&alice, &event("e1", "user_created", "alice", 1_000))
        .await
        .unwrap();
    assert_eq!(store.get_user("alice").await.unwrap(), Some(alice.clone()));
    assert_eq!(store.get_user("nobody").await.unwrap(), None);
    // Many at once (the session watcher's read), across IN-list chunks;
    // names that do not exist are left out.
    let mut names: Vec<String> = (0..1_100).map(|i| format!("nobody-{i}")).collect();
    names.insert(700, "alice".into());
    let found = store.get_users(&names).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, "alice");
    assert_eq!(found[0].1.as_ref().unwrap(), &alice);
    assert!(store.get_users(&[]).await.unwrap().is_empty());

    // A duplicate is a conflict and its audit event is not written (one transaction).
    let err = store
        .create_user(&alice, &event("e2", "user_created", "alice", 2_000))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let created = store
        .search_audit(&AuditFilter {
            kind: Some("user_created".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(created.len(), 1);

    // Login failures count per user and per source inside a window; a
    // check under way counts until it is released or confirmed.
    let reserve = |user: &'static str, src: &'static str, t: i64, since: i64| {
        let store = &store;
        async move {
            store
                .reserve_login_attempt(user, src, t, since, (3, 2))
                .await
                .unwrap()
        }
    };
    let granted = |r: Reservation| match r {
        Reservation::Granted(id) => id,
        other => panic!("refused: {other:?}"),
    };
    let refused = |r: Reservation| match r {
        Reservation::Refused { oldest_failure_ms } => oldest_failure_ms,
        other => panic!("granted: {other:?}"),
    };
    let mut ids = Vec::new();
    for (i, src) in ["10.0.0.1", "10.0.0.1", "10.0.0.2"].iter().enumerate() {
        let t = 10_000 + i as i64;
        let id = granted(reserve("alice", src, t, 0).await);
        store
            .record_login_failure(
                (&id, "alice", src),
                t,
                0,
                &event(&format!("f{i}"), "login_failed", "alice", t),
            )
            .await
            .unwrap();
        ids.push(id);
    }
    // Three for alice (her limit), two from 10.0.0.1 (its limit): ended
    // failures alone are over.
    assert_eq!(
        refused(reserve("alice", "10.0.0.9", 10_010, 0).await),
        Some(10_000)
    );
    assert_eq!(
        refused(reserve("bob", "10.0.0.1", 10_010, 0).await),
        Some(10_000)
    );
    // Outside the window they do not count; checks under way do.
    let bob = granted(reserve("bob", "10.0.0.3", 10_010, 10_003).await);
    let _bob2 = granted(reserve("bob", "10.0.0.4", 10_011, 10_003).await);
    let _bob3 = granted(reserve("bob", "10.0.0.5", 10_012, 10_003).await);
    assert_eq!(
        refused(reserve("bob", "10.0.0.6", 10_013, 10_003).await),
        None
    );
    // A refused check leaves nothing behind; a released one no failure.
    store.release_login_attempt(&bob).await.unwrap();
    let bob4 = granted(reserve("bob", "10.0.0.6", 10_014, 10_003).await);
    // Both keys over: retry once the later key has room. Within the
    // window, only the failures in it count.
    let limits = |user, src, since, max| {
        let store = &store;
        async move {
            store
                .reserve_login_attempt(user, src, 10_015, since, max)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        refused(limits("alice", "10.0.0.2", 0, (3, 1)).await),
        Some(10_002)
    );
    assert_eq!(
        refused(limits("alice", "10.0.0.9", 10_001, (2, 5)).await),
        Some(10_001)
    );
    // Checks pending for over 30 s were abandoned: failures for good.
    for (i, src) in ["10.1.0.1", "10.1.0.2", "10.1.0.3"].into_iter().enumerate() {
        granted(reserve("dan", src, 20_000 + i as i64, 0).await);
    }
    assert_eq!(refused(reserve("dan", "10.1.0.4", 20_100, 0).await), None);
    assert_eq!(
        refused(reserve("dan", "10.1.0.4", 50_003, 0).await),
        Some(20_000)
    );
    // A success clears abandoned checks for the user too.
    store
        .clear_login_failures(("dan", "10.1.0.9", "none"), 50_004)
        .await
        .unwrap();
    granted(reserve("dan", "10.1.0.5", 50_005, 0).await);
    // A successful login clears the user's failures, not checks under way:
    // those from its own source for good, those from other sources only
    // for the user (a guesser's budget is not refilled).
    let alice_now = granted(reserve("carol", "10.0.0.7", 10_020, 10_003).await);
    let _under_way = granted(reserve("carol", "10.0.0.8", 10_021, 10_003).await);
    store
        .clear_login_failures(("alice", "10.0.0.2", "none"), 10_024)
        .await
        .unwrap();
    store
        .clear_login_failures(("carol", "10.0.0.7", &alice_now), 10_024)
        .await
        .unwrap();
    // None of alice's failures count against her now (a limit of 1 would
    // refuse one more).
    let alice_again = store
        .reserve_login_attempt("alice", "10.0.0.20", 10_025, 0, (1, 5))
        .await
        .unwrap();
    let _alice = granted(alice_again);
    assert_eq!(
        refused(reserve("frank", "10.0.0.1", 10_025, 0).await),
        Some(10_000),
        "the other source's failures still count against it"
    );
    let own_source = store
        .reserve_login_attempt("frank", "10.0.0.2", 10_025, 0, (5, 1))
        .await
        .unwrap();
    granted(own_source);
    let _c = granted(reserve("carol", "10.0.0.9", 10_022, 10_003).await);
    let _c = granted(reserve("carol", "10.0.0.10", 10_023, 10_003).await);
    assert_eq!(
        refused(reserve("carol", "10.0.0.11", 10_024, 10_003).await),
        None
    );
    // A check cleared while under way is still stored when it fails.
    store
        .clear_login_failures(("bob", "10.0.0.40", "none"), 10_029)
        .await
        .unwrap();
    store.release_login_attempt(&bob4).await.unwrap();
    store
        .record_login_failure(
            (&bob4, "bob", "10.0.0.6"),
            10_030,
            0,
            &event("f9", "login_failed", "mallory", 10_030),
        )
        .await
        .unwrap();
    let stored = store
        .reserve_login_attempt("bob", "10.0.0.30", 10_031, 10_025, (1, 5))
        .await
        .unwrap();
    assert!(
        matches!(
            stored,
            Reservation::Refused {
                oldest_failure_ms: Some(10_030)
            }
        ),
        "{stored:?}"
    );

    // TOTP steps are single use and only move forward.
    assert!(store.consume_totp_step("alice", 100).await.unwrap());
    assert!(!store.consume_totp_step("alice", 100).await.unwrap());
    assert!(!store.consume_totp_step("alice", 99).await.unwrap());
    assert!(store.consume_totp_step("alice", 101).await.unwrap());

    // Audit search filters and orders by time.
    store
        .append_audit(&event("a2", "login_succeeded", "bob", 30_000))
        .await
        .unwrap();
    store
        .append_audit(&event("a1", "login_succeeded", "alice", 20_000))
        .await
        .unwrap();
    let ok = store
        .search_audit(&AuditFilter {
            kind: Some("login_succeeded".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        ok.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["a1", "a2"]
    );
    let bobs = store
        .search_audit(&AuditFilter {
            actor: Some("bob".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!(store.list_users().await.unwrap().len(), 1);

    // Requests, one and many at once, with their versions.
    let request = |id: &str| StoredRequest {
        id: id.into(),
        requester: "alice".into(),
        state: "pending".into(),
        next_deadline: Some(90_000),
        created_at: 50_000,
        updated_at: 50_000,
        doc: format!("{{\"id\":\"{id}\"}}"),
        awaiting_review: true,
    };
    for id in ["r1", "r2"] {
        store.insert_request(&request(id), &[], &[]).await.unwrap();
    }
    let mut ids: Vec<String> = (0..1_100).map(|i| format!("missing-{i}")).collect();
    ids.insert(3, "r2".into());
    ids.push("r1".into());
    let mut got = store.get_requests(&ids).await.unwrap();
    got.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    assert_eq!(got, [(request("r1"), 1), (request("r2"), 1)]);
    assert_eq!(
        store.get_request("r2").await.unwrap(),
        Some((request("r2"), 1))
    );

    // Requests awaiting review: counted per requester, and a creation
    // decided on a count is not stored once the limit awaits by then.
    let dave = |id: &str, state: &str, awaiting_review: bool| StoredRequest {
        id: id.into(),
        requester: "dave".into(),
        state: state.into(),
        created_at: 60_000 + id.len() as i64,
        awaiting_review,
        ..request(id)
    };
    assert_eq!(store.count_awaiting_review("dave").await.unwrap(), 0);
    for (limit, id, state) in [(1, "d1", "pending"), (2, "d22", "needs-info")] {
        let r = dave(id, state, true);
        assert!(store
            .insert_request_unless_more_await(&r, &[], &[], Some(limit), None)
            .await
            .unwrap());
    }
    // An active grant (a break-glass one nobody acknowledged) awaits a
    // review but is not counted against the requester.
    store
        .insert_request(&dave("d333", "active", true), &[], &[])
        .await
        .unwrap();
    store
        .insert_request(&dave("d4444", "denied", false), &[], &[])
        .await
        .unwrap();
    assert_eq!(store.count_awaiting_review("dave").await.unwrap(), 2);
    assert_eq!(store.count_awaiting_review("alice").await.unwrap(), 2);
    // Two await review: with a limit of 2, the next is not stored.
    let late = dave("d55555", "pending", true);
    assert!(!store
        .insert_request_unless_more_await(&late, &[], &[], Some(2), None)
        .await
        .unwrap());
    assert_eq!(store.get_request("d55555").await.unwrap(), None);
    assert!(store
        .insert_request_unless_more_await(&late, &[], &[], Some(3), None)
        .await
        .unwrap());
    let listed = |only: bool| {
        let store = store.clone();
        async move {
            let rows = store
                .list_requests(Some("dave"), &[], only, None, 500)
                .await
                .unwrap();
            rows.into_iter().map(|r| r.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(true).await, ["d55555", "d333", "d22", "d1"]);
    assert_eq!(
        listed(false).await,
        ["d55555", "d4444", "d333", "d22", "d1"]
    );
    // A listing reads page after page: each goes on after the last row's
    // (created_at, id), rows of the same time by ID, none twice or left
    // out.
    for (id, at) in [
        ("t-c", 70_000),
        ("t-a", 70_000),
        ("t-z", 69_000),
        ("t-b", 70_000),
    ] {
        let r = StoredRequest {
            requester: "tess".into(),
            created_at: at,
            ..dave(id, "denied", false)
        };
        store.insert_request(&r, &[], &[]).await.unwrap();
    }
    let page = |after: Option<(i64, String)>| {
        let store = store.clone();
        async move {
            let after = after.as_ref().map(|(t, id)| (*t, id.as_str()));
            let rows = store
                .list_requests(Some("tess"), &[], false, after, 2)
                .await
                .unwrap();
            rows.into_iter().map(|r| r.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(page(None).await, ["t-a", "t-b"]);
    assert_eq!(page(Some((70_000, "t-b".into()))).await, ["t-c", "t-z"]);
    assert!(page(Some((69_000, "t-z".into()))).await.is_empty());
    // With every other filter too: states, and awaiting a review.
    let rows = store
        .list_requests(
            Some("dave"),
            &["pending", "needs-info"],
            true,
            Some((60_004, "x")),
            10,
        )
        .await
        .unwrap();
    let ids: Vec<_> = rows.into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["d22", "d1"]);
    // An update writes whether it still awaits a review.
    let (mut d1, version) = store.get_request("d1").await.unwrap().unwrap();
    assert!(d1.awaiting_review);
    d1.state = "cancelled".into();
    d1.awaiting_review = false;
    store
        .update_request(&d1, version, &[], &[], None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listed(true).await, ["d55555", "d333", "d22"]);
    assert_eq!(store.count_awaiting_review("dave").await.unwrap(), 2);
    // An open request an older wicketd wrote, without the mark: listed by
    // its state.
    store
        .insert_request(&dave("d666666", "pending", false), &[], &[])
        .await
        .unwrap();
    assert_eq!(listed(true).await, ["d666666", "d55555", "d333", "d22"]);

    // A batch larger than one multi-row INSERT (and not a multiple of it)
    // is stored whole, in one transaction, every column intact.
    let batch: Vec<AuditRow> = (0..600)
        .map(|i| AuditRow {
            request_id: (i % 3 == 0).then(|| format!("req-{i}")),
            session_id: Some("batch-session".into()),
            // Some rows large, so the batch is split by bytes as well.
            data: format!(
                "{pad}{{\"event\":\"db_query\",\"statement\":\"SELECT {i} -- é'\\\"\"}}",
                pad = " ".repeat(if i % 100 == 0 { 3 << 19 } else { 0 })
            ),
            ..event(&format!("b{i:04}"), "db_query", "carol", 40_000 + i)
        })
        .collect();
    store.append_audit_batch(&batch).await.unwrap();
    let stored = store
        .search_audit(&AuditFilter {
            session_id: Some("batch-session".into()),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stored, batch);
    // Runs of one session's statements (here: those with the same request)
    // shared rows.
    let rows = count(
        store,
        "SELECT COUNT(*) FROM audit_events WHERE session_id = 'batch-session'",
    )
    .await;
    assert!(rows < 600, "{rows} rows");

    // The audit log is one hash chain: every event above (the refused
    // duplicate user left no gap) checks out, then each kind of tampering
    // is found and placed.
    let v = store.verify_audit(10).await.unwrap();
    let head = 7 + rows;
    assert_eq!((v.events, v.head_seq), (607, head), "{v:?}");
    assert!(v.problems.is_empty(), "{v:?}");
    exec(
        store,
        &[
            "UPDATE audit_events SET data = '{\"event\":\"y\"}' WHERE id = 'a2'",
            "DELETE FROM audit_events WHERE id = 'f1'",
            &format!("DELETE FROM audit_events WHERE seq = {head}"),
            "INSERT INTO audit_events (id, time, kind, data) VALUES ('forged', 1, 'login_succeeded', '{}')",
        ],
    )
    .await;
    let v = store.verify_audit(10).await.unwrap();
    assert_eq!(v.problem_count, 4, "{v:?}");
    assert_eq!(
        v.problems,
        [
            "events #3..#3 were removed (between event f0 and event f2)".to_owned(),
            "event #6 (a2) was changed or put in: its hash does not follow the chain".to_owned(),
            "event forged is not in the chain: inserted".to_owned(),
            format!("events #{head}..#{head} were removed from the end"),
        ]
    );
}

/// The chain's links are keyed with the CA key set's key. An intruder
/// who rewrites an event and every link after it, as a plain hash chain
/// would let them, is still found, whether they hash without a key or with
/// a key of their own. A store from before the key (schema 9) is keyed
/// when opened, and what its old links showed is reported from then on. A
/// wicketd with another CA key set is refused. `storage` must be empty;
/// the CA key set is made in `dir`.
async fn keyed_chain(storage: &Storage, dir: &std::path::Path) {
    let open = || Store::open(storage, dir, key_in(dir));
    let store = open().await.unwrap();
    let batch: Vec<AuditRow> = (0..5)
        .map(|i| event(&format!("k{i}"), "login_succeeded", "kate", 10 + i))
        .collect();
    store.append_audit_batch(&batch).await.unwrap();
    let v = store.verify_audit(10).await.unwrap();
    assert_eq!((v.events, v.head_seq, v.problem_count), (5, 5, 0), "{v:?}");
    assert!(v.head_hash.starts_with(KEYED), "{v:?}");

    // Rewritten from k2 (#3) on, without the key and with another one:
    // every rewritten link is found, the first one as the change.
    let other = another_key();
    for (link, first) in [
        (
            Link::Plain,
            "event #3 (k2) has a link made without the chain's key: put in, or written by a wicketd older than schema 10 still running",
        ),
        (
            Link::Keyed(&other),
            "event #3 (k2) was changed or put in: its hash does not follow the chain",
        ),
    ] {
        exec(&store, &["UPDATE audit_events SET data = '{\"event\":\"z\"}' WHERE id = 'k2'"]).await;
        relink(&store, link, 3).await;
        let v = store.verify_audit(10).await.unwrap();
        assert_eq!(v.problem_count, 3, "{v:?}");
        assert_eq!(v.problems[0], first, "{v:?}");
        // Put back as it was, through the key: clean again.
        exec(&store, &["UPDATE audit_events SET data = '{\"event\":\"x\"}' WHERE id = 'k2'"]).await;
        relink(&store, Link::Keyed(&key_in(dir)), 3).await;
        let v = store.verify_audit(10).await.unwrap();
        assert_eq!(v.problem_count, 0, "{v:?}");
    }

    // The record of what keying found is sealed with the key: emptied or
    // changed, it shows.
    exec(&store, &["UPDATE audit_chain SET keyed_problems = NULL"]).await;
    let v = store.verify_audit(10).await.unwrap();
    assert_eq!(
        v.problems,
        ["the record of what keying the chain found (audit_chain.keyed_problems) was removed or changed"],
        "{v:?}"
    );
    exec(
        &store,
        &["UPDATE audit_chain SET keyed_problems = '00 {\"count\":0,\"problems\":[]}'"],
    )
    .await;
    assert_eq!(store.verify_audit(10).await.unwrap().problem_count, 1);

    // Rolled back to schema 9 (links unkeyed, no key columns) after an
    // event was changed, as someone who can write the store but has no CA
    // key would, to have their SHA-256 chain keyed: refused, because this
    // CA key set keyed a chain before (the marker beside it).
    // `relinked` runs before the chain is hashed again, `after` after.
    type Sql = &'static [&'static str];
    let to_schema_9 = |store: Store, relinked: Sql, after: Sql| async move {
        exec(&store, relinked).await;
        relink(&store, Link::Plain, 1).await;
        exec(&store, after).await;
        exec(
            &store,
            &[
                "ALTER TABLE audit_chain DROP COLUMN key_id",
                "ALTER TABLE audit_chain DROP COLUMN keyed_problems",
                "DELETE FROM schema_migrations WHERE version = 10",
            ],
        )
        .await;
    };
    to_schema_9(
        store,
        &["UPDATE audit_events SET actor = 'mallory' WHERE id = 'k1'"],
        &[],
    )
    .await;
    let marker = dir.join("ca").join(wicketd::store::KEYED_MARKER);
    assert!(marker.exists());
    let err = open().await.unwrap_err().to_string();
    assert!(
        err.contains("is not keyed, but this CA key set keyed one before")
            && err.contains("remove that file"),
        "{err}"
    );
    // An admin who knows why (an old backup restored) removes the marker:
    // the chain is keyed, clean, every link keyed, the marker back.
    std::fs::remove_file(&marker).unwrap();
    let store = open().await.unwrap();
    assert!(marker.exists());
    let v = store.verify_audit(10).await.unwrap();
    assert_eq!((v.events, v.problem_count), (5, 0), "{v:?}");
    let unkeyed = count(
        &store,
        &format!("SELECT COUNT(*) FROM audit_events WHERE hash NOT LIKE '{KEYED}%'"),
    )
    .await;
    assert_eq!(unkeyed, 0);
    // An event changed in a chain that was not keyed yet (an upgrade)
    // stays found once it is.
    to_schema_9(
        store,
        &[],
        &["UPDATE audit_events SET actor = 'mallory2' WHERE id = 'k1'"],
    )
    .await;
    std::fs::remove_file(&marker).unwrap();
    let store = open().await.unwrap();
    let v = store.verify_audit(10).await.unwrap();
    assert_eq!(
        v.problems,
        ["before the chain was keyed (schema 10): event #2 (k1) did not follow the chain (changed or put in)"],
        "{v:?}"
    );

    // Another CA key set: refused, saying what to do.
    let err = Store::open(storage, dir, another_key()).await.unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "the audit chain is keyed with key id {}",
            key_in(dir).id()
        )) && err.to_string().contains("needs the same CA key set"),
        "{err}"
    );
}

/// Hashes the chain again from place `from` on with `link`, and moves the
/// head: what an intruder who can write the store would do.
/// The newest events removed with the head moved back (which needs no
/// key) are found once this host has seen the head past them.
async fn cut_tail(storage: &Storage, dir: &std::path::Path) {
    let store = Store::open(storage, dir, key_in(dir)).await.unwrap();
    let seen = dir.join("ca").join(wicketd::store::SEEN_FILE);
    let append = |from: i64, to: i64, prefix: &'static str| {
        let batch: Vec<AuditRow> = (from..to)
            .map(|i| event(&format!("{prefix}{i}"), "login_succeeded", "tom", 10 + i))
            .collect();
        let store = &store;
        async move { store.append_audit_batch(&batch).await.unwrap() }
    };
    append(0, 5, "t").await;
    assert_eq!(store.note_chain_head().await.unwrap(), None);
    let text = std::fs::read_to_string(&seen).unwrap();
    assert!(text.starts_with("5 k1:"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&seen).unwrap().permissions().mode() & 0o777,
        0o600
    );
    append(5, 8, "t").await;
    assert_eq!(store.note_chain_head().await.unwrap(), None);
    assert!(std::fs::read_to_string(&seen).unwrap().starts_with("8 "));

    // #7 and #8 removed, the head put on #6's link: the chain alone holds.
    exec(
        &store,
        &[
            "DELETE FROM audit_events WHERE seq > 6",
            "UPDATE audit_chain SET seq = 6, hash = (SELECT hash FROM audit_events WHERE seq = 6) WHERE id = 1",
        ],
    )
    .await;
    let v = store.verify_audit(10).await.unwrap();
    let problem = format!(
        "this host saw the chain's head at event #8 ({}), and it is gone: the newest events were removed, or lost (a crash of the store's host, a failover to a replica behind it), and the head moved back (if the store was restored from a backup on purpose, remove that file)",
        seen.display()
    );
    assert_eq!(v.problems, std::slice::from_ref(&problem), "{v:?}");
    // The record is kept, and the watcher says so too.
    assert_eq!(store.note_chain_head().await.unwrap(), Some(problem));
    assert!(std::fs::read_to_string(&seen).unwrap().starts_with("8 "));
    // Put back as it was, it holds again; up to #8 with other events, a
    // changed link is found.
    append(6, 8, "t").await;
    assert_eq!(store.verify_audit(10).await.unwrap().problem_count, 0);
    assert_eq!(store.note_chain_head().await.unwrap(), None);
    exec(
        &store,
        &[
            "DELETE FROM audit_events WHERE seq > 6",
            "UPDATE audit_chain SET seq = 6, hash = (SELECT hash FROM audit_events WHERE seq = 6) WHERE id = 1",
        ],
    )
    .await;
    append(6, 8, "u").await;
    let v = store.verify_audit(10).await.unwrap();
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("at event #8") && p.contains("its link is not the one seen then")),
        "{v:?}"
    );
    // The watcher too: a head back at the seen place with another link.
    let watched = store.note_chain_head().await.unwrap().unwrap_or_default();
    assert!(
        watched.contains("its link is not the one seen then"),
        "{watched}"
    );
    // An unreadable record is reported, not ignored.
    std::fs::write(&seen, "eight\n").unwrap();
    let v = store.verify_audit(10).await.unwrap();
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("is not `<seq> <hash>`")),
        "{v:?}"
    );
}

async fn relink(store: &Store, link: Link<'_>, from: i64) {
    let mut tx = store.begin().await.unwrap();
    let prev: String = if from == 1 {
        String::new()
    } else {
        let r = sqlx::query("SELECT hash FROM audit_events WHERE seq = $1")
            .bind(from - 1)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        sqlx::Row::get(&r, 0)
    };
    let rows = sqlx::query(
        "SELECT id, time, kind, actor, request_id, session_id, data, seq FROM audit_events WHERE seq >= $1 ORDER BY seq",
    )
    .bind(from)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    let mut prev = prev;
    let mut last = from - 1;
    for r in &rows {
        use sqlx::Row;
        let e = AuditRow {
            id: r.get(0),
            time_ms: r.get(1),
            kind: r.get(2),
            actor: r.get(3),
            request_id: r.get(4),
            session_id: r.get(5),
            data: r.get(6),
        };
        last = r.get(7);
        prev = chain_hash(link, &prev, last, &e);
        sqlx::query("UPDATE audit_events SET hash = $1 WHERE seq = $2")
            .bind(prev.as_str())
            .bind(last)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE audit_chain SET seq = $1, hash = $2 WHERE id = 1")
        .bind(last)
        .bind(prev)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Runs `statements` by hand (as a tool or an intruder would), in one
/// transaction; the rows they changed.
async fn exec(store: &Store, statements: &[&str]) -> u64 {
    let mut tx = store.begin().await.unwrap();
    let mut changed = 0;
    for sql in statements {
        changed += sqlx::query(sql)
            .execute(&mut *tx)
            .await
            .unwrap()
            .rows_affected();
    }
    tx.commit().await.unwrap();
    changed
}

async fn count(store: &Store, sql: &str) -> i64 {
    let mut tx = store.begin().await.unwrap();
    let n: i64 = sqlx::Row::get(&sqlx::query(sql).fetch_one(&mut *tx).await.unwrap(), 0);
    tx.commit().await.unwrap();
    n
}

/// Busy database sessions: their statement events share rows in the
/// store, and every read sees the events as they were sent. Run after
/// [`exercise`] (its tampering stays; only what this adds is checked).
async fn statement_events(store: &Store) {
    let before = store.verify_audit(100).await.unwrap();
    let ev = |n: usize, session: &str, kind: &str, time_ms: i64| AuditRow {
        id: format!("busy-{time_ms}-{n:05}"),
        time_ms,
        kind: kind.into(),
        actor: Some("dana".into()),
        request_id: Some("req-busy".into()),
        session_id: Some(session.into()),
        data: format!(
            r#"{{"event":"{kind}","session_id":"{session}","statement":"SELECT {n} -- 'é\""}}"#
        ),
    };
    let mut all = Vec::new();
    for (n, session) in ["busy-1", "busy-2"].into_iter().enumerate() {
        all.push(ev(n, session, "session_started", 100_000));
    }
    for n in 2..3002 {
        let session = ["busy-1", "busy-2"][n % 2];
        let kind = ["db_parse", "db_parse", "db_execute", "db_execute"][n % 4];
        all.push(ev(n, session, kind, 100_000 + (n / 10) as i64));
    }
    for (n, session) in ["busy-1", "busy-2"].into_iter().enumerate() {
        all.push(ev(3002 + n, session, "session_ended", 100_400));
    }
    // busy-2 stood on a second request too.
    all[1].data = r#"{"event":"session_started","session_id":"busy-2","request_ids":["req-busy","req-second"]}"#.into();
    // As the audit writer hands them over: batches, sessions interleaved.
    for batch in all.chunks(1000) {
        store.append_audit_batch(batch).await.unwrap();
    }
    let rows = count(
        store,
        "SELECT COUNT(*) FROM audit_events WHERE session_id LIKE 'busy-%'",
    )
    .await;
    assert!(rows <= 20, "{rows} rows for 3004 events");

    let search = |f: AuditFilter| async move { store.search_audit(&f).await.unwrap() };
    let of = |session: &str| -> Vec<AuditRow> {
        all.iter()
            .filter(|e| e.session_id.as_deref() == Some(session))
            .cloned()
            .collect()
    };
    let busy1 = search(AuditFilter {
        session_id: Some("busy-1".into()),
        limit: 10_000,
        ..Default::default()
    })
    .await;
    assert_eq!(busy1, of("busy-1"), "exactly the events sent, in order");
    let executes = search(AuditFilter {
        session_id: Some("busy-2".into()),
        kind: Some("db_execute".into()),
        limit: 10_000,
        ..Default::default()
    })
    .await;
    let want: Vec<AuditRow> = of("busy-2")
        .into_iter()
        .filter(|e| e.kind == "db_execute")
        .collect();
    assert_eq!((executes.len(), &executes), (750, &want));
    // From a time inside a row, and fewer than a row holds.
    let from_mid = search(AuditFilter {
        session_id: Some("busy-2".into()),
        since_ms: Some(100_150),
        limit: 7,
        ..Default::default()
    })
    .await;
    let want: Vec<AuditRow> = of("busy-2")
        .into_iter()
        .filter(|e| e.time_ms >= 100_150)
        .take(7)
        .collect();
    assert_eq!(from_mid, want);
    let first = search(AuditFilter {
        request_id: Some("req-busy".into()),
        limit: 5,
        ..Default::default()
    })
    .await;
    assert_eq!(first, all[..5]);

    // Actions: the session starts and the executes.
    assert_eq!(
        store.count_request_actions("req-busy").await.unwrap(),
        2 + 1500
    );
    // The second request busy-2 stood on finds its events and its actions,
    // though they name the first.
    let second = search(AuditFilter {
        request_id: Some("req-second".into()),
        limit: 10_000,
        ..Default::default()
    })
    .await;
    assert_eq!(second, of("busy-2"));
    assert_eq!(
        store.count_request_actions("req-second").await.unwrap(),
        1 + 750
    );

    // The chain holds: the events count once each; then a changed count of
    // actions is found, once per changed row.
    let v = store.verify_audit(100).await.unwrap();
    assert_eq!(v.events, before.events + 3004);
    assert_eq!(v.problem_count, before.problem_count, "{v:?}");
    let changed = exec(
        store,
        &["UPDATE audit_events SET actions = 0 WHERE kind = 'session_events' AND session_id = 'busy-1' AND actions > 0"],
    )
    .await;
    assert!(changed > 0);
    let v = store.verify_audit(100).await.unwrap();
    let found = v
        .problems
        .iter()
        .filter(|p| p.ends_with("its count of actions was changed"));
    assert_eq!(found.count() as u64, changed, "{v:?}");
    assert_eq!(v.problem_count, before.problem_count + changed);
    let counted = store.count_request_actions("req-busy").await.unwrap();
    assert!(counted < 1502);

    // A row without a count (from before it, or from an older wicketd still
    // running): its kind decides.
    exec(
        store,
        &[
            "INSERT INTO audit_events (id, time, kind, request_id, data) VALUES ('older-1', 1, 'db_execute', 'req-busy', '{}')",
            "INSERT INTO audit_events (id, time, kind, request_id, data) VALUES ('older-2', 1, 'db_parse', 'req-busy', '{}')",
        ],
    )
    .await;
    assert_eq!(
        store.count_request_actions("req-busy").await.unwrap(),
        counted + 1
    );
}

/// The change feed the in-memory index follows: each change to a user or
/// a request is numbered in commit order and read back once; a change
/// that does not commit takes no number.
async fn change_feed(store: &Store) {
    let start = store.changes(None).await.unwrap();
    let h0 = start.head;
    // A read of the feed: its head, and the users and requests it named.
    let names = |c: &wicketd::store::Changes| -> (i64, Vec<String>, Vec<String>) {
        let mut u: Vec<String> = c.users.iter().map(|(k, _)| k.clone()).collect();
        let mut r: Vec<String> = c.requests.iter().map(|r| r.key.clone()).collect();
        u.sort();
        r.sort();
        (c.head, u, r)
    };
    let list = |xs: &[&str]| -> Vec<String> { xs.iter().map(|x| (*x).to_owned()).collect() };
    let feed = user("feed", &["dev"], 1);
    store
        .create_user(&feed, &event("feed-e1", "user_created", "feed", 1))
        .await
        .unwrap();
    let c = store.changes(Some(h0)).await.unwrap();
    assert_eq!(names(&c), (h0 + 1, list(&["feed"]), list(&[])));
    assert_eq!(c.users[0].1.as_ref().unwrap(), &feed);
    let keys = |c: &wicketd::store::Changes| -> Vec<(String, i64)> {
        c.requests.iter().map(|r| (r.key.clone(), r.seq)).collect()
    };
    let req = |id: &str, state: &str| StoredRequest {
        id: id.into(),
        requester: "feed".into(),
        state: state.into(),
        next_deadline: None,
        created_at: 2,
        updated_at: 2,
        doc: "{}".into(),
        awaiting_review: state == "pending",
    };
    store
        .insert_request(&req("feed-r1", "active"), &[], &[])
        .await
        .unwrap();
    let c = store.changes(Some(h0 + 1)).await.unwrap();
    assert_eq!(c.head, h0 + 2);
    assert_eq!(keys(&c), [("feed-r1".to_string(), h0 + 2)]);
    // A stale version writes nothing and takes no number.
    let stale = store
        .update_request(&req("feed-r1", "revoked"), 7, &[], &[], None)
        .await
        .unwrap();
    assert_eq!(stale, None);
    assert_eq!(store.changes(Some(h0 + 2)).await.unwrap().head, h0 + 2);
    // Started from nothing, the index reads every user and every active
    // request; a revoked one is not among them.
    let all = store.changes(None).await.unwrap();
    assert!(names(&all).1.contains(&"feed".to_string()));
    assert!(names(&all).2.contains(&"feed-r1".to_string()));
    let took = store
        .update_request(&req("feed-r1", "revoked"), 1, &[], &[], None)
        .await
        .unwrap();
    assert_eq!(took, Some(h0 + 3));
    store
        .set_user_disabled("feed", true, &event("feed-e2", "user_disabled", "feed", 3))
        .await
        .unwrap();
    let c = store.changes(Some(h0 + 2)).await.unwrap();
    assert_eq!(names(&c), (h0 + 4, list(&["feed"]), list(&["feed-r1"])));
    assert!(c.users[0].1.as_ref().unwrap().disabled);
    assert_eq!(c.requests[0].row.as_ref().unwrap().state, "revoked");
    assert_eq!(keys(&c), [("feed-r1".to_string(), h0 + 3)]);
    assert!(!names(&store.changes(None).await.unwrap())
        .2
        .contains(&"feed-r1".to_string()));
    // Concurrent writers: every change gets its own number.
    let write = |s: Store, tag: &'static str| async move {
        for i in 0..30 {
            let r = StoredRequest {
                id: format!("feed-{tag}-{i}"),
                ..req("", "pending")
            };
            s.insert_request(
                &r,
                &[event(&format!("feed-{tag}-e{i}"), "x", "feed", 4)],
                &[],
            )
            .await
            .unwrap();
        }
    };
    tokio::join!(write(store.clone(), "a"), write(store.clone(), "b"));
    let c = store.changes(Some(h0 + 4)).await.unwrap();
    assert_eq!((c.head, c.requests.len()), (h0 + 64, 60));

    // Hand-written SQL, which takes no number itself, is stamped by the
    // store's triggers, so every grant index sees it.
    let h = h0 + 64;
    let sql = |q: &'static str| async move {
        let mut tx = store.begin().await.unwrap();
        let done = sqlx::query(q).execute(&mut *tx).await;
        match done {
            Ok(_) => tx.commit().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    sql("UPDATE users SET disabled = 0 WHERE name = 'feed'")
        .await
        .unwrap();
    let c = store.changes(Some(h)).await.unwrap();
    assert_eq!(names(&c), (h + 1, list(&["feed"]), list(&[])));
    assert!(!c.users[0].1.as_ref().unwrap().disabled);
    sql("UPDATE access_requests SET state = 'active' WHERE id = 'feed-r1'")
        .await
        .unwrap();
    sql("INSERT INTO users (name, roles, created_at) VALUES ('byhand', '[\"dev\"]', 5)")
        .await
        .unwrap();
    let c = store.changes(Some(h + 1)).await.unwrap();
    assert_eq!(names(&c), (h + 3, list(&["byhand"]), list(&["feed-r1"])));
    assert_eq!(keys(&c), [("feed-r1".to_string(), h + 2)]);
    // What changes nothing the index keeps takes no number (a login's TOTP
    // step), and wicketd's own writes take exactly one.
    sql("UPDATE users SET totp_last_step = 9 WHERE name = 'feed'")
        .await
        .unwrap();
    store
        .set_user_disabled("feed", true, &event("feed-e3", "user_disabled", "feed", 6))
        .await
        .unwrap();
    assert_eq!(store.changes(Some(h + 3)).await.unwrap().head, h + 4);
    // Rows are not deleted or renamed (an index cannot be told), and the
    // refusal says what to do instead; nothing changed.
    let err = sql("DELETE FROM users WHERE name = 'feed'")
        .await
        .unwrap_err();
    assert!(err.contains("users are not deleted; disable them"), "{err}");
    let err = sql("DELETE FROM access_requests").await.unwrap_err();
    assert!(err.contains("access requests are not deleted"), "{err}");
    if store.backend() == wicketd::store::Backend::Postgres {
        let err = sql("TRUNCATE users, access_requests").await.unwrap_err();
        assert!(err.contains("are not deleted"), "{err}");
    }
    let err = sql("UPDATE users SET name = 'other' WHERE name = 'feed'")
        .await
        .unwrap_err();
    assert!(err.contains("users are not renamed"), "{err}");
    let err = sql("UPDATE access_requests SET id = 'x' WHERE id = 'feed-r1'")
        .await
        .unwrap_err();
    assert!(err.contains("access requests keep their ID"), "{err}");
    assert!(store.get_user("feed").await.unwrap().is_some());
    assert_eq!(store.changes(Some(h + 3)).await.unwrap().head, h + 4);
}

/// PostgreSQL cancel keys shared between wicketds: a key is taken once,
/// read back whole (every bit of the 32-bit keys), forgotten at session
/// end, and pruned by age.
async fn cancel_keys(store: &Store) {
    let key = |pid: u32, secret: u32, created_ms: i64| CancelKeyRow {
        pid,
        secret,
        user: "alice".into(),
        resource: "prod-pg".into(),
        db_user: "app".into(),
        backend_pid: 4_000_000_001,
        backend_secret: u32::MAX,
        created_ms,
    };
    let a = key(0x7fff_ffff, 0xffff_fffe, 1_000);
    assert!(store.put_cancel_key(&a).await.unwrap());
    // The same key again (another wicketd drew it): refused, first kept.
    let mut taken = key(a.pid, a.secret, 2_000);
    taken.user = "mallory".into();
    assert!(!store.put_cancel_key(&taken).await.unwrap());
    assert!(store.cancel_key(a.pid, a.secret).await.unwrap() == Some(a.clone()));
    assert!(store.cancel_key(a.pid, 1).await.unwrap().is_none());
    let b = key(1, 2, 5_000);
    assert!(store.put_cancel_key(&b).await.unwrap());
    // Only the row for that session's backend goes.
    store
        .delete_cancel_key(b.pid, b.secret, b.backend_pid, 7)
        .await
        .unwrap();
    assert!(store.cancel_key(b.pid, b.secret).await.unwrap().is_some());
    store
        .delete_cancel_key(b.pid, b.secret, b.backend_pid, b.backend_secret)
        .await
        .unwrap();
    assert!(store.cancel_key(b.pid, b.secret).await.unwrap().is_none());
    assert!(store.put_cancel_key(&key(3, 4, 9_000)).await.unwrap());
    assert_eq!(store.prune_cancel_keys(9_000).await.unwrap(), 1);
    assert!(store.cancel_key(a.pid, a.secret).await.unwrap().is_none());
    assert!(store.cancel_key(3, 4).await.unwrap().is_some());
}

/// Ended session recordings copied to a shared store: stored once, listed
/// newest first without their data, read back byte for byte.
async fn recordings(store: &Store) {
    let meta = |id: &str, started: i64| RecordingMeta {
        session_id: id.into(),
        user: "alice".into(),
        node: "node-1".into(),
        login: "ops".into(),
        request_ids: vec!["r1".into(), "r2".into()],
        started,
    };
    let put = |m: RecordingMeta, data: &'static [u8], stored: i64| {
        let store = store.clone();
        async move {
            let mut file = data;
            store.put_recording(&m, &mut file, stored, 1000).await
        }
    };
    let data: Vec<u8> = (0..=255u8).cycle().take(70_500).collect();
    let data: &'static [u8] = data.leak();
    put(meta("s1", 10), data, 11).await.unwrap();
    put(meta("s2", 20), b"{}\n", 21).await.unwrap();
    // Stored again (a retry): the first copy stays.
    put(meta("s1", 10), b"other", 12).await.unwrap();
    let list = store.list_recordings().await.unwrap();
    assert_eq!(list, vec![(meta("s2", 20), 3), (meta("s1", 10), 70_500)]);
    let m = store.recording_meta("s1").await.unwrap().unwrap();
    assert_eq!(m, meta("s1", 10));
    // In parts of the size asked for, the last one shorter.
    assert_eq!(store.recording_parts("s1").await.unwrap(), Some(71));
    let last = store.recording_part("s1", 70).await.unwrap().unwrap();
    assert_eq!(last, &data[70_000..]);
    assert!(store.recording_part("s1", 71).await.unwrap().is_none());
    let back = store.recording_data("s1").await.unwrap().unwrap();
    assert!(back == data, "the recording changed on the way");
    // What a wicketd from before parts reads in the row: a recording
    // saying so, with the header it lists.
    let mut tx = store.begin().await.unwrap();
    let row = sqlx::query("SELECT data FROM session_recordings WHERE session_id = 's1'")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    drop(tx);
    let old: Vec<u8> = sqlx::Row::try_get(&row, 0).unwrap();
    let old = String::from_utf8(old).unwrap();
    let (header, rest) = old.split_once('\n').unwrap();
    let header: serde_json::Value = serde_json::from_str(header).unwrap();
    assert_eq!(header["wicket"]["session_id"], "s1");
    assert!(rest.contains("stored in parts"), "{rest}");
    assert!(store.recording_meta("s3").await.unwrap().is_none());
    assert!(store.recording_data("s3").await.unwrap().is_none());
    // An empty file is one empty part.
    put(meta("s0", 5), b"", 6).await.unwrap();
    assert_eq!(store.recording_parts("s0").await.unwrap(), Some(1));
    assert_eq!(store.recording_data("s0").await.unwrap(), Some(Vec::new()));
    // A file that cannot be read to its end stores nothing.
    struct Breaks(usize);
    impl tokio::io::AsyncRead for Breaks {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(Err(std::io::Error::other("disk gone")));
            }
            self.0 -= 1;
            let n = buf.remaining().min(600);
            buf.put_slice(&[b'x'; 600][..n]);
            std::task::Poll::Ready(Ok(()))
        }
    }
    let err = store
        .put_recording(&meta("sx", 5), &mut Breaks(4), 6, 1000)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disk gone"), "{err}");
    assert!(store.recording_meta("sx").await.unwrap().is_none());
    assert!(store.recording_part("sx", 0).await.unwrap().is_none());
    // Parts a hand-deleted row left behind are replaced by the next copy.
    exec(
        store,
        &["DELETE FROM session_recordings WHERE session_id = 's0'"],
    )
    .await;
    put(meta("s0", 5), b"again", 6).await.unwrap();
    assert_eq!(store.recording_data("s0").await.unwrap().unwrap(), b"again");
    exec(
        store,
        &["DELETE FROM session_recordings WHERE session_id = 's0'"],
    )
    .await;

    // Retention: those whose session started and ended (was stored)
    // before the cut go, each with its audit event, each taken once even
    // by two wicketds at the same moment.
    put(meta("s3", 15), b"{}\n", 30).await.unwrap();
    put(meta("s4", 16), b"{}\n", 17).await.unwrap();
    let row = |m: &RecordingMeta| AuditRow {
        session_id: Some(m.session_id.clone()),
        ..event(
            &format!("del-{}", m.session_id),
            "recording_deleted",
            "wicketd",
            5,
        )
    };
    let deleted_events = |store: &Store| {
        let store = store.clone();
        async move {
            let mut ids: Vec<String> = store
                .search_audit(&AuditFilter {
                    kind: Some("recording_deleted".into()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_iter()
                .filter_map(|e| e.session_id)
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(
        store.delete_recordings_ended_before(10, row).await.unwrap(),
        0
    );
    let (a, b) = tokio::join!(
        store.delete_recordings_ended_before(18, row),
        store.delete_recordings_ended_before(18, row)
    );
    assert_eq!(a.unwrap() + b.unwrap(), 2, "s1 and s4, each once");
    assert_eq!(deleted_events(store).await, ["s1", "s4"]);
    // s3 started before 20 but was stored (ended) after it.
    assert_eq!(
        store.delete_recordings_ended_before(20, row).await.unwrap(),
        0
    );
    assert_eq!(
        store.delete_recordings_ended_before(31, row).await.unwrap(),
        2
    );
    assert_eq!(deleted_events(store).await, ["s1", "s2", "s3", "s4"]);
    assert!(store.list_recordings().await.unwrap().is_empty());
    assert!(store.recording_data("s1").await.unwrap().is_none());
    // Their parts went with them, and so did those left by a row deleted
    // without them.
    assert!(store.recording_part("s1", 0).await.unwrap().is_none());
    assert!(store.recording_part("s4", 0).await.unwrap().is_none());
    assert!(store.recording_part("s0", 0).await.unwrap().is_none());
}

/// Migrations 15 to 18 on a store from before them. 15 marks the
/// requests that await a review: by state, and break-glass grants nobody
/// acknowledged (by their document). 16 finds the sessions that stood on
/// several requests from their `session_started` events, and 18 the other
/// events that named several (a login, a refusal).
async fn migrations_from_14(storage: &Storage, dir: &std::path::Path) {
    let store = Store::open(storage, dir, key_in(dir)).await.unwrap();
    let started = |session: &str, ids: &str| AuditRow {
        session_id: Some(session.into()),
        request_id: Some("b1".into()),
        data: format!(
            r#"{{"event":"session_started","session_id":"{session}","request_ids":{ids}}}"#
        ),
        ..event(
            &format!("start-{session}"),
            "session_started",
            "erin",
            5_000,
        )
    };
    let sessions = [
        started("two", r#"["b1","b22"]"#),
        started("one", r#"["b1"]"#),
        started("three", r#"["b1","b22","b333"]"#),
    ];
    store.append_audit_batch(&sessions).await.unwrap();
    // Events outside a session that name several requests: found by each.
    let named = |id: &str, kind: &str, ids: &str| AuditRow {
        request_id: Some("b1".into()),
        data: format!(r#"{{"event":"{kind}","request_ids":{ids}}}"#),
        ..event(id, kind, "erin", 5_001)
    };
    store
        .append_audit_batch(&[
            named("login-2", "login_succeeded", r#"["b1","b22"]"#),
            named("denied-3", "session_denied", r#"["b1","b22","b333"]"#),
            named("login-1", "login_succeeded", r#"["b1"]"#),
            // Another kind's list is not read.
            named("other", "access_denied", r#"["b1","b22"]"#),
        ])
        .await
        .unwrap();
    // More than a page (1000 rows) of each backfill's reading: every one
    // is found after it.
    let many_sessions: Vec<AuditRow> = (0..1_234)
        .map(|i| AuditRow {
            request_id: Some("bfirst".into()),
            ..started(&format!("many-{i:04}"), r#"["bfirst","bmany"]"#)
        })
        .collect();
    let many_logins: Vec<AuditRow> = (0..2_345)
        .map(|i| AuditRow {
            request_id: Some("bfirst".into()),
            ..named(
                &format!("many-{i:04}"),
                "login_succeeded",
                r#"["bfirst","bmany"]"#,
            )
        })
        .collect();
    store.append_audit_batch(&many_sessions).await.unwrap();
    store.append_audit_batch(&many_logins).await.unwrap();
    let many = |store: Store| async move {
        let f = AuditFilter {
            request_id: Some("bmany".into()),
            limit: 10_000,
            ..Default::default()
        };
        let found = store.search_audit(&f).await.unwrap();
        let sessions: std::collections::BTreeSet<String> =
            found.iter().filter_map(|e| e.session_id.clone()).collect();
        let logins = found.iter().filter(|e| e.session_id.is_none()).count();
        (sessions.len(), logins)
    };
    assert_eq!(many(store.clone()).await, (1_234, 2_345));
    let events_by_request = |store: Store, id: &'static str| async move {
        let f = AuditFilter {
            request_id: Some(id.into()),
            ..Default::default()
        };
        let found = store.search_audit(&f).await.unwrap();
        let mut ids: Vec<String> = found
            .into_iter()
            .filter(|e| e.session_id.is_none())
            .map(|e| e.id)
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(
        events_by_request(store.clone(), "b22").await,
        ["denied-3", "login-2"]
    );
    assert_eq!(events_by_request(store.clone(), "b333").await, ["denied-3"]);
    // The links are not chained, but `verify` checks each against the
    // chained event it comes from: one removed and one put in are found.
    let v = store.verify_audit(10).await.unwrap();
    assert_eq!(v.problem_count, 0, "{v:?}");
    exec(
        &store,
        &[
            "DELETE FROM session_requests WHERE session_id = 'three' AND request_id = 'b333'",
            "INSERT INTO event_requests (request_id, event_id) VALUES ('b333', 'login-2')",
            "INSERT INTO session_requests (request_id, session_id) VALUES ('b22', 'no-such-session')",
        ],
    )
    .await;
    let v = store.verify_audit(10).await.unwrap();
    assert_eq!(
        v.problems,
        [
            "event_requests links login-2 to request b333, which its event does not name: put in",
            "session_requests lost three's link to request b333: a search by that request does not find it (removed, or written by a wicketd older than schema 16 still running)",
            "session_requests links no-such-session to request b22, but no event in the chain is no-such-session: put in",
        ],
        "{v:?}"
    );
    exec(
        &store,
        &["DELETE FROM session_requests", "DELETE FROM event_requests"],
    )
    .await;
    assert_eq!(
        store.verify_audit(10).await.unwrap().problem_count,
        3_585,
        "every link of the sessions and events that name several requests"
    );
    assert!(events_by_request(store.clone(), "b22").await.is_empty());
    let row = |id: &str, state: &str, doc: &str| StoredRequest {
        id: id.into(),
        requester: "erin".into(),
        state: state.into(),
        next_deadline: None,
        created_at: 1_000 + id.len() as i64,
        updated_at: 1_000,
        doc: doc.into(),
        awaiting_review: false,
    };
    let ack = r#"{"break_glass":true,"reviews":[{"reviewer":"sam","verdict":"acknowledge"}]}"#;
    // A reason quoting the pattern is escaped in the document: no match.
    let quoted = r#"{"reason":"\"verdict\":\"acknowledge\"","break_glass":true}"#;
    for r in [
        row("b1", "pending", "{}"),
        row("b22", "needs-info", "{}"),
        row("b333", "active", r#"{"break_glass":true,"reviews":[]}"#),
        row("b4444", "expired", ack),
        row("b55555", "denied", r#"{"break_glass":false}"#),
        row("b666666", "revoked", quoted),
    ] {
        store.insert_request(&r, &[], &[]).await.unwrap();
    }
    let listed = |store: Store| async move {
        let rows = store
            .list_requests(None, &[], true, None, 500)
            .await
            .unwrap();
        rows.into_iter().map(|r| r.id).collect::<Vec<_>>()
    };
    // Unmarked (as an older wicketd writes them): open ones by state only.
    assert_eq!(listed(store.clone()).await, ["b22", "b1"]);
    let by_request = |store: Store, id: &'static str| async move {
        let f = AuditFilter {
            request_id: Some(id.into()),
            ..Default::default()
        };
        let found = store.search_audit(&f).await.unwrap();
        let mut sessions: Vec<String> = found.into_iter().filter_map(|e| e.session_id).collect();
        sessions.sort_unstable();
        sessions
    };
    assert!(by_request(store.clone(), "b22").await.is_empty());
    // A recording stored whole in its row, as before parts (schema 17).
    let old = RecordingMeta {
        session_id: "old".into(),
        user: "erin".into(),
        node: "node-1".into(),
        login: "ops".into(),
        request_ids: vec!["b1".into()],
        started: 1,
    };
    store
        .put_recording(&old, &mut &b"whole in its row"[..], 2, RECORDING_PART)
        .await
        .unwrap();
    // Back to schema 14, as an older wicketd left it, then open again.
    exec(
        &store,
        &[
            "UPDATE session_recordings SET data = (SELECT data FROM session_recording_parts \
             WHERE session_id = 'old' AND part = 0) WHERE session_id = 'old'",
            "DROP TABLE session_recording_parts",
            "ALTER TABLE session_recordings DROP COLUMN parts",
            "DROP INDEX access_requests_awaiting",
            "ALTER TABLE access_requests DROP COLUMN awaiting_review",
            "DROP TABLE session_requests",
            "DROP TABLE event_requests",
            "DROP INDEX access_requests_created",
            "DELETE FROM schema_migrations WHERE version IN (15, 16, 17, 18, 19)",
        ],
    )
    .await;
    drop(store);
    let store = Store::open(storage, dir, key_in(dir)).await.unwrap();
    assert_eq!(
        listed(store.clone()).await,
        ["b666666", "b333", "b22", "b1"]
    );
    assert_eq!(by_request(store.clone(), "b22").await, ["three", "two"]);
    assert_eq!(by_request(store.clone(), "b333").await, ["three"]);
    assert_eq!(
        by_request(store.clone(), "b1").await,
        ["one", "three", "two"]
    );
    assert_eq!(
        events_by_request(store.clone(), "b22").await,
        ["denied-3", "login-2"]
    );
    assert_eq!(events_by_request(store.clone(), "b333").await, ["denied-3"]);
    assert_eq!(
        events_by_request(store.clone(), "b1").await,
        ["denied-3", "login-1", "login-2", "other"]
    );
    assert_eq!(many(store.clone()).await, (1_234, 2_345));
    let v = store.verify_audit(10).await.unwrap();
    assert_eq!(v.problem_count, 0, "the links found again: {v:?}");
    // 17: the old recording reads from its row.
    assert_eq!(store.recording_parts("old").await.unwrap(), Some(0));
    assert_eq!(
        store.recording_data("old").await.unwrap().unwrap(),
        b"whole in its row"
    );
    assert_eq!(store.list_recordings().await.unwrap(), [(old, 16)]);
}

#[test]
fn store_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(&Storage::Sqlite, dir.path(), key_in(dir.path()))
            .await
            .unwrap();
        exercise(&store).await;
        let keyed = tempfile::tempdir().unwrap();
        keyed_chain(&Storage::Sqlite, keyed.path()).await;
        let cut = tempfile::tempdir().unwrap();
        cut_tail(&Storage::Sqlite, cut.path()).await;
        let backfill = tempfile::tempdir().unwrap();
        migrations_from_14(&Storage::Sqlite, backfill.path()).await;
        statement_events(&store).await;
        change_feed(&store).await;
        cancel_keys(&store).await;
        recordings(&store).await;
        // Reopening runs no migration twice and keeps the data.
        drop(store);
        let again = Store::open(&Storage::Sqlite, dir.path(), key_in(dir.path()))
            .await
            .unwrap();
        assert!(again.get_user("alice").await.unwrap().is_some());
        // A schema newer than this wicketd knows: it refuses to run (an
        // older wicketd would write without the change feed).
        exec(
            &again,
            &["INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)"],
        )
        .await;
        drop(again);
        let err = Store::open(&Storage::Sqlite, dir.path(), key_in(dir.path()))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("schema is at version 999, newer than this wicketd knows"),
            "{err}"
        );
    });
}

#[test]
fn store_on_postgresql() {
    let pg = Postgres::builder().start().unwrap();
    pg.create_database("wicket").unwrap();
    let url = pg.url("wicket");
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        // Two stores opening at once: migrations serialize on the advisory lock.
        let storage = Storage::Postgres(url.clone());
        let (a, b) = tokio::join!(
            Store::open(&storage, dir.path(), key_in(dir.path())),
            Store::open(&storage, dir.path(), key_in(dir.path()))
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        exercise(&a).await;
        pg.create_database("keyed").unwrap();
        let keyed = tempfile::tempdir().unwrap();
        keyed_chain(&Storage::Postgres(pg.url("keyed")), keyed.path()).await;
        pg.create_database("cut").unwrap();
        let cut = tempfile::tempdir().unwrap();
        cut_tail(&Storage::Postgres(pg.url("cut")), cut.path()).await;
        pg.create_database("backfill").unwrap();
        let backfill = tempfile::tempdir().unwrap();
        migrations_from_14(&Storage::Postgres(pg.url("backfill")), backfill.path()).await;
        // A check that waits over 2 s for its key's lock (a flood) is
        // refused with a short retry, not left holding a connection.
        let mut tx = a.begin().await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(wicketd::store::login_lock("erin"))
            .execute(&mut *tx)
            .await
            .unwrap();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let waited = std::time::Instant::now();
        let r = b
            .reserve_login_attempt("erin", "10.2.0.1", now_ms, 0, (5, 5))
            .await
            .unwrap();
        assert!(
            matches!(
                r,
                Reservation::Refused {
                    oldest_failure_ms: None
                }
            ),
            "{r:?}"
        );
        assert!(waited.elapsed() < std::time::Duration::from_secs(10));
        tx.rollback().await.unwrap();
        assert!(matches!(
            b.reserve_login_attempt("erin", "10.2.0.1", now_ms, 0, (5, 5))
                .await
                .unwrap(),
            Reservation::Granted(_)
        ));
        statement_events(&b).await;
        change_feed(&b).await;
        cancel_keys(&a).await;
        recordings(&b).await;
    });
    // Each migration applied exactly once although two stores raced.
    let sql = "select count(*) = max(version) and count(*) >= 2 from schema_migrations";
    assert_eq!(pg.psql("wicket", sql).unwrap(), "t");
}

#[test]
fn two_wicketds_share_postgresql_state() {
    let pg = Postgres::builder().start().unwrap();
    pg.create_database("wicket").unwrap();
    let yaml = format!(
        "version: 1\nstorage: {}\nroles:\n  access:\n    logins: [\"{{{{user}}}}\"]\n    nodes: {{ env: dev }}\n",
        pg.url("wicket")
    );
    let d1 = Wicketd::builder().config(yaml.clone()).start().unwrap();
    // A second wicketd with its own CA key set would break the audit
    // chain (its key comes from the CA key set): it is refused, saying why.
    let Err(err) = Wicketd::builder().config(yaml.clone()).start() else {
        panic!("a wicketd with another CA key set started on the shared store");
    };
    assert!(
        format!("{err:#}").contains("every wicketd sharing a store needs the same CA key set"),
        "{err:#}"
    );
    // With a copy of the CA key set that lacks a CA a newer version adds
    // (copied before the first wicketd added it), a wicketd would make its
    // own: users would then trust one wicketd and not the other. Refused,
    // naming the CA, though the audit chain's key is the same.
    let dir = tempfile::Builder::new()
        .prefix("wicketd-")
        .tempdir()
        .unwrap();
    let ca = dir.path().join("data").join("ca");
    std::fs::create_dir(dir.path().join("data")).unwrap();
    wicket_e2e::harness_util::run(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(d1.data_dir().join("ca"))
            .arg(&ca),
    )
    .unwrap();
    for f in ["ssh_proxy_host_ca.key", "ssh_proxy_host_ca.pub"] {
        std::fs::remove_file(ca.join(f)).unwrap();
    }
    let Err(err) = Wicketd::builder().config(yaml.clone()).start_in(dir) else {
        panic!("a wicketd with its own proxy host CA started on the shared store");
    };
    assert!(
        format!("{err:#}").contains("this wicketd's ssh proxy host CA"),
        "{err:#}"
    );
    // With a copy of the CA key set, as deploy/README.md says.
    let d2 = d1.twin().unwrap();
    d1.add_user("alice", "access", "correct horse battery", false)
        .unwrap();
    let cli = WicketCli::new().unwrap();
    let out = cli
        .login(&d2, "alice", "correct horse battery", &[])
        .unwrap();
    assert!(
        out.ok,
        "user added through one wicketd logs in through the other: {}",
        out.stderr
    );
    let n = pg
        .psql(
            "wicket",
            "select count(*) from audit_events where kind = 'login_succeeded'",
        )
        .unwrap();
    assert_eq!(n, "1");

    // Two stores (as two wicketds) appending at once keep one audit chain.
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let storage = Storage::Postgres(pg.url("wicket"));
        // As wicketds sharing the store do, they share the CA key set (d1's).
        let key = || key_in(&d1.data_dir());
        let a = Store::open(&storage, dir.path(), key()).await.unwrap();
        let b = Store::open(&storage, dir.path(), key()).await.unwrap();
        let before = a.verify_audit(10).await.unwrap();
        assert!(before.problems.is_empty(), "{before:?}");
        let write = |s: Store, tag: &'static str| async move {
            for i in 0..20 {
                let batch: Vec<AuditRow> = (0..25)
                    .map(|j| event(&format!("{tag}-{i}-{j}"), "x", tag, i))
                    .collect();
                s.append_audit_batch(&batch).await.unwrap();
            }
        };
        // Verified while both write: what it reads is one moment's chain,
        // so appends committed meanwhile are no problem.
        let writing = std::sync::atomic::AtomicBool::new(true);
        let verifying = async {
            let mut runs = 0;
            while writing.load(std::sync::atomic::Ordering::Relaxed) || runs < 3 {
                let v = a.verify_audit(10).await.unwrap();
                assert!(v.problems.is_empty(), "while writing: {v:?}");
                runs += 1;
            }
            runs
        };
        let writers = async {
            tokio::join!(write(a.clone(), "a"), write(b, "b"));
            writing.store(false, std::sync::atomic::Ordering::Relaxed);
        };
        let ((), runs) = tokio::join!(writers, verifying);
        assert!(runs >= 3);
        let v = a.verify_audit(10).await.unwrap();
        assert!(v.problems.is_empty(), "{v:?}");
        assert_eq!(v.events, before.events + 1000);
    });
}

/// Roles for the service tests: `dev` may ask for `ops` (root on dev
/// nodes); what approves it follows.
const DEV_OPS: &str = "version: 1\nroles:\n  dev:\n    logins: [\"{{user}}\"]\n    nodes: { env: dev }\n    request: { roles: [ops] }\n  ops:\n    logins: [root]\n    nodes: { env: dev }\n";

/// `rev` reviews `ops`, and one of them approves it.
const REV_APPROVES: &str = "  rev:\n    review: { roles: [ops] }\napproval:\n  - roles: [ops]\n    require: { any_of: [\"role:rev\"] }\n";

/// A request for `ops`, an hour.
fn ask_ops() -> wicket_api::CreateRequest {
    wicket_api::CreateRequest {
        roles: vec!["ops".into()],
        reason: "deploy".into(),
        duration: Some("1h".into()),
        ..Default::default()
    }
}

/// A wicketd's service (no listeners) on the embedded default (SQLite in
/// `dir`), with users ann and ben (role `access`); and the time it started.
async fn wicket_with_ann_and_ben(
    dir: &std::path::Path,
) -> (
    wicketd::service::Wicket,
    Store,
    chrono::DateTime<chrono::Utc>,
) {
    let cfg = wicketd::config::Config::embedded_default(dir);
    wicket_with(
        dir,
        cfg,
        &[("ann", "access", None), ("ben", "access", None)],
    )
    .await
}

/// A wicketd's service (no listeners) where `rev` reviews the `ops` that
/// `dev` may request, and `extra` config: ann and ben (dev), rita (rev).
async fn ann_ben_and_rita(
    dir: &std::path::Path,
    extra: &str,
) -> (
    wicketd::service::Wicket,
    Store,
    chrono::DateTime<chrono::Utc>,
) {
    let yaml = format!("{DEV_OPS}{REV_APPROVES}{extra}");
    let cfg = wicketd::config::parse(&yaml, dir).unwrap();
    let users = [
        ("ann", "dev", None),
        ("ben", "dev", None),
        ("rita", "rev", None),
    ];
    wicket_with(dir, cfg, &users).await
}

/// A wicketd's service (no listeners) on `cfg` with its data in `dir`,
/// with `users` (name, role, team); and the time it started.
async fn wicket_with(
    dir: &std::path::Path,
    mut cfg: wicketd::config::Config,
    users: &[(&str, &str, Option<&str>)],
) -> (
    wicketd::service::Wicket,
    Store,
    chrono::DateTime<chrono::Utc>,
) {
    cfg.data_dir = dir.join("data");
    let now = wicketd::clock::now();
    let (keys, _, store) = wicketd::server::open_keys_and_store(&cfg).await.unwrap();
    let w = wicketd::service::Wicket::new(cfg, store.clone(), keys, Default::default()).unwrap();
    for (name, role, team) in users {
        let roles = vec![role.to_string()];
        let team = team.map(str::to_owned);
        wicketd::service::add_user(&w.config, &store, name, roles, team, None, false, now)
            .await
            .unwrap();
    }
    (w, store, now)
}

/// `session.recording_retention` here: a recording whose session ended
/// before the cut goes, with its audit event; a live session's stays (it
/// is still being written, whatever its header says), as do a recent one
/// and a file named after one session that holds another's header.
#[test]
fn expired_recordings_go_but_not_a_live_sessions() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let mut cfg = wicketd::config::Config::embedded_default(dir.path());
        cfg.session.recording_retention = Some(chrono::Duration::hours(1));
        let (w, store, now) = wicket_with(dir.path(), cfg, &[]).await;
        let live = w
            .sessions
            .register(wicketd::sessions::SessionInfo {
                protocol: "ssh",
                user: "ann".into(),
                resource: "node-1".into(),
                login: "ops".into(),
                request_ids: Vec::new(),
                started: now,
                valid_until: now.timestamp() + 3600,
                basis: None,
                held_standing: Vec::new(),
            })
            .unwrap();
        let recordings = w.config.data_dir.join("recordings");
        std::fs::create_dir_all(&recordings).unwrap();
        // A recording named `file`, whose header names `id`, of a session
        // that started at `started` and was last written a minute later.
        let write = |file: &str, id: &str, started: i64| {
            let header = serde_json::json!({
                "version": 2, "width": 80, "height": 24, "timestamp": started,
                "wicket": {"session_id": id, "user": "ann", "node": "node-1",
                           "login": "ops", "request_ids": ["r1"], "started": started},
            });
            let path = recordings.join(format!("{file}.cast"));
            std::fs::write(&path, format!("{header}\n[0.5, \"o\", \"hi\"]\n")).unwrap();
            let written = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(u64::try_from(started + 60).unwrap());
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(written)
                .unwrap();
            path
        };
        let two_hours_ago = now.timestamp() - 7200;
        let old = write("0000000a-0000", "0000000a-0000", two_hours_ago);
        let live_one = write(&live.id, &live.id, two_hours_ago);
        let recent = write("0000000b-0000", "0000000b-0000", now.timestamp() - 120);
        let misnamed = write("0000000c-0000", "0000000d-0000", two_hours_ago);
        w.expire_recordings(now).await;
        assert!(!old.exists());
        assert!(live_one.exists(), "a live session's recording was deleted");
        assert!(recent.exists());
        assert!(misnamed.exists());
        let events = store
            .search_audit(&AuditFilter {
                kind: Some("recording_deleted".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].session_id.as_deref(), Some("0000000a-0000"));
        assert_eq!(events[0].actor.as_deref(), Some("wicketd"));
        let data: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
        assert_eq!(data["from"], "data_dir", "{data}");
        assert_eq!(data["kept_for"], "1h", "{data}");
        assert_eq!(data["user"], "ann", "{data}");
        // Once the session ends, the next sweep takes its recording.
        drop(live);
        w.expire_recordings(now).await;
        assert!(!live_one.exists());
    });
}

/// A caller with a live login, as a certificate of `user`'s speaks for.
fn caller_of(user: &str, login_until: i64) -> wicketd::service::Caller {
    wicketd::service::Caller {
        user: user.into(),
        request_ids: Vec::new(),
        source: std::net::IpAddr::from([127, 0, 0, 1]),
        login_until,
        valid_until: login_until,
    }
}

/// The team lead a `team_lead` rule asks for is the lead of the team the
/// user record names (`wicketd users add --team`), not of a team the
/// config still lists the user in.
#[test]
fn a_team_lead_is_the_lead_of_the_users_recorded_team() {
    use wicket_api::{CreateRequest, ReviewBody};
    let dir = tempfile::tempdir().unwrap();
    let yaml = "version: 1\nteams:\n  payments: { lead: bob, members: [ ann ] }\n  search: { lead: sam, members: [ sam ] }\nroles:\n  dev:\n    logins: [\"{{user}}\"]\n    nodes: { env: dev }\n    request: { roles: [ops] }\n  ops:\n    logins: [root]\n    nodes: { env: dev }\napproval:\n  - roles: [ops]\n    require: { any_of: [ team_lead ] }\n";
    rt().block_on(async {
        let cfg = wicketd::config::parse(yaml, dir.path()).unwrap();
        let users = [
            ("ann", "dev", Some("search")),
            ("bob", "dev", Some("payments")),
            ("sam", "dev", Some("search")),
        ];
        let (w, _store, now) = wicket_with(dir.path(), cfg, &users).await;
        let live = now.timestamp() + 3600;
        let ask = CreateRequest {
            roles: vec!["ops".into()],
            reason: "deploy".into(),
            ..Default::default()
        };
        let grant = w
            .create_request(&caller_of("ann", live), ask, now)
            .await
            .unwrap();
        let review = || ReviewBody {
            verdict: "approve".into(),
            reason: "ok".into(),
            ..Default::default()
        };
        let err = w
            .review_request(&caller_of("bob", live), &grant.id, review(), now)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        let approved = w
            .review_request(&caller_of("sam", live), &grant.id, review(), now)
            .await
            .unwrap();
        assert_eq!(approved.status, "active", "{approved:?}");
    });
}

/// A reviewer disabled, or their roles changed, after this wicketd last
/// read them (its index is up to a second old; another wicketd or
/// `wicketd users` made the change): their approval is not written.
#[test]
fn a_review_by_a_user_changed_since_they_were_read_is_not_written() {
    use wicket_api::ReviewBody;
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, store, now) = ann_ben_and_rita(dir.path(), "").await;
        let live = now.timestamp() + 3600;
        w.refresh_index(now).await.unwrap();
        let review = || ReviewBody {
            verdict: "approve".into(),
            reason: "ok".into(),
            ..Default::default()
        };
        for change in [
            "UPDATE users SET disabled = 1 WHERE name = 'rita'",
            "UPDATE users SET roles = '[\"dev\"]' WHERE name = 'rita'",
        ] {
            let grant = w
                .create_request(&caller_of("ann", live), ask_ops(), now)
                .await
                .unwrap();
            // Fresh now, so that this wicketd decides on its index.
            w.refresh_index(wicketd::clock::now()).await.unwrap();
            assert!(w.index.read().user("rita", now).is_some());
            exec(&store, &[change]).await;
            // Not read yet: this wicketd still sees rita as she was.
            assert!(w.index.read().user("rita", now).is_some());
            let err = w
                .review_request(&caller_of("rita", live), &grant.id, review(), now)
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("rita's account changed"),
                "{change}: {err}"
            );
            // Trying again decides on what changed (the index read it).
            let again = w
                .review_request(&caller_of("rita", live), &grant.id, review(), now)
                .await
                .unwrap_err();
            assert!(
                !again.to_string().contains("account changed"),
                "{change}: {again}"
            );
            let shown = w
                .show_request(&caller_of("ann", live), &grant.id, now)
                .await
                .unwrap();
            assert_eq!(shown.status, "pending", "{change}: {shown:?}");
            exec(
                &store,
                &["UPDATE users SET disabled = 0, roles = '[\"rev\"]' WHERE name = 'rita'"],
            )
            .await;
            w.refresh_index(now).await.unwrap();
        }
    });
}

/// The same for a new request (and break-glass, which is made the same
/// way): the requester's record as the decision read it must still be so
/// when the request is written; when it is not, the request is decided
/// again on the record as it is (so a break-glass code is not spent on a
/// conflict).
#[test]
fn a_request_by_a_user_changed_since_they_were_read_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, store, now) = ann_ben_and_rita(dir.path(), "").await;
        let live = now.timestamp() + 3600;
        for (change, refused) in [
            (
                "UPDATE users SET disabled = 1 WHERE name = 'ann'",
                "no longer exists or is disabled",
            ),
            (
                "UPDATE users SET roles = '[\"rev\"]' WHERE name = 'ann'",
                "may not request role ops",
            ),
        ] {
            // Fresh now, so that this wicketd decides on its index.
            w.refresh_index(wicketd::clock::now()).await.unwrap();
            assert!(w.index.read().user("ann", now).is_some());
            exec(&store, &[change]).await;
            // Not read yet: this wicketd still sees ann as she was.
            assert!(w.index.read().user("ann", now).is_some());
            let err = w
                .create_request(&caller_of("ann", live), ask_ops(), now)
                .await
                .unwrap_err();
            assert!(err.to_string().contains(refused), "{change}: {err}");
            assert_eq!(store.count_awaiting_review("ann").await.unwrap(), 0);
            exec(
                &store,
                &["UPDATE users SET disabled = 0, roles = '[\"dev\"]' WHERE name = 'ann'"],
            )
            .await;
        }
        // Unchanged, it is written.
        w.refresh_index(wicketd::clock::now()).await.unwrap();
        w.create_request(&caller_of("ann", live), ask_ops(), now)
            .await
            .unwrap();
        assert_eq!(store.count_awaiting_review("ann").await.unwrap(), 1);
    });
}

/// Two processes on one SQLite store (wicketd and `wicketd users add`,
/// say): a transaction that reads and then writes waits for the other's
/// write rather than failing with "database is locked" (a deferred one
/// failed at once with SQLITE_BUSY_SNAPSHOT, which no busy timeout waits
/// out, whenever the other wrote in between).
#[test]
fn a_transaction_that_reads_then_writes_outlasts_another_process_writing() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, a, now) = wicket_with_ann_and_ben(dir.path()).await;
        let (_, _, b) = wicketd::server::open_keys_and_store(&w.config)
            .await
            .unwrap();
        let mut tx = a.begin().await.unwrap();
        let row = sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(sqlx::Row::get::<i64, _>(&row, 0), 2);
        // The other process writes now, if it may.
        let other = wicketd::service::add_user(
            &w.config,
            &b,
            "cid",
            vec!["access".into()],
            None,
            None,
            false,
            now,
        );
        tokio::pin!(other);
        let early = tokio::time::timeout(std::time::Duration::from_millis(500), &mut other).await;
        sqlx::query("UPDATE users SET team = team WHERE name = 'ann'")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        match early {
            Ok(r) => r,
            Err(_) => other.await,
        }
        .unwrap();
        assert!(a.get_user("cid").await.unwrap().is_some());
    });
}

/// ann's grant of `ops` for 10 minutes, approved by sam, and the decision
/// of a session on it (the policy allows it). The grace is longer than the
/// grant.
async fn a_decided_session_on_a_grant(
    dir: &std::path::Path,
) -> (
    wicketd::service::Wicket,
    Store,
    chrono::DateTime<chrono::Utc>,
    wicket_api::Grant,
    wicketd::service::SessionDecision,
) {
    use wicket_api::{CreateRequest, ReviewBody};
    let yaml = "version: 1\nsession: { unverified_grace: 1h }\nteams:\n  search: { lead: sam, members: [ ann, sam ] }\nroles:\n  dev:\n    logins: [\"{{user}}\"]\n    nodes: { env: dev }\n    request: { roles: [ops] }\n  ops:\n    logins: [root]\n    nodes: { env: dev }\napproval:\n  - roles: [ops]\n    require: { any_of: [ team_lead ] }\n";
    let cfg = wicketd::config::parse(yaml, dir).unwrap();
    let users = [
        ("ann", "dev", Some("search")),
        ("sam", "dev", Some("search")),
    ];
    let (w, store, now) = wicket_with(dir, cfg, &users).await;
    let live = now.timestamp() + 3600;
    let ask = CreateRequest {
        roles: vec!["ops".into()],
        reason: "deploy".into(),
        duration: Some("10m".into()),
        ..Default::default()
    };
    let grant = w
        .create_request(&caller_of("ann", live), ask, now)
        .await
        .unwrap();
    let review = ReviewBody {
        verdict: "approve".into(),
        reason: "ok".into(),
        ..Default::default()
    };
    let grant = w
        .review_request(&caller_of("sam", live), &grant.id, review, now)
        .await
        .unwrap();
    assert_eq!(grant.status, "active", "{grant:?}");
    let caller = wicketd::service::Caller {
        request_ids: vec![grant.id.clone()],
        ..caller_of("ann", live)
    };
    let decided = w
        .decide_session(&caller, now, |_, _| wicket_policy::Decision::allow("ok"))
        .await
        .unwrap();
    assert_eq!(decided.request_ids, std::slice::from_ref(&grant.id));
    (w, store, now, grant, decided)
}

/// Registers a session on `decided` ([`wicketd::service::Wicket::open_session`]).
fn open_decided(
    w: &wicketd::service::Wicket,
    decided: &wicketd::service::SessionDecision,
    now: chrono::DateTime<chrono::Utc>,
    end: i64,
) -> wicketd::sessions::SessionHandle {
    let info = wicketd::sessions::SessionInfo {
        protocol: "ssh",
        user: "ann".into(),
        resource: "node".into(),
        login: "root".into(),
        request_ids: decided.request_ids.clone(),
        started: now,
        valid_until: end,
        basis: decided.basis.clone(),
        held_standing: vec![],
    };
    w.open_session(info, &decided.requests).unwrap()
}

/// Makes every later read of grants and users fail.
async fn break_grant_reads(store: &Store) {
    exec(
        store,
        &[
            "ALTER TABLE access_requests RENAME TO gone_requests",
            "ALTER TABLE users RENAME TO gone_users",
        ],
    )
    .await;
}

/// A session's grant is known from the decision it opened on: a store
/// that fails before the watcher's first read of it still ends the session
/// at the grant's end (not only after `session.unverified_grace`).
#[test]
fn a_session_ends_at_its_grants_end_before_the_watcher_ever_read_it() {
    use wicketd::sessions::Signal;
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, store, now, grant, decided) = a_decided_session_on_a_grant(dir.path()).await;
        let end = grant.expires_at.unwrap();
        let session = open_decided(&w, &decided, now, end.timestamp());
        // The store fails before the watcher's first round (its reads of
        // grants and users fail from now on), so what the decision read is
        // all there is.
        break_grant_reads(&store).await;
        assert_eq!(w.refresh_sessions(now).await, 0);
        let before = end - chrono::Duration::seconds(1);
        assert_eq!(w.enforce_sessions(before), 0);
        assert!(
            matches!(&*session.signal.borrow(), Signal::Warn(w) if w.contains("this session will be closed then")),
            "warned, not ended: {:?}",
            *session.signal.borrow()
        );
        assert_eq!(w.enforce_sessions(end), 1);
        let why = match &*session.signal.borrow() {
            Signal::End(why) => why.clone(),
            other => panic!("{other:?}"),
        };
        assert!(
            why.contains(&format!("access request {} expired", grant.id)),
            "{why}"
        );
    });
}

/// A grant ended on this wicketd between a session's decision and its
/// registration: the decision's older read does not outlive it. The
/// session ends at once, though the store fails before the watcher reads
/// the grant again.
#[test]
fn a_grant_ended_between_a_sessions_decision_and_its_start_ends_it_without_the_store() {
    use wicketd::sessions::Signal;
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, store, now, grant, decided) = a_decided_session_on_a_grant(dir.path()).await;
        let live = now.timestamp() + 3600;
        let dropped = w
            .request_action(
                &caller_of("ann", live),
                &grant.id,
                "drop",
                wicket_api::ActionBody::default(),
                now,
            )
            .await
            .unwrap();
        assert_eq!(dropped.status, "expired", "{dropped:?}");
        // A watcher's round between the drop and the registration: no live
        // session names the grant yet, and what this wicketd ended is kept.
        assert_eq!(w.refresh_sessions(now).await, 0);
        let session = open_decided(&w, &decided, now, grant.expires_at.unwrap().timestamp());
        break_grant_reads(&store).await;
        assert_eq!(w.refresh_sessions(now).await, 0);
        assert_eq!(w.enforce_sessions(now), 1);
        let why = match &*session.signal.borrow() {
            Signal::End(why) => why.clone(),
            other => panic!("still {other:?}"),
        };
        assert!(why.contains(&grant.id), "{why}");
    });
}

/// The grant index of one wicketd follows changes another process makes
/// (as `wicketd users disable` does), and starts over from the whole store
/// when the feed is behind what it saw (a database restored from a backup).
#[test]
fn the_grant_index_follows_the_feed_and_starts_over_when_it_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, store, now) = wicket_with_ann_and_ben(dir.path()).await;
        assert!(w.index.read().user("ann", now).is_none(), "never read");
        w.refresh_index(now).await.unwrap();
        assert!(w.index.read().user("ann", now).is_some());
        assert!(w.index.read().user("ben", now).is_some());
        store
            .set_user_disabled("ben", true, &event("ben-off", "user_disabled", "ben", 1))
            .await
            .unwrap();
        assert!(w.index.read().user("ben", now).is_some(), "not read yet");
        assert_eq!(w.refresh_index(now).await.unwrap(), 1);
        assert!(w.index.read().user("ben", now).is_none());
        // A restored database: the counter is behind the index, and ann
        // was disabled in it at a number the index has already passed.
        // (The store's trigger stamps the hand-made change; the stamp is
        // then set back with the counter.)
        exec(
            &store,
            &[
                "UPDATE users SET disabled = 1 WHERE name = 'ann'",
                "UPDATE users SET change_seq = 1 WHERE name = 'ann'",
                "UPDATE change_feed SET seq = 1",
            ],
        )
        .await;
        w.refresh_index(now).await.unwrap();
        assert!(w.index.read().user("ann", now).is_none());
        assert_eq!(w.index.read().seen(), Some(1));
    });
}

/// A user row that does not decode makes only that user's sessions
/// unverified (they end after `session.unverified_grace`); the others' users
/// are still re-read and their sessions go on.
#[test]
fn a_corrupt_user_row_leaves_other_users_sessions_alone() {
    use wicketd::sessions::{SessionInfo, Signal};
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, store, now) = wicket_with_ann_and_ben(dir.path()).await;
        let grace = w.config.session.unverified_grace;
        let session = |user: &str| {
            w.sessions
                .register(SessionInfo {
                    protocol: "ssh",
                    user: user.into(),
                    resource: "node".into(),
                    login: user.into(),
                    request_ids: vec![],
                    started: now,
                    valid_until: i64::MAX,
                    basis: None,
                    held_standing: vec![],
                })
                .unwrap()
        };
        let (ann, ben) = (session("ann"), session("ben"));
        exec(
            &store,
            &["UPDATE users SET roles = 'not a list' WHERE name = 'ann'"],
        )
        .await;
        assert_eq!(w.watch_sessions(now).await, 0, "within the grace");
        let later = now + grace;
        assert_eq!(w.refresh_sessions(later).await, 0);
        assert_eq!(w.enforce_sessions(later), 1, "ann's session only");
        assert!(
            matches!(&*ann.signal.borrow(), Signal::End(why) if why.contains("user \"ann\"")),
            "{:?}",
            *ann.signal.borrow()
        );
        assert!(matches!(*ben.signal.borrow(), Signal::Run));
        // `users set-roles` repairs such a row; the old value is on the
        // record as it was.
        wicketd::service::set_user_roles(&w.config, &store, "ann", vec!["access".into()], later)
            .await
            .unwrap();
        let ann_now = store.get_user("ann").await.unwrap().unwrap();
        assert_eq!(ann_now.roles, ["access"]);
        let set = store
            .search_audit(&wicketd::store::AuditFilter {
                kind: Some("user_roles_set".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            set.len() == 1 && set[0].data.contains("<undecodable: not a list>"),
            "{set:?}"
        );
    });
}

/// A grant's certificate outlives the password login it was asked under,
/// but asking for more through it does not: extending a grant or answering
/// for a request needs a live login, as asking did; ending access (drop)
/// does not.
#[test]
fn extending_a_grant_needs_a_live_login_and_dropping_it_does_not() {
    use wicket_api::ActionBody;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("{DEV_OPS}approval:\n  - roles: [ops]\n    require: self\n");
    rt().block_on(async {
        let cfg = wicketd::config::parse(&yaml, dir.path()).unwrap();
        let (w, store, now) = wicket_with(dir.path(), cfg, &[("ann", "dev", None)]).await;
        let caller = |login_until: i64| caller_of("ann", login_until);
        let live = caller(now.timestamp() + 3600);
        let ask = ask_ops();
        let grant = w.create_request(&live, ask, now).await.unwrap();
        assert_eq!(grant.status, "active", "{grant:?}");
        let ended = caller(now.timestamp() - 1);
        for (action, body) in [
            (
                "extend",
                ActionBody {
                    duration: Some("30m".into()),
                    ..Default::default()
                },
            ),
            (
                "update",
                ActionBody {
                    reason: "more".into(),
                    ..Default::default()
                },
            ),
        ] {
            let err = w
                .request_action(&ended, &grant.id, action, body, now)
                .await
                .unwrap_err();
            assert!(
                matches!(&err, wicketd::error::Error::Unauthenticated(m) if m.contains("the login behind this certificate ended")),
                "{action}: {err:?}"
            );
        }
        // Each refusal is on the record, with the action and why.
        let denied = store
            .search_audit(&wicketd::store::AuditFilter {
                kind: Some("access_denied".into()),
                actor: Some("ann".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        for action in ["request.extend", "request.update"] {
            assert!(
                denied.iter().any(|e| e.data.contains(&format!("\"action\":\"{action}\""))
                    && e.data.contains("the login behind this certificate ended")),
                "{action} not audited: {denied:?}"
            );
        }
        let dropped = w
            .request_action(&ended, &grant.id, "drop", ActionBody::default(), now)
            .await
            .unwrap();
        assert_eq!(dropped.status, "expired", "{dropped:?}");
    });
}

/// Reviewers' listing reads the requests awaiting a review, so a flood of
/// newer ones in other states (created and cancelled) does not push an
/// open request out of it; and one user may have only so many awaiting a
/// review at once, also when they ask concurrently.
#[test]
fn a_flood_of_requests_neither_hides_open_ones_nor_grows_the_queue() {
    use wicket_api::ActionBody;
    use wicketd::error::Error;
    use wicketd::requests::Listing;
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, store, now) =
            ann_ben_and_rita(dir.path(), "requests: { max_pending_per_user: 3 }\n").await;
        let until = now.timestamp() + 3600;
        let (ann, ben, rita) = (
            caller_of("ann", until),
            caller_of("ben", until),
            caller_of("rita", until),
        );
        let ask = ask_ops();
        let cancel = |c, id: String, at| {
            let w = &w;
            async move {
                w.request_action(c, &id, "cancel", ActionBody::default(), at)
                    .await
                    .unwrap()
            }
        };
        let open = w.create_request(&ann, ask.clone(), now).await.unwrap();
        // More newer requests than a listing shows, all closed.
        for i in 1..=501 {
            let later = now + chrono::Duration::milliseconds(i);
            let r = w.create_request(&ben, ask.clone(), later).await.unwrap();
            cancel(&ben, r.id, later).await;
        }
        let reviewable = w
            .list_requests(&rita, Listing::Reviewable, None, now)
            .await
            .unwrap();
        let ids: Vec<&str> = reviewable.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(ids, [open.id.as_str()]);

        // The cap: three awaiting review, then a clear refusal; a cancel
        // makes room.
        let second = w.create_request(&ann, ask.clone(), now).await.unwrap();
        w.create_request(&ann, ask.clone(), now).await.unwrap();
        let err = w.create_request(&ann, ask.clone(), now).await.unwrap_err();
        assert!(
            matches!(&err, Error::Conflict(m) if m.contains("you have 3 requests awaiting review")
                && m.contains("requests.max_pending_per_user: 3")),
            "{err:?}"
        );
        cancel(&ann, second.id, now).await;
        w.create_request(&ann, ask.clone(), now).await.unwrap();
        assert_eq!(store.count_awaiting_review("ann").await.unwrap(), 3);

        // Asked concurrently: each creation counts before any is stored,
        // yet no more than three are stored; the rest are refused.
        let c = || w.create_request(&ben, ask.clone(), now);
        let (r1, r2, r3, r4, r5, r6) = tokio::join!(c(), c(), c(), c(), c(), c());
        let results = [r1, r2, r3, r4, r5, r6];
        let stored = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(stored, 3, "{results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(matches!(r, Error::Conflict(_)), "{r:?}");
        }
        assert_eq!(store.count_awaiting_review("ben").await.unwrap(), 3);
    });
}

/// A refusal over the cap is on the record, as every policy refusal is; a
/// user refused in a loop gets a burst of events a minute for that action
/// (the log does not grow at the caller's will), their refusals of another
/// action are recorded all the same, and once the minute is over one event
/// says how many were folded.
#[test]
fn a_users_refusals_past_a_burst_are_folded_and_counted_on_the_record() {
    use wicketd::auth::DenialLog;
    use wicketd::error::Error;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("{DEV_OPS}{REV_APPROVES}requests: {{ max_pending_per_user: 1 }}\n");
    rt().block_on(async {
        let cfg = wicketd::config::parse(&yaml, dir.path()).unwrap();
        let (w, store, now) = wicket_with(
            dir.path(),
            cfg,
            &[("ann", "dev", None), ("ben", "dev", None)],
        )
        .await;
        let until = now.timestamp() + 3600;
        let (ann, ben) = (caller_of("ann", until), caller_of("ben", until));
        w.create_request(&ann, ask_ops(), now).await.unwrap();
        let over = DenialLog::BURST + 5;
        for i in 0..over {
            let at = now + chrono::Duration::milliseconds(i.into());
            let err = w.create_request(&ann, ask_ops(), at).await.unwrap_err();
            assert!(
                matches!(&err, Error::Conflict(m) if m.contains("awaiting review")),
                "{err:?}"
            );
        }
        let denied = |actor: &str| {
            let filter = wicketd::store::AuditFilter {
                kind: Some("access_denied".into()),
                actor: Some(actor.into()),
                ..Default::default()
            };
            let store = store.clone();
            async move { store.search_audit(&filter).await.unwrap() }
        };
        let events = denied("ann").await;
        assert_eq!(events.len(), DenialLog::BURST as usize, "{events:?}");
        assert!(
            events
                .iter()
                .all(|e| e.data.contains("\"action\":\"request.create\"")
                    && e.data.contains("requests.max_pending_per_user: 1")
                    && e.data.contains("\"unrecorded_before\":0")),
            "{events:?}"
        );
        // Someone else's refusals are theirs: on the record.
        let bens = w.create_request(&ben, ask_ops(), now).await.unwrap();
        w.create_request(&ben, ask_ops(), now).await.unwrap_err();
        assert_eq!(denied("ben").await.len(), 1);
        // Her refusals of another action are not hidden by the flood.
        let cancel = wicket_api::ActionBody::default();
        let err = w
            .request_action(&ann, &bens.id, "cancel", cancel, now)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
        let events = denied("ann").await;
        assert_eq!(events.len(), DenialLog::BURST as usize + 1);
        assert!(
            events
                .iter()
                .any(|e| e.data.contains("\"action\":\"request.cancel\"")),
            "{events:?}"
        );
        // Within the minute nothing more is written; once it is over, one
        // event counts the five folded, whether or not she tries again.
        w.write_folded_denials(now + chrono::Duration::seconds(30), false)
            .await;
        assert_eq!(denied("ann").await.len(), DenialLog::BURST as usize + 1);
        let later = now + DenialLog::WINDOW;
        w.write_folded_denials(later, false).await;
        let events = denied("ann").await;
        assert_eq!(events.len(), DenialLog::BURST as usize + 2);
        let folded = &events.last().unwrap().data;
        assert!(
            folded.contains("\"action\":\"request.create\"")
                && folded.contains("\"unrecorded_before\":5")
                && folded.contains("refused 5 more time(s)"),
            "{folded}"
        );
        // Counted once: her next refusal carries nothing more.
        w.create_request(&ann, ask_ops(), later).await.unwrap_err();
        let events = denied("ann").await;
        assert_eq!(events.len(), DenialLog::BURST as usize + 3);
        assert!(events
            .last()
            .unwrap()
            .data
            .contains("\"unrecorded_before\":0"));
    });
}

/// The request timers: one due by a deadline stored under other settings,
/// with nothing due now, gets its deadline worked out again; one whose
/// document does not decode is put off, not tried at every tick; neither
/// holds up the others.
#[test]
fn due_timers_that_do_nothing_or_fail_do_not_come_back_every_tick() {
    let dir = tempfile::tempdir().unwrap();
    let yaml =
        format!("{DEV_OPS}{REV_APPROVES}requests: {{ pending_ttl: 1h, escalate_after: 30m }}\n");
    rt().block_on(async {
        let cfg = wicketd::config::parse(&yaml, dir.path()).unwrap();
        let (w, store, now) = wicket_with(dir.path(), cfg, &[("ann", "dev", None)]).await;
        let ann = caller_of("ann", now.timestamp() + 3600);
        let ask = ask_ops();
        let stale = w.create_request(&ann, ask.clone(), now).await.unwrap();
        let expiring = w.create_request(&ann, ask, now).await.unwrap();
        let deadline = |id: String| {
            let store = store.clone();
            async move {
                let sql = format!("SELECT next_deadline FROM access_requests WHERE id = '{id}'");
                count(&store, &sql).await
            }
        };
        let escalates = deadline(stale.id.clone()).await;
        assert_eq!(escalates, (now + chrono::Duration::minutes(30)).timestamp_millis());
        // A deadline from before (a shorter escalate_after then), and a
        // request that does not decode, both due long ago.
        let past = now.timestamp_millis() - 60_000;
        exec(
            &store,
            &[
                &format!("UPDATE access_requests SET next_deadline = {past} WHERE id = '{}'", stale.id),
                &format!(
                    "INSERT INTO access_requests (id, requester, state, next_deadline, created_at, updated_at, version, doc) \
                     VALUES ('corrupt', 'ann', 'pending', {}, 1, 1, 1, '{{not json')",
                    past - 1
                ),
            ],
        )
        .await;
        // Nothing due for the stale one: its deadline is set right again.
        let changed = w.tick_due(now).await.unwrap();
        assert_eq!(changed, 0);
        assert_eq!(deadline(stale.id.clone()).await, escalates);
        let put_off = deadline("corrupt".into()).await;
        assert_eq!(put_off, now.timestamp_millis() + 30_000);
        assert_eq!(store.due_requests(now.timestamp_millis(), 500).await.unwrap(), Vec::<String>::new());
        // The other's timer still runs at its time: past the pending TTL
        // (and the corrupt one's new deadline), it expires.
        let later = now + chrono::Duration::hours(1) + chrono::Duration::seconds(1);
        w.tick_due(later).await.unwrap();
        let shown = w.show_request(&ann, &expiring.id, later).await.unwrap();
        assert_eq!(shown.status, "expired", "{shown:?}");
        assert_eq!(
            deadline("corrupt".into()).await,
            later.timestamp_millis() + 30_000
        );
    });
}

/// A listing shows the caller's requests however many newer ones they may
/// not see lie above them: it reads on past the rows it leaves out. Before,
/// it read the newest 500 rows and then kept the caller's: ann's own
/// request, and the one a reviewer was asked to review, were gone from
/// their lists.
#[test]
fn a_listing_reads_past_newer_requests_the_caller_may_not_see() {
    use wicketd::requests::Listing;
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, store, now) = ann_ben_and_rita(dir.path(), "").await;
        let live = now.timestamp() + 3600;
        let ann = caller_of("ann", live);
        let rita = caller_of("rita", live);
        let anns = w.create_request(&ann, ask_ops(), now).await.unwrap();
        let bens = w
            .create_request(&caller_of("ben", live), ask_ops(), now)
            .await
            .unwrap();
        w.request_action(
            &caller_of("ben", live),
            &bens.id,
            "cancel",
            wicket_api::ActionBody::default(),
            now,
        )
        .await
        .unwrap();
        // 600 newer requests of ben's, ended yet marked as awaiting a
        // review (as unacknowledged break-glass grants stay): in every
        // listing's first rows, and in nobody's list but ben's.
        let (row, _) = store.get_request(&bens.id).await.unwrap().unwrap();
        for i in 0..600 {
            let id = format!("{}-{i:03}", bens.id);
            let mut doc: serde_json::Value = serde_json::from_str(&row.doc).unwrap();
            doc["id"] = id.clone().into();
            let copy = wicketd::store::StoredRequest {
                id,
                created_at: row.created_at + 1 + i,
                doc: doc.to_string(),
                awaiting_review: true,
                ..row.clone()
            };
            store.insert_request(&copy, &[], &[]).await.unwrap();
        }
        let ids =
            |listed: Vec<wicket_api::Grant>| listed.into_iter().map(|g| g.id).collect::<Vec<_>>();
        let all = w
            .list_requests(&ann, Listing::All, None, now)
            .await
            .unwrap();
        assert_eq!(ids(all), [anns.id.as_str()]);
        let queue = w
            .list_requests(&rita, Listing::Reviewable, None, now)
            .await
            .unwrap();
        assert_eq!(ids(queue), [anns.id.as_str()]);
        // ben's list: the newest 500 of his 601, newest first.
        let bens_list = w
            .list_requests(&caller_of("ben", live), Listing::Mine, None, now)
            .await
            .unwrap();
        let bens_ids = ids(bens_list);
        assert_eq!(bens_ids.len(), 500);
        assert_eq!(bens_ids[0], format!("{}-599", bens.id));
        assert_eq!(bens_ids[499], format!("{}-100", bens.id));
        // What ann may not see is not found for her, and on the record.
        let e = w.show_request(&ann, &bens.id, now).await.unwrap_err();
        assert!(matches!(e, wicketd::error::Error::NotFound(_)), "{e:?}");
        let denied = store
            .search_audit(&AuditFilter {
                kind: Some("access_denied".into()),
                actor: Some("ann".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            denied
                .iter()
                .any(|e| e.data.contains("\"action\":\"request.show\"")
                    && e.data.contains("ann is not the requester, a reviewer")),
            "{denied:?}"
        );
    });
}

/// Standing roles count on the API only while the login behind the
/// certificate lasts, as they do for sessions. An auditor's grant
/// certificate that outlives their login reads no one else's audit events,
/// recordings or notifications, and sees or revokes no one else's request
/// by a standing role: each refusal says why.
#[test]
fn standing_roles_end_with_the_login_on_the_api_too() {
    use wicket_api::ActionBody;
    use wicketd::requests::Listing;
    use wicketd::store::AuditFilter;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("{DEV_OPS}  auditor:\n    audit: true\n    revoke: true\n    request: {{ roles: [ops] }}\napproval:\n  - roles: [ops]\n    require: self\n");
    rt().block_on(async {
        let cfg = wicketd::config::parse(&yaml, dir.path()).unwrap();
        let (w, store, now) = wicket_with(
            dir.path(),
            cfg,
            &[("ann", "dev", None), ("aud", "auditor", None)],
        )
        .await;
        let ask = ask_ops();
        let live_ann = caller_of("ann", now.timestamp() + 3600);
        let anns = w.create_request(&live_ann, ask.clone(), now).await.unwrap();
        // The auditor holds a grant certificate: it outlives the login.
        let live = caller_of("aud", now.timestamp() + 3600);
        let own = w.create_request(&live, ask, now).await.unwrap();
        let mut ended = caller_of("aud", now.timestamp() - 1);
        ended.request_ids = vec![own.id.clone()];
        ended.valid_until = now.timestamp() + 3600;
        let anns_events = || AuditFilter {
            actor: Some("ann".into()),
            ..Default::default()
        };

        // While the login lasts, the standing role reads and sees it all.
        assert!(!w
            .search_audit(&live, anns_events())
            .await
            .unwrap()
            .is_empty());
        w.verify_audit(&live).await.unwrap();
        w.notifications(&live, None, None).await.unwrap();
        w.list_recordings(&live, None, Some("ann".into()))
            .await
            .unwrap();
        w.show_request(&live, &anns.id, now).await.unwrap();
        let all = w
            .list_requests(&live, Listing::All, None, now)
            .await
            .unwrap();
        assert!(all.iter().any(|g| g.id == anns.id), "{all:?}");

        // Once it has ended: refused, and told why.
        let why = "standing roles ended with the login behind this certificate";
        let refused = |e: wicketd::error::Error| {
            assert!(
                matches!(&e, wicketd::error::Error::Forbidden(m) if m.contains(why)),
                "{e:?}"
            );
        };
        refused(w.search_audit(&ended, anns_events()).await.unwrap_err());
        refused(w.verify_audit(&ended).await.unwrap_err());
        refused(w.notifications(&ended, None, None).await.unwrap_err());
        refused(
            w.list_recordings(&ended, None, Some("ann".into()))
                .await
                .unwrap_err(),
        );
        // Someone else's request is not there for them, nor to revoke.
        let e = w.show_request(&ended, &anns.id, now).await.unwrap_err();
        assert!(matches!(e, wicketd::error::Error::NotFound(_)), "{e:?}");
        let all = w
            .list_requests(&ended, Listing::All, None, now)
            .await
            .unwrap();
        assert!(
            all.iter().all(|g| g.id != anns.id) && all.iter().any(|g| g.id == own.id),
            "{all:?}"
        );
        let revoke = ActionBody {
            reason: "suspicious".into(),
            ..Default::default()
        };
        w.request_action(&ended, &anns.id, "revoke", revoke.clone(), now)
            .await
            .unwrap_err();
        assert_eq!(
            w.show_request(&live_ann, &anns.id, now)
                .await
                .unwrap()
                .status,
            "active"
        );
        // Their own events they still read, and their own grant they end.
        let mine = AuditFilter {
            actor: Some("aud".into()),
            ..Default::default()
        };
        assert!(!w.search_audit(&ended, mine).await.unwrap().is_empty());
        w.request_action(&ended, &own.id, "drop", ActionBody::default(), now)
            .await
            .unwrap();
        // Each refusal is on the record with the reason.
        let denied = store
            .search_audit(&AuditFilter {
                kind: Some("access_denied".into()),
                actor: Some("aud".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        for action in [
            "audit.search",
            "audit.verify",
            "notifications.read",
            "recordings.read",
            "request.revoke",
            "request.show",
        ] {
            assert!(
                denied
                    .iter()
                    .any(|e| e.data.contains(&format!("\"action\":\"{action}\""))
                        && e.data.contains(why)),
                "{action} not audited: {denied:?}"
            );
        }
        // A live login again: the standing role counts again.
        w.request_action(&live, &anns.id, "revoke", revoke, now)
            .await
            .unwrap();
    });
}

/// Parallel guesses cannot all pass the failure limit read before any of
/// them failed: checks under way count as failures, so of twenty wrong
/// passwords sent at once, `auth.max_failures_per_user` are checked and
/// the rest refused unchecked.
#[test]
fn parallel_wrong_logins_stay_within_the_failure_limit() {
    let pg = Postgres::builder().start().unwrap();
    pg.create_database("guesses").unwrap();
    for storage in [Storage::Sqlite, Storage::Postgres(pg.url("guesses"))] {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(wrong_logins_on_two_wicketds(dir.path(), storage));
    }
}

/// 20 wrong passwords at once, split between two wicketds on one store:
/// only the limit's worth are checked, the rest refused unchecked.
async fn wrong_logins_on_two_wicketds(dir: &std::path::Path, storage: Storage) {
    use wicket_api::{LoginRequest, Secret};
    let mut cfg = wicketd::config::Config::embedded_default(dir);
    cfg.storage = storage;
    let (first, store, now) = wicket_with(dir, cfg.clone(), &[("ann", "access", None)]).await;
    // Another wicketd: its own store connections, the same CA key set.
    let (second, _, _) = wicket_with(dir, cfg, &[]).await;
    let limit = first.config.auth.max_failures_per_user as usize;
    let both = [std::sync::Arc::new(first), std::sync::Arc::new(second)];
    let keys = wicket::keys::generate("ann@test").unwrap();
    let mut tries = tokio::task::JoinSet::new();
    for i in 0..20 {
        let w = both[i % 2].clone();
        let (ssh, csr) = (keys.ssh_public_openssh.clone(), keys.tls_csr_pem.clone());
        tries.spawn(async move {
            let req = LoginRequest {
                user: "ann".into(),
                password: Secret::new("not ann's password"),
                otp: None,
                ssh_public_key: ssh,
                tls_csr_pem: csr,
            };
            w.login(req, std::net::IpAddr::from([127, 0, 0, 1]), now)
                .await
        });
    }
    let (mut checked, mut refused) = (0, 0);
    while let Some(done) = tries.join_next().await {
        match done.unwrap() {
            Err(wicketd::error::Error::Unauthenticated(_)) => checked += 1,
            Err(wicketd::error::Error::RateLimited { .. }) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((checked, refused), (limit, 20 - limit));
    let stored = count(
        &store,
        "SELECT COUNT(*) FROM login_failures WHERE user_name = 'ann' AND pending = 0",
    )
    .await;
    assert_eq!(stored, limit as i64);
    let left = count(&store, "SELECT COUNT(*) FROM login_failures").await;
    assert_eq!(left, limit as i64, "refused checks leave nothing behind");
}

/// Password checks (argon2id, 19 MiB each) run a bounded number at once:
/// a login that finds no place within a moment is told "busy" (503), is
/// not counted as an attempt, and the next, with a place, is checked.
#[test]
fn password_checks_are_bounded() {
    use wicket_api::{LoginRequest, Secret};
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, store, now) = wicket_with_ann_and_ben(dir.path()).await;
        let keys = wicket::keys::generate("ann@test").unwrap();
        let login = || LoginRequest {
            user: "ann".into(),
            password: Secret::new("not ann's password"),
            otp: None,
            ssh_public_key: keys.ssh_public_openssh.clone(),
            tls_csr_pem: keys.tls_csr_pem.clone(),
        };
        let places = w.password_checks.available_permits();
        assert!((2..=16).contains(&places), "{places}");
        let held = w
            .password_checks
            .acquire_many(u32::try_from(places).unwrap())
            .await
            .unwrap();
        let source = std::net::IpAddr::from([127, 0, 0, 1]);
        let err = w.login(login(), source, now).await.unwrap_err();
        assert!(matches!(err, wicketd::error::Error::Busy(_)), "{err:?}");
        let counted = "SELECT COUNT(*) FROM login_failures";
        assert_eq!(count(&store, counted).await, 0);
        drop(held);
        let err = w.login(login(), source, now).await.unwrap_err();
        assert!(
            matches!(err, wicketd::error::Error::Unauthenticated(_)),
            "{err:?}"
        );
        assert_eq!(count(&store, counted).await, 1);
    });
}

/// Holding a certificate never extends a password login: a certificate
/// reissued without grants ends when the login it descends from does (the
/// end travels inside each certificate), and none is reissued after it.
#[test]
fn reissued_certificates_stay_within_the_login() {
    use wicket_api::ReissueRequest;
    use wicketd::service::Caller;
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (w, _store, now) = wicket_with_ann_and_ben(dir.path()).await;
        let source = std::net::IpAddr::from([127, 0, 0, 1]);
        let login_until = now.timestamp() + 3600;
        let keys = wicket::keys::generate("ann@test").unwrap();
        let req = || ReissueRequest {
            ssh_public_key: keys.ssh_public_openssh.clone(),
            tls_csr_pem: keys.tls_csr_pem.clone(),
            request_ids: Vec::new(),
        };
        let ann = caller_of("ann", login_until);
        assert!(w.config.login_ttl.num_seconds() > 3600);
        let certs = w.reissue(&ann, req(), now).await.unwrap();
        assert_eq!(certs.valid_before.timestamp(), login_until);

        // The new certificate carries the same end, so renewing it half an
        // hour later ends at the same time again.
        let der = wicket_ca::pem_decode_all("CERTIFICATE", &certs.tls_certificate_pem).unwrap();
        let later = now + chrono::Duration::minutes(30);
        let cert = w
            .trusted_tls
            .verify_client(&der[0], later.timestamp())
            .unwrap();
        let identity = cert.identity.unwrap();
        assert_eq!(identity.login_until, Some(login_until));
        let ann = Caller::of_certificate(&identity, cert.validity.not_after, source);
        let certs = w.reissue(&ann, req(), later).await.unwrap();
        assert_eq!(certs.valid_before.timestamp(), login_until);
        // It starts a minute early: a wicketd whose clock is behind takes it.
        assert_eq!(certs.valid_after.timestamp(), later.timestamp() - 60);
        let der = wicket_ca::pem_decode_all("CERTIFICATE", &certs.tls_certificate_pem).unwrap();
        let behind = later - chrono::Duration::seconds(30);
        w.trusted_tls
            .verify_client(&der[0], behind.timestamp())
            .unwrap();

        // At the login's end: nothing more, and the reason says what to do.
        let ended = chrono::DateTime::from_timestamp(login_until, 0).unwrap();
        let e = w.reissue(&ann, req(), ended).await.unwrap_err();
        let login_ended = |e: &wicketd::error::Error| {
            matches!(e, wicketd::error::Error::Unauthenticated(m) if m.contains("wicket login"))
        };
        assert!(login_ended(&e), "{e:?}");
        // Nor new requests or reviews on a certificate that outlived it (a
        // grant's may), which could not be used without new certificates.
        let body = wicket_api::CreateRequest {
            roles: vec!["access".into()],
            reason: "INC-1".into(),
            ..Default::default()
        };
        let e = w.create_request(&ann, body, ended).await.unwrap_err();
        assert!(login_ended(&e), "{e:?}");
        let e = w
            .review_request(&ann, "r-1", Default::default(), ended)
            .await
            .unwrap_err();
        assert!(login_ended(&e), "{e:?}");
    });
}
