//! Cluster membership through etcd.
//!
//! Each worker puts `{prefix}/workers/{id}` = JSON [`WorkerInfo`] under a lease it keeps alive
//! ([`Registration`]); a worker that dies stops renewing, so etcd deletes its key when the lease
//! runs out, without anyone having to notice the crash. The coordinator follows the prefix with
//! [`watch_members`] and reassigns layer shards whenever the member set changes.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    WatchOptions,
};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Longest wait for one etcd request: the client connects lazily and would otherwise wait
/// forever for an etcd that is down.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// First retry delay after an error; doubled on each further error up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Cap on retry delays, so a worker or coordinator is back within ~2 s of etcd recovering.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a worker publishes about itself; the coordinator needs it to dial and place shards.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerInfo {
    /// Unique worker id; also the last component of its etcd key.
    pub id: String,
    /// "http://host:port" that the coordinator dials.
    pub addr: String,
    /// Compute backend name (e.g. "cpu", "cuda").
    pub backend: String,
    /// Accelerator ordinals the worker owns (empty for CPU).
    #[serde(default)]
    pub devices: Vec<u32>,
}

/// Current workers, by id (a BTreeMap so iteration, and hence shard assignment, is deterministic).
pub type Members = BTreeMap<String, WorkerInfo>;

/// Errors from [`Registration::register`]; background tasks only log, they never fail.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("no etcd endpoints given; pass at least one, e.g. http://127.0.0.1:2379")]
    NoEndpoints,
    #[error("lease ttl must be at least 1 second, got {0}")]
    InvalidTtl(i64),
    #[error("cannot reach etcd at {endpoints}: {source}; is etcd running?")]
    Unreachable {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "etcd at {endpoints} did not answer {op} within {RPC_TIMEOUT:?}; is etcd running and healthy?"
    )]
    Timeout { endpoints: String, op: &'static str },
}

/// The etcd key of worker `id`: `"{prefix}/workers/{id}"`, with any trailing '/' of `prefix` dropped.
pub fn worker_key(prefix: &str, id: &str) -> String {
    format!("{}{id}", workers_prefix(prefix))
}

/// `"{prefix}/workers/"`: the range that [`watch_members`] follows.
fn workers_prefix(prefix: &str) -> String {
    format!("{}/workers/", prefix.trim_end_matches('/'))
}

/// Runs one etcd request with [`RPC_TIMEOUT`], flattening both failure kinds into a message.
async fn rpc<T>(
    op: &str,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{op}: {e}")),
        Err(_) => Err(format!("{op}: no answer within {RPC_TIMEOUT:?}")),
    }
}

/// Connects lazily (no I/O happens here). HTTP/2 keep-alive makes a silently dead connection
/// (e.g. a partition) fail a long-lived watch instead of hanging it.
async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    // etcd-client accepts both "http://host:port" and "host:port" (it prefixes "http://").
    let eps: Vec<&str> = endpoints.iter().map(|e| e.trim_end_matches('/')).collect();
    let opts = ConnectOptions::new()
        .with_connect_timeout(RPC_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), RPC_TIMEOUT)
        .with_keep_alive_while_idle(true);
    Client::connect(eps, Some(opts)).await
}

/// A worker's live registration. Keep it for as long as the worker serves; dropping it stops
/// the keep-alive (the key then expires after the TTL, as for a crash), while
/// [`Registration::deregister`] removes the key at once (clean shutdown).
pub struct Registration {
    client: Client,
    key: String,
    /// Current lease id (0 while none); shared with the task, which re-grants after a loss.
    lease: Arc<AtomicI64>,
    task: JoinHandle<()>,
}

