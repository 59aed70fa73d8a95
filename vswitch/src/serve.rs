//! `vswitch serve`: one vhost-user-net backend per port, all in this process, each port
//! accepting its guest again after a disconnect.

use std::sync::Arc;

use common::server::{serve_forever, SessionHooks};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;

use common::socket::ClaimedSocket;
use std::os::fd::AsRawFd;
use tracing::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vmm_sys_util::epoll::EventSet;

use crate::backend::PortBackend;
use crate::config::{PortMode, SwitchConfig};
use crate::pmd::{PmdError, Pmds};
use crate::policy::qos::PortQos;
use crate::policy::service::ServicePort;
use crate::port::PortSpec;
use crate::switch::Switch;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("port {port}: qos: {source}")]
    Qos {
        port: String,
        source: crate::policy::qos::QosError,
    },
    #[error(transparent)]
    Pmd(#[from] PmdError),
    #[error(transparent)]
    Socket(#[from] common::socket::SocketError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the thread of port {port}: {source}")]
    Thread {
        port: String,
        source: std::io::Error,
    },
}

struct Hooks {
    switch: Arc<Switch>,
    pmds: Arc<Pmds>,
    port: usize,
    /// The rate-limit timer's id in the worker's epoll set.
    timer_event: u16,
}

impl SessionHooks<PortBackend> for Hooks {
    fn attach(&self, daemon: &VhostUserDaemon<PortBackend>) -> Result<(), String> {
        let fd = self.switch.ports[self.port].qos().timer.as_raw_fd();
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(fd, EventSet::IN, u64::from(self.timer_event))
                .map_err(|e| format!("cannot watch the rate-limit timer: {e}"))?;
        }
        Ok(())
    }

    fn detached(&self) {
        // The forwarding thread lets go of the old rings before the port forgets them.
        self.pmds.remove(self.port);
        self.switch.port_detached(self.port);
        let p = &self.switch.ports[self.port];
        let counters = common::memory::nonzero_counters(&p.stats.snapshot());
        info!(port = %p.spec.name, "guest disconnected; counters: {counters}");
    }
}

/// Where a port's frontends come from.
enum Frontends {
    /// vswitch listens; QEMU connects (and reconnects).
    Listen(ClaimedSocket),
    /// QEMU listens (`-chardev socket,server=on`); vswitch connects, and connects again
    /// after the session ends, for as long as it runs.
    Connect(PathBuf),
}

/// How long a client-mode port waits between attempts to reach its QEMU.
const RECONNECT_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

impl Frontends {
    fn next(&self, port: &str, waiting: &mut bool) -> Option<UnixStream> {
        match self {
            Frontends::Listen(sock) => match sock.listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    error!(port, "cannot accept a frontend: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    None
                }
            },
            Frontends::Connect(path) => match UnixStream::connect(path) {
                Ok(s) => {
                    info!(port, socket = %path.display(), "connected to the frontend");
                    *waiting = false;
                    Some(s)
                }
                Err(e) => {
                    if !*waiting {
                        info!(port, socket = %path.display(), "waiting for the frontend: {e}");
                        *waiting = true;
                    }
                    std::thread::sleep(RECONNECT_DELAY);
                    None
                }
            },
        }
    }
}

/// Take one frontend at a time and relay it to the port's backend until the session ends.
/// Each session's backend end is a connection nobody else can make: the library accepts
/// only on a listener, so it gets one that holds just this connection
/// ([`common::socket::private_connection`]).
fn frontend_loop(frontends: Frontends, sessions: mpsc::Sender<Listener>, port: &str) {
    let mut waiting = false;
    loop {
        let Some(frontend) = frontends.next(port, &mut waiting) else {
            continue;
        };
        let (listener, backend) = match common::socket::private_connection() {
            Ok(pair) => pair,
            Err(e) => {
                error!(
                    port,
                    "cannot connect the frontend to the port's backend: {e}"
                );
                // Dropping the frontend makes QEMU retry: not in a tight loop.
                std::thread::sleep(RECONNECT_DELAY);
                continue;
            }
        };
        if sessions.send(listener).is_err() {
            error!(
                port,
                "the port's backend has stopped; refusing the frontend"
            );
            return;
        }
        if let Err(e) = crate::relay::run(frontend, backend) {
            warn!(port, "frontend session relay ended: {e}");
        }
    }
}

