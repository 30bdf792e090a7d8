//! PostgreSQL access (issue in progress): the wire-protocol codec the proxy
//! uses to read startup, cancel and query messages and to answer with proper
//! ErrorResponses. The listener, upstream TLS and audit come next.

pub mod protocol;
