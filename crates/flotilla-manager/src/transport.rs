//! Raft RPCs between managers: `POST /internal/raft/{append,vote,snapshot}` over the same
//! mTLS HTTP/2 connections the API uses (one pooled connection per peer).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_store::{NodeId, RaftTransport, RpcKind, TransportError};
use hyper::Method;

use flotilla_api::TlsState;

pub struct HttpRaftTransport {
    pub tls: Arc<TlsState>,
}

impl RaftTransport for HttpRaftTransport {
    fn call(
        &self,
        _target: NodeId,
        addr: &str,
        rpc: RpcKind,
        body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, TransportError>> + Send + '_>> {
        let client = self.tls.peer(addr);
        let timeout = match rpc {
            RpcKind::InstallSnapshot => Duration::from_secs(60),
            _ => Duration::from_secs(5),
        };
        Box::pin(async move {
            let client = client.with_timeout(timeout);
            let path = format!("/internal/raft/{}", rpc.path());
            match client.request(Method::POST, &path, Some(body)).await {
                Ok(resp) => Ok(resp.body.to_vec()),
                Err(e) if e.is_unreachable() => Err(TransportError::Unreachable(e.to_string())),
                Err(e) => Err(TransportError::Other(e.to_string())),
            }
        })
    }
}
