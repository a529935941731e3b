//! benchgate: an SSH bastion that admits OpenSSH user certificates into Docker bench containers.

pub mod auth;
