//! Membership against a real etcd (tests/support/etcd.rs starts one per test).

#[path = "../../../tests/support/etcd.rs"]
mod etcd;

use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};
use remask_cluster::membership::{
    Members, MembershipError, Registration, WorkerInfo, watch_members, worker_key,
};
use tokio::sync::watch::Receiver;

const PREFIX: &str = "/remask-test/";

fn info(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: id.into(),
        addr: format!("http://127.0.0.1:700{}", id.len()),
        backend: "cpu".into(),
        devices: vec![0, 1],
    }
}

/// Waits until the watched members satisfy `pred`; panics with the last state after `within`.
async fn wait_for(
    rx: &mut Receiver<Members>,
    within: Duration,
    pred: impl Fn(&Members) -> bool,
) -> Members {
    let res = tokio::time::timeout(within, rx.wait_for(|m| pred(m)))
        .await
        .map(|r| r.map(|m| m.clone()));
    match res {
        Ok(Ok(m)) => m,
        Ok(Err(_)) => panic!("watcher task ended"),
        Err(_) => panic!("timed out after {within:?}; members: {:?}", *rx.borrow()),
    }
}

async fn raw_client(etcd: &etcd::Etcd) -> Client {
    Client::connect([etcd.endpoint.as_str()], None)
        .await
        .unwrap()
}

#[test]
fn worker_key_normalises_prefix() {
    assert_eq!(worker_key("/remask", "w1"), "/remask/workers/w1");
    assert_eq!(worker_key("/remask//", "w1"), "/remask/workers/w1");
}

#[tokio::test(flavor = "multi_thread")]
async fn register_two_then_deregister_one() {
    let etcd = etcd::Etcd::start();
    let eps = vec![etcd.endpoint.clone()];
    let mut rx = watch_members(eps.clone(), PREFIX.into());

    let a = Registration::register(&eps, PREFIX, info("a"), 5)
        .await
        .unwrap();
    // the scheme-less form is accepted too
    let bare = vec![etcd.endpoint.trim_start_matches("http://").to_string()];
    let b = Registration::register(&bare, PREFIX, info("bb"), 5)
        .await
        .unwrap();
    assert_eq!(a.key(), "/remask-test/workers/a");

    let m = wait_for(&mut rx, Duration::from_secs(3), |m| m.len() == 2).await;
    let want: Members = [("a".into(), info("a")), ("bb".into(), info("bb"))].into();
    assert_eq!(m, want);

    a.deregister().await;
    let t0 = Instant::now();
    let m = wait_for(&mut rx, Duration::from_secs(1), |m| !m.contains_key("a")).await;
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(m.keys().collect::<Vec<_>>(), ["bb"]);
    drop(b);
}

