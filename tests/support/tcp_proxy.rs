//! A TCP proxy that can cut every connection through it and refuse new ones for a while: the
//! network between an agent (or a client) and warmpool failing, while both ends keep running.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::AbortHandle;

pub struct TcpProxy {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    refusing: Arc<AtomicBool>,
    /// Connections accepted and forwarded.
    pub forwarded: Arc<AtomicUsize>,
    /// Connections refused while refusing.
    pub refused: Arc<AtomicUsize>,
}

impl TcpProxy {
    /// Forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let refusing = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        {
            let (conns, refusing, forwarded, refused) = (
                conns.clone(),
                refusing.clone(),
                forwarded.clone(),
                refused.clone(),
            );
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if refusing.load(Ordering::SeqCst) {
                        refused.fetch_add(1, Ordering::SeqCst);
                        drop(inbound);
                        continue;
                    }
                    forwarded.fetch_add(1, Ordering::SeqCst);
                    let task = tokio::spawn(async move {
                        if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                    });
                    conns.lock().unwrap().push(task.abort_handle());
                }
            });
        }
        TcpProxy {
            addr,
            conns,
            refusing,
            forwarded,
            refused,
        }
    }

    /// Drops every open connection (both sides see it close) and, with `refuse`, refuses new
    /// ones until [`TcpProxy::restore`].
    pub fn cut(&self, refuse: bool) {
        self.refusing.store(refuse, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }
}