impl Registration {
    /// Grants a lease of `ttl` seconds, puts the key with it, and keeps it alive (every ttl/3)
    /// in a background tokio task.
    /// If the lease is lost (keep-alive fails past its TTL, etcd restarted, key deleted), it
    /// re-grants and re-puts, retrying with backoff (cap 2 s), logging with tracing.
    ///
    /// The first grant+put happens here, so an unreachable etcd is reported to the caller
    /// instead of being retried silently.
    pub async fn register(
        endpoints: &[String],
        prefix: &str,
        info: WorkerInfo,
        ttl: i64,
    ) -> Result<Registration, MembershipError> {
        if endpoints.is_empty() {
            return Err(MembershipError::NoEndpoints);
        }
        if ttl < 1 {
            return Err(MembershipError::InvalidTtl(ttl));
        }
        let eps = endpoints.join(",");
        let unreachable = |source| MembershipError::Unreachable {
            endpoints: eps.clone(),
            source,
        };
        let mut client = connect(endpoints).await.map_err(unreachable)?;
        let key = worker_key(prefix, &info.id);
        let value = serde_json::to_vec(&info).expect("WorkerInfo always serializes");

        let first = async {
            let id = client.lease_grant(ttl, None).await?.id();
            let put = PutOptions::new().with_lease(id);
            client.put(key.clone(), value.clone(), Some(put)).await?;
            Ok::<_, etcd_client::Error>(id)
        };
        let lease_id = match tokio::time::timeout(RPC_TIMEOUT, first).await {
            Ok(r) => r.map_err(unreachable)?,
            Err(_) => {
                return Err(MembershipError::Timeout {
                    endpoints: eps,
                    op: "lease grant + put",
                });
            }
        };
        info!(%key, lease = lease_id, ttl, "registered in etcd");

        let lease = Arc::new(AtomicI64::new(lease_id));
        let keeper = Keeper {
            client: client.clone(),
            key: key.clone(),
            value,
            ttl,
            lease: lease.clone(),
            stream: None,
        };
        let task = tokio::spawn(keeper.run());
        Ok(Registration {
            client,
            key,
            lease,
            task,
        })
    }

    /// Stops the keep-alive and revokes the lease (the key disappears at once).
    /// Failures are only logged: the lease then still expires by itself after its TTL.
    pub async fn deregister(mut self) {
        self.task.abort();
        // Wait for the abort to land, so a re-grant in flight cannot leave a fresh lease behind.
        let _ = (&mut self.task).await;
        let id = self.lease.swap(0, Ordering::SeqCst);
        if id == 0 {
            return; // between a loss and a re-grant: nothing to revoke
        }
        match rpc("lease revoke", self.client.lease_revoke(id)).await {
            Ok(_) => info!(key = %self.key, lease = id, "deregistered from etcd"),
            Err(e) => warn!(key = %self.key, "deregister: {e}; the key expires with its lease"),
        }
    }

