//! kplb node agent library: everything except process start-up, so tests can drive it.
pub mod changes;
pub mod cli;
pub mod datapath;
pub mod health;
pub mod healthcheck;
pub mod k8s;
pub mod metrics;
pub mod model;
pub mod mountns;
pub mod node;
pub mod objects;
pub mod standalone;
pub mod stats;
pub mod sync;
pub mod topology;
pub mod view;
