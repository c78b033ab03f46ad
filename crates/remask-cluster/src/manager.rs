//! Turns the set of live workers into a pipeline: one worker per stage,
//! each loaded with its shard. Assignments are sticky (a healthy worker keeps
//! its stage); a stage whose worker left (lease expired) or failed a step is
//! re-assigned to a free worker, and a new worker fills an empty stage as soon
//! as it appears. Extra workers wait as spares. While any stage is empty the
//! published pipeline is `None` and requests get UNAVAILABLE at once.

use crate::convert::shard_to_pb;
use crate::membership::{Members, WorkerInfo};
use crate::metrics::Metrics;
use crate::pipeline::{MAX_MESSAGE_BYTES, Pipeline, StageClient, StageFailure, StageKv};
use remask_engine::Shard;
use remask_proto::worker as pb;
use remask_proto::worker::worker_client::WorkerClient;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How long a worker that failed is passed over before it is tried again.
const COOLDOWN: Duration = Duration::from_secs(1);
/// How often an incomplete cluster retries.
const RETRY: Duration = Duration::from_millis(300);

struct Slot {
    worker: WorkerInfo,
    client: WorkerClient<Channel>,
    generation: u64,
    kv: StageKv,
}

pub struct Manager {
    model: String,
    shards: Vec<Shard>,
    members: watch::Receiver<Members>,
    failures: mpsc::UnboundedReceiver<StageFailure>,
    pipeline: watch::Sender<Option<Arc<Pipeline>>>,
    slots: Vec<Option<Slot>>,
    cooldown: HashMap<String, Instant>,
    next_generation: u64,
    load_timeout: Duration,
    metrics: Arc<Metrics>,
    tls: Option<ClientTlsConfig>,
}

