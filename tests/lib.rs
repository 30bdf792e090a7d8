//! Test support for Wicket's end-to-end suite: builders that start real
//! servers (wicketd, PostgreSQL, OpenSSH's sshd) on 127.0.0.1 ephemeral ports,
//! run the real `wicket` CLI with its own `$WICKET_HOME`, and clean up on drop.
//! Modelled on linkerd2-proxy's `linkerd/app/integration`.

pub mod harness_postgres;
pub mod harness_sshd;
pub mod harness_util;
pub mod harness_wicket;
