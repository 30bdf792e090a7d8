//! The proxy's side of the connection to a node: a russh client that checks
//! the node's host certificate (or its pinned key, which is then the only
//! one accepted), logs in with the session's one-minute certificate, and passes agent, X11
//! and remote-forward channels the node opens back to the user when their
//! role allows them.

use super::handler::ConnShared;
use super::SshProxy;
use crate::error::{Error, Result};
use russh::client::{self, Msg, Session};
use russh::keys::PublicKeyOrCertificate;
use russh::Channel;
use std::sync::Arc;
use std::time::Duration;
use wicket_ca::SshCertKind;
use wicket_policy::Resource;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Upstream {
    proxy: Arc<SshProxy>,
    node: String,
    pin: Option<String>,
    shared: Arc<ConnShared>,
    /// Why the host key was refused, for the user's error message.
    refused: Arc<std::sync::Mutex<Option<String>>>,
}

fn openssh_key_text(k: &russh::keys::PublicKey) -> Option<String> {
    let blob = k.to_bytes().ok()?;
    wicket_ca::SshPublicKey::from_blob(blob)
        .ok()
        .map(|p| p.to_openssh())
}

impl client::Handler for Upstream {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let now = crate::clock::now().timestamp();
        // A pinned host key is the node's only key: a certificate for
        // another key is refused even when Wicket's host CA signed it.
        let why = match (&self.pin, key) {
            (Some(pin), key) => {
                let presented = match key {
                    PublicKeyOrCertificate::Certificate(cert) => {
                        openssh_key_text(&russh::keys::PublicKey::from(cert.public_key().clone()))
                    }
                    PublicKeyOrCertificate::PublicKey { key, .. } => openssh_key_text(key),
                };
                if presented.as_ref() == Some(pin) {
                    return Ok(true);
                }
                "the node's host key does not match the pinned host_key".to_owned()
            }
            (None, PublicKeyOrCertificate::Certificate(cert)) => {
                let blob = cert.to_bytes().map_err(russh::Error::from)?;
                let verified = self.proxy.trusted_hosts.verify(
                    &blob,
                    SshCertKind::Host,
                    now,
                    Some(&self.node),
                );
                match verified {
                    Ok(_) => return Ok(true),
                    Err(e) => format!("host certificate rejected: {e}"),
                }
            }
            (None, PublicKeyOrCertificate::PublicKey { .. }) => "the node presented a plain host \
                key, not a certificate from Wicket's host CA, and no host_key is pinned for it"
                .to_owned(),
        };
        tracing::warn!(node = %self.node, reason = %why, "refusing node host key");
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        Ok(false)
    }

    // A node has no reason to open these toward the proxy (russh accepts
    // them by default, and would keep each one): refused.
    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse_from_node(&self.node, "session", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse_from_node(&self.node, "direct-tcpip", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse_from_node(&self.node, "direct-streamlocal", reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse_from_node(&self.node, "forwarded-streamlocal", reply).await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.shared.agent(channel, reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.shared
            .forwarded_tcpip(
                channel,
                reply,
                (connected_address, connected_port),
                (originator_address, originator_port),
            )
            .await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        channel: Channel<Msg>,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.shared
            .x11(channel, reply, (originator_address, originator_port))
            .await;
        Ok(())
    }
}

/// Refuses a channel of a type the proxy never takes from a node.
async fn refuse_from_node(node: &str, kind: &str, reply: client::ChannelOpenHandle) {
    tracing::warn!(node = %node, channel = kind, "the node opened a channel the proxy does not take");
    reply
        .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
        .await;
}

/// Connects to `node` and logs in as `login` with a fresh one-minute
/// certificate naming the user, session and requests.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn connect(
    proxy: &Arc<SshProxy>,
    shared: Arc<ConnShared>,
    node: &Resource,
    login: &str,
    user: &str,
    session_id: &str,
    request_ids: &[String],
    now: i64,
) -> Result<client::Handle<Upstream>> {
    let (key, cert) = proxy.upstream_identity(user, login, session_id, request_ids, now)?;
    let refused = Arc::new(std::sync::Mutex::new(None));
    let handler = Upstream {
        proxy: proxy.clone(),
        node: node.name.clone(),
        pin: proxy.wicket.config.node_host_keys.get(&node.name).cloned(),
        shared,
        refused: refused.clone(),
    };
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(&node.address),
    )
    .await
    .map_err(|_| Error::Io(format!("connecting to {} timed out", node.address)))?
    .map_err(|e| Error::Io(format!("cannot connect to {}: {e}", node.address)))?;
    let _ = tcp.set_nodelay(true);
    let connected = tokio::time::timeout(
        CONNECT_TIMEOUT,
        client::connect_stream(proxy.client_config.clone(), tcp, handler),
    )
    .await
    .map_err(|_| Error::Io(format!("SSH handshake with {} timed out", node.address)))?;
    let mut handle = match connected {
        Ok(h) => h,
        Err(e) => {
            let why = refused.lock().unwrap_or_else(|e| e.into_inner()).take();
            return Err(Error::Io(
                why.unwrap_or_else(|| format!("SSH handshake failed: {e}")),
            ));
        }
    };
    let auth = tokio::time::timeout(
        CONNECT_TIMEOUT,
        handle.authenticate_openssh_cert(login, Arc::new(key), cert),
    )
    .await
    .map_err(|_| Error::Io("login to the node timed out".into()))?
    .map_err(|e| Error::Io(format!("login to the node failed: {e}")))?;
    if !auth.success() {
        return Err(Error::Io(format!(
            "the node refused Wicket's certificate for login {login:?} (does its sshd trust Wicket's node-login CA, `wicket_node_ca.pub`, and that login? see `wicketd nodes add`; never its user CA)"
        )));
    }
    Ok(handle)
}