impl Manager {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: String,
        shards: Vec<Shard>,
        members: watch::Receiver<Members>,
        failures: mpsc::UnboundedReceiver<StageFailure>,
        pipeline: watch::Sender<Option<Arc<Pipeline>>>,
        load_timeout: Duration,
        metrics: Arc<Metrics>,
        tls: Option<ClientTlsConfig>,
    ) -> Self {
        let slots = shards.iter().map(|_| None).collect();
        Manager {
            model,
            shards,
            members,
            failures,
            pipeline,
            slots,
            cooldown: HashMap::new(),
            next_generation: 1,
            load_timeout,
            metrics,
            tls,
        }
    }

    pub async fn run(mut self) {
        loop {
            self.reconcile().await;
            let complete = self.slots.iter().all(Option::is_some);
            tokio::select! {
                changed = self.members.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                Some(failure) = self.failures.recv() => self.on_failure(failure),
                _ = tokio::time::sleep(RETRY), if !complete => {}
            }
        }
    }

    fn on_failure(&mut self, failure: StageFailure) {
        if let Some(slot) = self.slots.get_mut(failure.stage)
            && slot.as_ref().is_some_and(|s| s.worker.id == failure.worker)
        {
            tracing::warn!(stage = failure.stage, worker = %failure.worker, "stage failed; re-assigning it");
            *slot = None;
            self.cooldown
                .insert(failure.worker, Instant::now() + COOLDOWN);
        }
    }

    async fn reconcile(&mut self) {
        let members = self.members.borrow().clone();
        // Stages whose worker left, or came back at another address.
        for slot in &mut self.slots {
            if let Some(s) = slot
                && members.get(&s.worker.id) != Some(&s.worker)
            {
                tracing::info!(worker = %s.worker.id, "worker left; its stage is free");
                *slot = None;
            }
        }
        let now = Instant::now();
        self.cooldown.retain(|_, until| *until > now);
        let free: Vec<WorkerInfo> = members
            .values()
            .filter(|w| !self.slots.iter().flatten().any(|s| s.worker.id == w.id))
            .filter(|w| !self.cooldown.contains_key(&w.id))
            .cloned()
            .collect();
        let empty: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_none())
            .collect();
        let mut loads = Vec::new();
        for (stage, worker) in empty.into_iter().zip(free) {
            let generation = self.next_generation;
            self.next_generation += 1;
            loads.push(self.load(stage, worker, generation));
        }
        let results = futures::future::join_all(loads).await;
        for (stage, result) in results {
            match result {
                Ok(slot) => self.slots[stage] = Some(slot),
                Err((worker, e)) => {
                    tracing::warn!(stage, %worker, error = %e, "cannot load the shard on this worker");
                    self.cooldown.insert(worker, Instant::now() + COOLDOWN);
                }
            }
        }
        self.publish();
    }

    fn load(
        &self,
        stage: usize,
        worker: WorkerInfo,
        generation: u64,
    ) -> impl std::future::Future<Output = (usize, Result<Slot, (String, String)>)> + use<> {
        let request = pb::LoadShardRequest {
            model: self.model.clone(),
            shard: Some(shard_to_pb(&self.shards[stage])),
            generation,
        };
        let timeout = self.load_timeout;
        let tls = self.tls.clone();
        async move {
            let result = async {
                let mut endpoint =
                    Endpoint::from_shared(worker.addr.clone()).map_err(|e| e.to_string())?;
                if let Some(tls) = tls.filter(|_| worker.addr.starts_with("https://")) {
                    endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
                }
                let channel = endpoint
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(|e| format!("cannot connect to {}: {e}", worker.addr))?;
                let mut client = WorkerClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                let loaded = tokio::time::timeout(timeout, client.load_shard(request))
                    .await
                    .map_err(|_| "loading the shard timed out".to_string())?
                    .map_err(|s| s.message().to_string())?
                    .into_inner();
                tracing::info!(stage, worker = %worker.id, generation, "stage assigned");
                Ok(Slot {
                    worker: worker.clone(),
                    client,
                    generation,
                    kv: StageKv {
                        budget: (loaded.kv_budget_bytes > 0).then_some(loaded.kv_budget_bytes),
                        bytes_per_position: loaded.kv_bytes_per_position,
                    },
                })
            }
            .await;
            (stage, result.map_err(|e| (worker.id.clone(), e)))
        }
    }

    fn publish(&self) {
        let filled = self.slots.iter().flatten().count();
        let m = &self.metrics;
        m.workers.get_or_create(m.model()).set(filled as i64);
        m.shard_coverage
            .get_or_create(m.model())
            .set(filled as f64 / self.slots.len() as f64);
        let pipeline = self
            .slots
            .iter()
            .map(|s| {
                s.as_ref().map(|s| StageClient::Remote {
                    worker_id: s.worker.id.clone(),
                    client: s.client.clone(),
                    generation: s.generation,
                    kv: s.kv,
                })
            })
            .collect::<Option<Vec<_>>>()
            .map(|stages| Arc::new(Pipeline::new(stages)));
        let changed = match (&*self.pipeline.borrow(), &pipeline) {
            (None, None) => false,
            (Some(a), Some(b)) => a.workers() != b.workers() || generations(a) != generations(b),
            _ => true,
        };
        if changed {
            if pipeline.is_some() {
                tracing::info!("all stages assigned: serving");
            } else {
                tracing::warn!("a stage has no worker: not serving");
            }
            let _ = self.pipeline.send(pipeline);
        }
    }
}

fn generations(p: &Pipeline) -> Vec<u64> {
    p.stages
        .iter()
        .map(|s| match s {
            StageClient::Remote { generation, .. } => *generation,
            StageClient::Local(_) => 0,
        })
        .collect()
}

/// Static membership (`--workers host:port,...`): the listed addresses, in
/// order, each its own id.
pub fn static_members(addrs: &[String], tls: bool) -> watch::Receiver<Members> {
    let members: Members = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let addr = if a.contains("://") {
                a.clone()
            } else {
                format!("{}://{a}", if tls { "https" } else { "http" })
            };
            // Ids sort in list order, so stage i goes to the i-th worker.
            let id = format!("static-{i:04}");
            (
                id.clone(),
                WorkerInfo {
                    id,
                    addr,
                    backend: "unknown".into(),
                    devices: Vec::new(),
                },
            )
        })
        .collect();
    let (tx, rx) = watch::channel(members);
    // Keep the sender alive for the life of the process.
    std::mem::forget(tx);
    rx
}
