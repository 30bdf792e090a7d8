//! PostgreSQL access: the wire-protocol codec ([`protocol`], shared with the
//! CLI's tunnel, lives in `wicket-api`) and the proxy
//! ([`proxy`]) that terminates TLS with Wicket client certificates, decides
//! per connection, connects upstream with a minted one-minute certificate,
//! audits statements, routes cancel requests and ends sessions whose grant
//! ended.

pub use wicket_api::pg as protocol;
pub mod proxy;
pub mod track;
