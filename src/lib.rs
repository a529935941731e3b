//! benchgate: an SSH bastion that admits OpenSSH user certificates into Docker bench containers.

pub mod auth;
pub mod config;
pub mod audit;
pub mod metrics;
