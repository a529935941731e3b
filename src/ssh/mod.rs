//! The SSH side: everything that touches russh lives here.

pub mod channel;
pub mod connection;
pub mod handler;
pub mod keys;
pub mod ledger;
pub mod lifetime;
pub mod prechecks;
pub mod server;
