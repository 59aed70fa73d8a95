//! `vdisk serve` options: from the command line, optionally over a TOML file's `[serve]`
//! table, checked into a [`ServeConfig`].

use std::path::{Path, PathBuf};

use clap::Args;
use common::access::{AccessError, PeerPolicy, SocketPerms};
use serde::Deserialize;

use crate::engine::EngineKind;
use crate::image::FormatKind;
use crate::request::ID_BYTES;

pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The library maps queues to threads with a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;
pub const DEFAULT_POLL_US: u32 = 20;
const MAX_POLL_US: u32 = 1000;

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML file with a [serve] table; command-line options override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The image: a regular file or a block device, raw or qcow2.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The image's format. `auto` reads the file's first bytes, and refuses a qcow2 image
    /// that names a backing file (a guest can write such a header into a raw disk): pin
    /// `qcow2` for linked clones, `raw` for raw disks [default: auto].
    #[arg(long, value_enum)]
    pub format: Option<FormatKind>,
    /// A directory besides the image's own where its backing files may live (every file of
    /// the chain must be a regular file inside one of them); repeat for more. Overrides
    /// serve.backing_dirs of the config file.
    #[arg(long = "backing-dir", value_name = "DIR")]
    pub backing_dirs: Vec<PathBuf>,
    /// Unix socket to listen on for the vhost-user frontend.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Unix socket for `vdisk ctl` [default: the --socket path with `.ctl` appended].
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// Mode of the vhost-user socket, in octal: connecting needs write access
    /// [default: 0600, whatever the umask].
    #[arg(long)]
    pub socket_mode: Option<String>,
    /// Owner (user name or uid) of the vhost-user socket, e.g. the user QEMU runs as.
    #[arg(long)]
    pub socket_owner: Option<String>,
    /// Group (name or gid) of the vhost-user socket.
    #[arg(long)]
    pub socket_group: Option<String>,
    /// A user (name or uid) allowed on the control socket besides root and vdisk's own
    /// user; may be repeated.
    #[arg(long = "control-user")]
    pub control_users: Vec<String>,
    /// A group whose members may use the control socket; may be repeated.
    #[arg(long = "control-group")]
    pub control_groups: Vec<String>,
    /// Export read-only (VIRTIO_BLK_F_RO).
    #[arg(long)]
    pub readonly: bool,
    /// Number of virtqueues, each served by its own thread [default: 1].
    #[arg(long)]
    pub num_queues: Option<u16>,
    /// Largest virtqueue size offered, a power of two up to 1024 [default: 256].
    #[arg(long)]
    pub queue_size: Option<u16>,
    /// I/O engine; io_uring falls back to sync when the kernel refuses it [default: io_uring].
    #[arg(long, value_enum)]
    pub engine: Option<EngineKind>,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// Serial number returned by GET_ID (up to 20 bytes) [default: vdisk].
    #[arg(long)]
    pub serial: Option<String>,
    /// Microseconds a queue thread keeps polling its ring after the last request before
    /// sleeping, 0 to 1000. Polling saves kicks and wakeups on a busy queue; it pauses by
    /// itself while the core is contended [default: 20].
    #[arg(long)]
    pub poll_us: Option<u32>,
    /// Deduplicate whole-cluster writes of a qcow2 image inline; the image is marked, so
    /// later serves keep doing it (images made with `vdisk image create --dedupe` are
    /// already marked).
    #[arg(long)]
    pub dedupe: bool,
    /// Memory budget of the dedupe index in MiB, 1 to 65536: 4 bytes per cluster
    /// indexed; when full, the oldest entries go [default: 64].
    #[arg(long)]
    pub dedupe_index_mib: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileServe {
    image: Option<PathBuf>,
    format: Option<FormatKind>,
    backing_dirs: Option<Vec<PathBuf>>,
    socket: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_owner: Option<String>,
    socket_group: Option<String>,
    control_users: Option<Vec<String>>,
    control_groups: Option<Vec<String>>,
    readonly: Option<bool>,
    num_queues: Option<u16>,
    queue_size: Option<u16>,
    engine: Option<EngineKind>,
    direct: Option<bool>,
    serial: Option<String>,
    poll_us: Option<u32>,
    dedupe: Option<bool>,
    dedupe_index_mib: Option<u64>,
}