    /// The etcd key this registration maintains.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Registration {
    /// Aborts the keep-alive only: like a crashed worker, the key lives until the lease expires.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// State of the background keep-alive task.
struct Keeper {
    client: Client,
    key: String,
    value: Vec<u8>,
    ttl: i64,
    lease: Arc<AtomicI64>,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Keeper {
    async fn run(mut self) {
        // ttl/3 leaves two more renewals' worth of slack before the lease runs out.
        let period = Duration::from_millis((self.ttl as u64 * 1000 / 3).max(100));
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.tick().await {
                Ok(()) => {
                    backoff = MIN_BACKOFF;
                    tokio::time::sleep(period).await;
                }
                Err(e) => {
                    warn!(key = %self.key, "etcd registration: {e}; retrying in {backoff:?}");
                    self.stream = None; // reopen the keep-alive stream on the next try
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One renewal: (re-)grant + put if the lease was lost, renew it, and re-put the key if it
    /// was deleted behind our back.
    async fn tick(&mut self) -> Result<(), String> {
        let mut id = self.lease.load(Ordering::SeqCst);
        if id == 0 {
            id = rpc("lease grant", self.client.lease_grant(self.ttl, None))
                .await?
                .id();
            self.lease.store(id, Ordering::SeqCst);
            self.put(id).await?;
            info!(key = %self.key, lease = id, "re-registered in etcd with a new lease");
        }
        if !self.renew(id).await? {
            // Expired (etcd unreachable past the TTL) or unknown (etcd lost its data, revoked).
            self.lease.store(0, Ordering::SeqCst);
            self.stream = None;
            return Err(format!("lease {id:x} is gone; granting a new one"));
        }

        let got = rpc("get", self.client.get(self.key.clone(), None)).await?;
        if got.kvs().first().map(|kv| kv.lease()) != Some(id) {
            self.put(id).await?;
            info!(key = %self.key, lease = id, "worker key was missing; put it back");
        }
        Ok(())
    }

    /// Renews lease `id` once; Ok(false) when etcd says the lease no longer exists.
    async fn renew(&mut self, id: i64) -> Result<bool, String> {
        let Some((keeper, stream)) = self.stream.as_mut() else {
            // Opening the stream renews once; etcd-client reports an unknown lease (TTL 0 in
            // that first answer) as LeaseKeepAliveError.
            let open = tokio::time::timeout(RPC_TIMEOUT, self.client.lease_keep_alive(id)).await;
            return match open {
                Ok(Ok(ka)) => {
                    self.stream = Some(ka);
                    Ok(true)
                }
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => Ok(false),
                Ok(Err(e)) => Err(format!("lease keep-alive: {e}")),
                Err(_) => Err(format!(
                    "lease keep-alive: no answer within {RPC_TIMEOUT:?}"
                )),
            };
        };
        rpc("lease keep-alive", keeper.keep_alive()).await?;
        let resp = rpc("lease keep-alive", stream.message())
            .await?
            .ok_or("lease keep-alive: stream closed by etcd")?;
        debug!(key = %self.key, lease = id, ttl = resp.ttl(), "lease renewed");
        Ok(resp.ttl() > 0)
    }

    async fn put(&mut self, id: i64) -> Result<(), String> {
        let opts = PutOptions::new().with_lease(id);
        let put = self
            .client
            .put(self.key.clone(), self.value.clone(), Some(opts));
        rpc("put", put).await.map(drop)
    }
}

/// Watches `{prefix}/workers/`: an initial get, then a watch from the next revision. On any
/// error it reconnects with backoff and resynchronises with a fresh get, so the receiver always
/// converges to etcd's state. Runs until the receiver side is dropped.
///
/// Starts empty; it never fails: problems are logged and retried.
pub fn watch_members(
    endpoints: Vec<String>,
    prefix: String,
) -> tokio::sync::watch::Receiver<Members> {
    let (tx, rx) = tokio::sync::watch::channel(Members::new());
    tokio::spawn(async move {
        let dir = workers_prefix(&prefix);
        let mut backoff = MIN_BACKOFF;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                e = sync_and_watch(&endpoints, &dir, &tx, &mut backoff) => {
                    warn!(prefix = %dir, "etcd member watch: {e}; resyncing in {backoff:?}");
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
    rx
}

/// Get + watch until something fails; returns why. Resets `backoff` once etcd answered.
async fn sync_and_watch(
    endpoints: &[String],
    dir: &str,
    tx: &tokio::sync::watch::Sender<Members>,
    backoff: &mut Duration,
) -> String {
    let run = async {
        // A fresh client per attempt: nothing stale survives an etcd restart.
        let mut client = connect(endpoints)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let got = rpc(
            "get",
            client.get(dir, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut members = Members::new();
        for kv in got.kvs() {
            if let Some((id, info)) = parse_member(dir, kv.key(), kv.value()) {
                members.insert(id, info);
            }
        }
        publish(tx, &members);
        *backoff = MIN_BACKOFF;
        let rev = got.header().map_or(0, |h| h.revision());

        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        let mut stream = rpc("watch", client.watch(dir, Some(opts))).await?;
        while let Some(resp) = stream.message().await.map_err(|e| format!("watch: {e}"))? {
            if resp.canceled() {
                // e.g. our revision was compacted away: resync from a fresh get
                return Err(format!("watch canceled by etcd: {}", resp.cancel_reason()));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                match ev.event_type() {
                    EventType::Put => match parse_member(dir, kv.key(), kv.value()) {
                        Some((id, info)) => members.insert(id, info),
                        // a malformed value replaces whatever was there: drop the old entry
                        None => members.remove(id_of(dir, kv.key()).unwrap_or_default()),
                    },
                    EventType::Delete => members.remove(id_of(dir, kv.key()).unwrap_or_default()),
                };
            }
            publish(tx, &members);
        }
        Err::<(), String>("watch stream closed by etcd".into())
    };
    match run.await {
        Ok(()) => unreachable!(),
        Err(e) => e,
    }
}

/// Sends `members` only if it differs, so receivers wake up on real changes only.
fn publish(tx: &tokio::sync::watch::Sender<Members>, members: &Members) {
    tx.send_if_modified(|cur| {
        if cur == members {
            return false;
        }
        debug!(workers = ?members.keys().collect::<Vec<_>>(), "membership changed");
        cur.clone_from(members);
        true
    });
}

fn id_of<'k>(dir: &str, key: &'k [u8]) -> Option<&'k str> {
    std::str::from_utf8(key).ok()?.strip_prefix(dir)
}

/// Decodes one worker entry; anything malformed is skipped with a warning, never fatal, so one
/// bad key cannot take the coordinator down.
fn parse_member(dir: &str, key: &[u8], value: &[u8]) -> Option<(String, WorkerInfo)> {
    let key_str = String::from_utf8_lossy(key);
    let Some(id) = id_of(dir, key).filter(|id| !id.is_empty()) else {
        warn!(key = %key_str, "skipping etcd key that is not {dir}<id>");
        return None;
    };
    match serde_json::from_slice::<WorkerInfo>(value) {
        Ok(info) if info.id == id => Some((id.to_string(), info)),
        Ok(info) => {
            warn!(key = %key_str, "skipping worker entry whose id {:?} does not match its key", info.id);
            None
        }
        Err(e) => {
            warn!(key = %key_str, "skipping worker entry that is not WorkerInfo JSON: {e}");
            None
        }
    }
}
