//! `vdisk serve`: open the image, claim the socket, serve frontends until a signal.

use std::sync::{Arc, Mutex};

use common::server::{serve_forever, SessionHooks};
use tracing::{error, info};
use vhost_user_backend::VhostUserDaemon;

use crate::backend::BlkBackend;
use crate::config::ServeConfig;
use crate::device::Device;
use crate::image::{Format, FormatKind, ImageError, RawImage};
use crate::open::Access;
use crate::qcow2::{OpenOptions, Qcow2};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Qcow2(#[from] crate::qcow2::Qcow2Error),
    #[error(transparent)]
    Socket(#[from] common::socket::SocketError),
    #[error(transparent)]
    Server(#[from] common::server::ServerError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the control socket thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}: --dedupe needs a qcow2 image (raw images have no refcounts to share clusters with); convert it with `vdisk image convert` first")]
    DedupeNeedsQcow2(std::path::PathBuf),
}

struct Hooks(BlkBackend);

impl SessionHooks<BlkBackend> for Hooks {
    fn attach(&self, daemon: &VhostUserDaemon<BlkBackend>) -> Result<(), String> {
        self.0.attach(daemon)
    }

    fn detached(&self) {
        self.0.detached();
    }
}

pub fn run(cfg: ServeConfig) -> Result<(), ServeError> {
    let termination = common::shutdown::Termination::install().map_err(ServeError::Signals)?;
    // The one open of the image: probing, qcow2 metadata and the engines share it, and it
    // is locked before anything is read, as QEMU locks it.
    let opened = crate::open::open_image(&cfg.image, !cfg.readonly).map_err(ImageError::from)?;
    let access = if cfg.readonly {
        Access::Read
    } else {
        Access::Write
    };
    crate::open::lock(&opened, &cfg.image, access).map_err(ImageError::from)?;
    let qcow2 = match cfg.format {
        FormatKind::Qcow2 => true,
        FormatKind::Raw => false,
        FormatKind::Auto => crate::image::looks_like_qcow2(&opened, &cfg.image)?,
    };
    let format = if qcow2 {
        let opts = OpenOptions {
            read_only: cfg.readonly,
            dedupe_index_bytes: cfg.dedupe_index_bytes,
            backing_dirs: cfg.backing_dirs.clone(),
            format_probed: cfg.format == FormatKind::Auto,
            ..OpenOptions::default()
        };
        let mut img =
            Qcow2::from_file(crate::image::share(&opened, &cfg.image)?, &cfg.image, &opts)?;
        if cfg.dedupe {
            img.enable_dedupe(cfg.dedupe_index_bytes)?;
        }
        Format::Qcow2(Box::new(Mutex::new(img)))
    } else {
        if cfg.dedupe {
            return Err(ServeError::DedupeNeedsQcow2(cfg.image.clone()));
        }
        Format::Raw
    };
    let image = Arc::new(RawImage::new(opened, &cfg.image, cfg.readonly, cfg.direct)?);
    let dev = Device::new(
        image.clone(),
        format,
        cfg.num_queues,
        cfg.queue_size,
        &cfg.serial,
        std::time::Duration::from_micros(u64::from(cfg.poll_us)),
    );
    let backend = BlkBackend::new(dev, cfg.engine);
    let mut claimed = common::socket::claim(&cfg.socket, &cfg.socket_perms)?;
    let control = common::socket::claim(&cfg.control_socket, &cfg.control_access.socket_perms())?;

    let files = [claimed.files(), control.files()];
    let on_signal = backend.clone();
    termination
        .on_signal(move |_| {
        let code = match on_signal.shutdown() {
            Ok(()) => 0,
            Err(e) => {
                error!(image = %on_signal.device().image.path().display(), "final flush failed: {e}");
                1
            }
        };
        for f in &files {
            f.remove();
        }
        info!("exiting");
        std::process::exit(code);
    })
    .map_err(ServeError::Signals)?;

    info!(
        image = %image.path().display(),
        format = if qcow2 { "qcow2" } else { "raw" },
        size = backend.device().limits.capacity_sectors << crate::request::SECTOR_SHIFT,
        block_device = image.is_block_device(),
        readonly = cfg.readonly,
        direct = cfg.direct,
        queues = cfg.num_queues,
        queue_size = cfg.queue_size,
        poll_us = cfg.poll_us,
        engine = ?backend.engine_kind(),
        inline_writes = !image.nowait_writes() && backend.engine_kind() == crate::engine::EngineKind::IoUring,
        socket = %cfg.socket.display(),
        "vdisk serving"
    );
    let ctl_backend = backend.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || crate::ctl::serve(ctl_backend, control, &cfg.control_access))
        .map_err(ServeError::Thread)?;
    info!(socket = %cfg.control_socket.display(), "control socket ready");
    let socket = cfg.socket.display().to_string();
    let hooks = Hooks(backend.clone());
    let listener = &mut claimed.listener;
    serve_forever(
        "vdisk",
        &socket,
        |d| d.start(listener).map_err(|e| e.to_string()),
        backend,
        &hooks,
    )?;
    Ok(())
}