/// Other tables (for example the demo's) may share the file.
#[derive(Deserialize, Debug, Default)]
struct FileConfig {
    #[serde(default)]
    serve: FileServe,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub image: PathBuf,
    pub format: FormatKind,
    /// Where backing files may live besides the image's directory.
    pub backing_dirs: Vec<PathBuf>,
    pub socket: PathBuf,
    pub control_socket: PathBuf,
    pub socket_perms: SocketPerms,
    pub control_access: PeerPolicy,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub engine: EngineKind,
    pub direct: bool,
    pub serial: String,
    pub poll_us: u32,
    pub dedupe: bool,
    pub dedupe_index_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("missing {0}: give --{0} or set serve.{0} in --config FILE")]
    Missing(&'static str),
    #[error("{key}: {source}")]
    Access {
        key: &'static str,
        source: AccessError,
    },
    #[error("{key} = {value}: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

fn load_file(path: &Path) -> Result<FileServe, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parsed: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(parsed.serve)
}

/// `SOCKET.ctl` next to the vhost-user socket.
pub fn default_control_socket(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(args: ServeArgs) -> Result<ServeConfig, ConfigError> {
        let file = match &args.config {
            Some(p) => load_file(p)?,
            None => FileServe::default(),
        };
        let image = args
            .image
            .or(file.image)
            .ok_or(ConfigError::Missing("image"))?;
        let socket = args
            .socket
            .or(file.socket)
            .ok_or(ConfigError::Missing("socket"))?;
        let num_queues = args.num_queues.or(file.num_queues).unwrap_or(1);
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(ConfigError::Invalid {
                key: "num-queues",
                value: num_queues.to_string(),
                why: "must be between 1 and 64",
            });
        }
        let queue_size = args
            .queue_size
            .or(file.queue_size)
            .unwrap_or(DEFAULT_QUEUE_SIZE);
        if !queue_size.is_power_of_two() || !(4..=1024).contains(&queue_size) {
            return Err(ConfigError::Invalid {
                key: "queue-size",
                value: queue_size.to_string(),
                why: "must be a power of two between 4 and 1024",
            });
        }
        let serial = args
            .serial
            .or(file.serial)
            .unwrap_or_else(|| "vdisk".to_string());
        if serial.len() > ID_BYTES {
            return Err(ConfigError::Invalid {
                key: "serial",
                value: serial,
                why: "must be at most 20 bytes",
            });
        }
        let poll_us = args.poll_us.or(file.poll_us).unwrap_or(DEFAULT_POLL_US);
        if poll_us > MAX_POLL_US {
            return Err(ConfigError::Invalid {
                key: "poll-us",
                value: poll_us.to_string(),
                why: "must be at most 1000",
            });
        }
        let dedupe_index_mib = args
            .dedupe_index_mib
            .or(file.dedupe_index_mib)
            .unwrap_or(crate::qcow2::DEFAULT_INDEX_BYTES >> 20);
        if !(1..=65536).contains(&dedupe_index_mib) {
            return Err(ConfigError::Invalid {
                key: "dedupe-index-mib",
                value: dedupe_index_mib.to_string(),
                why: "must be between 1 and 65536",
            });
        }
        let dedupe = args.dedupe || file.dedupe.unwrap_or(false);
        let readonly = args.readonly || file.readonly.unwrap_or(false);
        if dedupe && readonly {
            return Err(ConfigError::Invalid {
                key: "dedupe",
                value: "true".into(),
                why: "a read-only export writes nothing to deduplicate",
            });
        }
        let control_socket = args
            .control_socket
            .or(file.control_socket)
            .unwrap_or_else(|| default_control_socket(&socket));
        let socket_perms = SocketPerms::default()
            .parse(
                args.socket_mode.or(file.socket_mode).as_deref(),
                args.socket_owner.or(file.socket_owner).as_deref(),
                args.socket_group.or(file.socket_group).as_deref(),
            )
            .map_err(|source| ConfigError::Access {
                key: match source {
                    AccessError::Mode(_) => "socket-mode",
                    AccessError::NoUser(_) => "socket-owner",
                    AccessError::NoGroup(_) => "socket-group",
                },
                source,
            })?;
        // The command line's lists replace the file's, as its other options do.
        let pick = |cli: Vec<String>, file: Option<Vec<String>>| match cli.is_empty() {
            true => file.unwrap_or_default(),
            false => cli,
        };
        let control_access = PeerPolicy::parse(
            &pick(args.control_users, file.control_users),
            &pick(args.control_groups, file.control_groups),
        )
        .map_err(|source| ConfigError::Access {
            key: match source {
                AccessError::NoGroup(_) => "control-group",
                _ => "control-user",
            },
            source,
        })?;
        let backing_dirs = if args.backing_dirs.is_empty() {
            file.backing_dirs.unwrap_or_default()
        } else {
            args.backing_dirs
        };
        Ok(ServeConfig {
            image,
            format: args.format.or(file.format).unwrap_or(FormatKind::Auto),
            backing_dirs,
            socket,
            control_socket,
            socket_perms,
            control_access,
            readonly,
            num_queues,
            queue_size,
            engine: args.engine.or(file.engine).unwrap_or(EngineKind::IoUring),
            direct: args.direct || file.direct.unwrap_or(false),
            serial,
            poll_us,
            dedupe,
            dedupe_index_bytes: dedupe_index_mib << 20,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(image: &str, socket: &str) -> ServeArgs {
        ServeArgs {
            image: Some(image.into()),
            socket: Some(socket.into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults() {
        let c = ServeConfig::try_from(args("a.img", "s.sock")).expect("valid");
        assert_eq!(c.num_queues, 1);
        assert_eq!(c.queue_size, 256);
        assert_eq!(c.engine, EngineKind::IoUring);
        assert_eq!(c.serial, "vdisk");
        assert_eq!(c.format, FormatKind::Auto);
        assert_eq!(c.control_socket, PathBuf::from("s.sock.ctl"));
        assert!(!c.readonly && !c.direct);
    }

    #[test]
    fn missing_image_names_the_option() {
        let e = ServeConfig::try_from(ServeArgs {
            socket: Some("s".into()),
            ..Default::default()
        })
        .expect_err("must fail");
        assert!(e.to_string().contains("--image"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        let mut a = args("a", "s");
        a.num_queues = Some(0);
        assert!(ServeConfig::try_from(a).is_err());
        let mut a = args("a", "s");
        a.queue_size = Some(100);
        assert!(ServeConfig::try_from(a).is_err());
        let mut a = args("a", "s");
        a.serial = Some("x".repeat(21));
        assert!(ServeConfig::try_from(a).is_err());
    }

    #[test]
    fn file_then_command_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.toml");
        std::fs::write(
            &path,
            "[serve]\nimage = \"f.img\"\nsocket = \"f.sock\"\nnum_queues = 4\nengine = \"sync\"\nbacking_dirs = [\"/golden\", \"/base\"]\n\n[demo]\nsize = \"1G\"\n",
        )
        .expect("write");
        let c = ServeConfig::try_from(ServeArgs {
            config: Some(path.clone()),
            socket: Some("cli.sock".into()),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(c.image, PathBuf::from("f.img"));
        assert_eq!(c.socket, PathBuf::from("cli.sock"));
        assert_eq!(c.num_queues, 4);
        assert_eq!(c.engine, EngineKind::Sync);
        assert_eq!(
            c.backing_dirs,
            [PathBuf::from("/golden"), PathBuf::from("/base")]
        );
        let c = ServeConfig::try_from(ServeArgs {
            config: Some(path.clone()),
            backing_dirs: vec!["/cli".into()],
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(c.backing_dirs, [PathBuf::from("/cli")]);

        std::fs::write(&path, "[serve]\nimgae = \"typo\"\n").expect("write");
        let e = ServeConfig::try_from(ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .expect_err("unknown key");
        assert!(e.to_string().contains("imgae"), "{e}");
    }
}