pub fn run(cfg: SwitchConfig) -> Result<(), ServeError> {
    let termination = common::shutdown::Termination::install().map_err(ServeError::Signals)?;
    let mut specs = Vec::with_capacity(cfg.ports.len());
    for p in &cfg.ports {
        let qos = PortQos::new(&p.qos).map_err(|e| ServeError::Qos {
            port: p.name.clone(),
            source: e,
        })?;
        let spec = PortSpec {
            name: p.name.clone(),
            vlan: p.vlan.clone(),
            mac: p.mac,
            anti_spoof: p.anti_spoof,
            mtu: p.mtu,
            queues: p.queues,
            offloads: p.offloads,
        };
        specs.push((spec, qos));
    }
    let limits = cfg.ports.iter().map(|p| p.mac_limit).collect();
    let services = cfg
        .vlans
        .iter()
        .filter_map(|v| {
            v.service_ip.map(|ip| {
                info!(vlan = v.id, ip = %ip, mac = %ServicePort::mac_for(v.id), "service endpoint");
                ServicePort::new(v.id, ip.addr, ip.prefix_len)
            })
        })
        .collect();
    let switch = Arc::new(Switch::new(
        specs,
        services,
        cfg.switch.mac_table_size,
        cfg.switch.mac_aging,
        limits,
    ));

    let pmds = Pmds::start(switch.clone(), &cfg.switch.pmd)?;
    info!(
        threads = cfg.switch.pmd.threads,
        cores = ?cfg.switch.pmd.cores,
        poll_us = cfg.switch.pmd.poll.as_micros() as u64,
        "forwarding threads started"
    );

    // Claim every socket before serving any, so a bad path fails the start, not a port.
    let mut claimed = Vec::new();
    for p in &cfg.ports {
        claimed.push(match p.mode {
            PortMode::Server => {
                Frontends::Listen(common::socket::claim(&p.socket, &p.socket_perms)?)
            }
            PortMode::Client => Frontends::Connect(p.socket.clone()),
        });
    }
    if let Some(dir) = cfg.switch.control_socket.parent() {
        // The default lives in /run/vswitch, which may not exist yet.
        let _ = std::fs::create_dir_all(dir);
    }
    let access = cfg.switch.control_access.clone();
    let control = common::socket::claim(&cfg.switch.control_socket, &access.socket_perms())?;
    let mut files: Vec<_> = claimed
        .iter()
        .filter_map(|c| match c {
            Frontends::Listen(sock) => Some(sock.files()),
            Frontends::Connect(_) => None,
        })
        .collect();
    files.push(control.files());
    termination
        .on_signal(move |_| {
            for f in &files {
                f.remove();
            }
            info!("exiting");
            std::process::exit(0);
        })
        .map_err(ServeError::Signals)?;

    let mut threads = Vec::new();
    let ctl_switch = switch.clone();
    let qos: Vec<_> = cfg.ports.iter().map(|p| p.qos).collect();
    info!(socket = %cfg.switch.control_socket.display(), "control socket ready");
    threads.push(
        std::thread::Builder::new()
            .name("control".into())
            .spawn({
                let pmds = pmds.clone();
                move || crate::ctl::serve(ctl_switch, pmds, qos, control, &access)
            })
            .map_err(|source| ServeError::Thread {
                port: "control".into(),
                source,
            })?,
    );
    for (index, sock) in claimed.into_iter().enumerate() {
        let name = cfg.ports[index].name.clone();
        let socket = cfg.ports[index].socket.display().to_string();
        let switch = switch.clone();
        let pmds = pmds.clone();
        info!(port = %name, socket = %socket, vlan = ?switch.ports[index].spec.vlan, "port ready");
        let (sessions, next_session) = mpsc::channel::<Listener>();
        let relay_name = name.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("accept-{name}"))
            .spawn(move || frontend_loop(sock, sessions, &relay_name))
            .map_err(|source| ServeError::Thread {
                port: name.clone(),
                source,
            })?;
        threads.push(acceptor);
        let t = std::thread::Builder::new()
            .name(format!("port-{name}"))
            .spawn(move || {
                let backend = PortBackend::new(switch.clone(), pmds.clone(), index);
                let hooks = Hooks {
                    switch,
                    pmds,
                    port: index,
                    timer_event: backend.timer_event(),
                };
                let start = |d: &mut VhostUserDaemon<PortBackend>| {
                    let mut listener = next_session
                        .recv()
                        .map_err(|_| "the frontend acceptor has stopped".to_string())?;
                    d.start(&mut listener).map_err(|e| e.to_string())
                };
                if let Err(e) = serve_forever("vswitch", &socket, start, backend, &hooks) {
                    error!(port = %name, "port stopped: {e}");
                }
            })
            .map_err(|source| ServeError::Thread {
                port: cfg.ports[index].name.clone(),
                source,
            })?;
        threads.push(t);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
