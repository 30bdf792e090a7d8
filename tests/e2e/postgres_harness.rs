//! The PostgreSQL harness itself: a real server starts, answers SQL, and is
//! gone (port closed) once the handle drops.

use std::net::TcpStream;
use std::time::Duration;
use wicket_e2e::harness_postgres::Postgres;
use wicket_e2e::harness_util::wait_until;

#[test]
fn postgres_harness_starts_and_answers() {
    let pg = Postgres::builder().start().unwrap();
    let addr = pg.addr();
    assert_eq!(addr.port(), pg.port());
    assert_eq!(
        pg.url("wicket"),
        format!("postgres://postgres@127.0.0.1:{}/wicket", pg.port())
    );
    assert!(pg.data_dir().join("PG_VERSION").is_file());

    pg.create_database("wicket").unwrap();
    let sum = pg
        .psql(
            "wicket",
            "create table t(x int); insert into t values (1),(2); select sum(x) from t",
        )
        .unwrap();
    assert_eq!(sum, "3", "log:\n{}", pg.log_contents());

    drop(pg);
    wait_until("the port to close", Duration::from_secs(10), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .is_err()
            .then_some(())
    })
    .unwrap();
}
