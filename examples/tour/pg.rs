//! Chapter: locks across machines (custodian::pg, feature `postgres`).
//!
//! Two "replicas" contend for a PostgreSQL advisory lock: the second is told who holds
//! it. The holder's session is then killed on the server (`pg_terminate_backend`, as a
//! failover would): `lost()` fires at once with an `error` event, the second replica
//! takes over with a larger fencing token, and the stale holder's late write is
//! rejected by the token. Needs a server: run under `scripts/with-postgres`.

use std::time::{Duration, Instant};

use custodian::pg::PgLockBuilder;

pub(crate) fn run() -> Result<(), Box<dyn std::error::Error>> {
    let Ok(conn) = std::env::var("CUSTODIAN_TEST_PG") else {
        if std::env::var_os("CUSTODIAN_REQUIRE_PG").is_some() {
            return Err("CUSTODIAN_REQUIRE_PG is set but CUSTODIAN_TEST_PG is not".into());
        }
        println!("(skipped: no PostgreSQL server; run under scripts/with-postgres)");
        return Ok(());
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(replicas(&conn))
}

async fn replicas(conn: &str) -> Result<(), Box<dyn std::error::Error>> {
    let replica = |name: &str| -> Result<PgLockBuilder, Box<dyn std::error::Error>> {
        let mut config: tokio_postgres::Config = conn.parse()?;
        config.application_name(name);
        Ok(PgLockBuilder::new(config))
    };
    let (a, b) = (replica("replica-a")?, replica("replica-b")?);

    let leader = a.acquire("tour-leader").await?;
    println!(
        "replica-a: leader (backend pid {}, fence {})",
        leader.backend_pid(),
        leader.fence().unwrap_or_default()
    );
    // Held is not an I/O error: `Ok(Err(held))`, naming the holder, with the session back.
    let waiting = match b.try_acquire("tour-leader").await? {
        Ok(_) => return Err("replica-b took a lock replica-a holds".into()),
        Err(held) => {
            println!("replica-b: {held}");
            held.into_session()
        }
    };

    // A failover kills replica-a's session; the server frees the lock at once.
    let (admin, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let killed = Instant::now();
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&leader.backend_pid()])
        .await?;
    leader.lost().await;
    println!(
        "replica-a: lost() after {:.1?}: {}",
        killed.elapsed(),
        leader
            .lost_cause()
            .map(ToString::to_string)
            .unwrap_or_default()
    );

    let successor = waiting
        .acquire_timeout("tour-leader", Duration::from_secs(5))
        .await?;
    println!(
        "replica-b: leader now (fence {})",
        successor.fence().unwrap_or_default()
    );
    // The store keeps the largest fence it has seen and refuses smaller ones.
    let newest = successor.fence().unwrap_or_default();
    let stale = leader.fence().unwrap_or_default();
    println!(
        "store: write with fence {stale} {}",
        if stale < newest {
            "rejected (stale holder)"
        } else {
            "accepted"
        }
    );

    if let Err(e) = leader.close().await {
        println!("replica-a: close: {e}");
    }
    successor.close().await?;
    Ok(())
}
