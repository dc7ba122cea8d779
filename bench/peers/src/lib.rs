//! The load generators `bench/compare.sh` uses for the systems StemeDB is
//! compared with, and the raw fdatasync probe; the binary
//! `stemedb-peer-bench` puts a command line on them. Every report has the
//! shape of `stemectl bench --output json` (see [`report`]).

pub mod etcd;
pub mod fsync;
pub mod pgbench;
pub mod report;
