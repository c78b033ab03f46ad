//! The remask cluster.
//!
//! - `coordinator`: the public gRPC API; owns every request's canvas.
//! - `scheduler`: step-level continuous batching over the current pipeline.
//! - `stop`: stop strings, checked in the final prefix after every step.
//! - `pipeline`: one forward pass through the stages; the layer plan.
//! - `manager`: live workers to an assigned, loaded pipeline.
//! - `membership`: workers register in etcd with a lease; the coordinator watches.
//! - `worker`, `shard`: the worker process and what a stage computes.
//! - `server`: serving either role with gRPC health and reflection.
//! - `listen`: accepting connections: deadlines, limits, accept backoff.
//! - `fuzzing`: the properties of the fuzz targets over what clients and
//!   coordinators send (gRPC messages, HTTP bodies), run on the real handlers.

pub mod auth;
pub mod convert;
pub mod coordinator;
pub mod fuzzing;
pub mod http;
pub mod listen;
pub mod manager;
pub mod membership;
pub mod metrics;
pub mod pipeline;
pub mod scheduler;
pub mod server;
pub mod shard;
pub mod stop;
pub mod tls;
pub mod worker;

pub use coordinator::{Coordinator, ModelMeta};
pub use manager::{Manager, static_members};
pub use pipeline::{Pipeline, StageClient, plan_shards};
pub use scheduler::{Scheduler, SchedulerConfig};
pub use shard::ShardRunner;
pub use worker::WorkerService;