#[tokio::test(flavor = "multi_thread")]
async fn crashed_worker_expires_after_ttl() {
    let etcd = etcd::Etcd::start();
    let eps = vec![etcd.endpoint.clone()];
    let mut rx = watch_members(eps.clone(), PREFIX.into());
    let reg = Registration::register(&eps, PREFIX, info("crash"), 2)
        .await
        .unwrap();
    wait_for(&mut rx, Duration::from_secs(3), |m| m.contains_key("crash")).await;
    // Let a few renewals happen to show the keep-alive works past the first TTL.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        rx.borrow().contains_key("crash"),
        "expired while being kept alive"
    );

    drop(reg); // aborts the keep-alive, as a crash would; no revoke
    let t0 = Instant::now();
    // The last renewal was at most ttl/3 ago, so the key must survive ~1 s more.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        rx.borrow().contains_key("crash"),
        "gone before the lease TTL"
    );
    wait_for(&mut rx, Duration::from_secs(4), |m| {
        !m.contains_key("crash")
    })
    .await;
    let gone_after = t0.elapsed();
    assert!(gone_after < Duration::from_secs(4), "took {gone_after:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn watcher_converges_after_etcd_restart() {
    let mut etcd = etcd::Etcd::start();
    let eps = vec![etcd.endpoint.clone()];
    let mut rx = watch_members(eps.clone(), PREFIX.into());
    let _w = Registration::register(&eps, PREFIX, info("w"), 2)
        .await
        .unwrap();
    wait_for(&mut rx, Duration::from_secs(3), |m| m.contains_key("w")).await;

    etcd.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.restart();

    // A change made after the restart must reach the watcher (it has to re-watch).
    let mut c = raw_client(&etcd).await;
    let v = serde_json::to_string(&info("late")).unwrap();
    c.put(worker_key(PREFIX, "late"), v, None).await.unwrap();
    let m = wait_for(&mut rx, Duration::from_secs(5), |m| m.contains_key("late")).await;
    assert!(
        m.contains_key("w"),
        "registration lost across restart: {m:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_reputs_after_etcd_lost_its_data() {
    let mut etcd = etcd::Etcd::start();
    let eps = vec![etcd.endpoint.clone()];
    let mut rx = watch_members(eps.clone(), PREFIX.into());
    let _w = Registration::register(&eps, PREFIX, info("w"), 1)
        .await
        .unwrap();
    wait_for(&mut rx, Duration::from_secs(3), |m| m.contains_key("w")).await;

    // A fresh, empty etcd on the same port: lease and key are gone, revisions restart at 1.
    etcd.kill();
    std::fs::remove_dir_all(&etcd.data_dir).unwrap();
    etcd.restart();
    let mut c = raw_client(&etcd).await;
    assert!(
        c.get(worker_key(PREFIX, "w"), None)
            .await
            .unwrap()
            .kvs()
            .is_empty()
    );

    // Without calling register again, the key comes back, and the watcher follows.
    let t0 = Instant::now();
    loop {
        if !c
            .get(worker_key(PREFIX, "w"), None)
            .await
            .unwrap()
            .kvs()
            .is_empty()
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "worker key not re-put"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.put(
        worker_key(PREFIX, "late"),
        serde_json::to_string(&info("late")).unwrap(),
        None,
    )
    .await
    .unwrap();
    let m = wait_for(&mut rx, Duration::from_secs(5), |m| {
        m.contains_key("w") && m.contains_key("late")
    })
    .await;
    assert_eq!(m["w"], info("w"));
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_repairs_deleted_key_and_revoked_lease() {
    let etcd = etcd::Etcd::start();
    let eps = vec![etcd.endpoint.clone()];
    let mut rx = watch_members(eps.clone(), PREFIX.into());
    let _w = Registration::register(&eps, PREFIX, info("w"), 3)
        .await
        .unwrap();
    wait_for(&mut rx, Duration::from_secs(3), |m| m.contains_key("w")).await;
    let mut c = raw_client(&etcd).await;
    let key = worker_key(PREFIX, "w");

    c.delete(key.clone(), None).await.unwrap();
    wait_for(&mut rx, Duration::from_secs(1), |m| !m.contains_key("w")).await;
    wait_for(&mut rx, Duration::from_secs(3), |m| m.contains_key("w")).await;

    let lease = c.get(key.clone(), None).await.unwrap().kvs()[0].lease();
    c.lease_revoke(lease).await.unwrap();
    wait_for(&mut rx, Duration::from_secs(1), |m| !m.contains_key("w")).await;
    wait_for(&mut rx, Duration::from_secs(3), |m| m.contains_key("w")).await;
    let new_lease = c.get(key, None).await.unwrap().kvs()[0].lease();
    assert_ne!(new_lease, lease);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_values_are_ignored() {
    let etcd = etcd::Etcd::start();
    let eps = vec![etcd.endpoint.clone()];
    let mut c = raw_client(&etcd).await;
    // one bad value seen by the initial get, more seen by the watch
    c.put(worker_key(PREFIX, "bad1"), "not json", None)
        .await
        .unwrap();
    let mut rx = watch_members(eps.clone(), PREFIX.into());
    let _g = Registration::register(&eps, PREFIX, info("good"), 5)
        .await
        .unwrap();
    wait_for(&mut rx, Duration::from_secs(3), |m| m.contains_key("good")).await;

    c.put(worker_key(PREFIX, "bad2"), r#"{"id":"bad2"}"#, None)
        .await
        .unwrap();
    let wrong_id = serde_json::to_string(&info("other")).unwrap();
    c.put(worker_key(PREFIX, "bad3"), wrong_id, None)
        .await
        .unwrap();
    // a valid worker that changes to garbage is dropped
    c.put(
        worker_key(PREFIX, "flip"),
        serde_json::to_string(&info("flip")).unwrap(),
        None,
    )
    .await
    .unwrap();
    wait_for(&mut rx, Duration::from_secs(3), |m| m.contains_key("flip")).await;
    c.put(worker_key(PREFIX, "flip"), "{", None).await.unwrap();
    // a valid one written last: once it is seen, every earlier event has been applied
    let lease = c.lease_grant(30, None).await.unwrap().id();
    let sentinel = serde_json::to_string(&info("z")).unwrap();
    c.put(
        worker_key(PREFIX, "z"),
        sentinel,
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    let m = wait_for(&mut rx, Duration::from_secs(3), |m| m.contains_key("z")).await;
    assert_eq!(m.keys().collect::<Vec<_>>(), ["good", "z"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn register_reports_unreachable_etcd() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let eps = vec![format!("127.0.0.1:{port}")];
    let t0 = Instant::now();
    let err = match Registration::register(&eps, PREFIX, info("x"), 2).await {
        Err(e) => e,
        Ok(_) => panic!("registered with no etcd"),
    };
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(
            err,
            MembershipError::Unreachable { .. } | MembershipError::Timeout { .. }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("is etcd running"), "{err}");
}
