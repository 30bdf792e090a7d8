//! PostgreSQL access: the wire-protocol codec ([`protocol`]) and the proxy
//! ([`proxy`]) that terminates TLS with Wicket client certificates, decides
//! per connection, connects upstream with a minted one-minute certificate,
//! audits statements, routes cancel requests and ends sessions whose grant
//! ended.

pub mod protocol;
pub mod proxy;
