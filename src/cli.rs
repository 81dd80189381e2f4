//! Command-line options.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::replication::tls::LinkSecurityOptions;

/// Parses a size such as `4096`, `512K`, `64M`, `10G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix '{c}' (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 1048576, 512M, 10G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("'{s}' is not an octal mode such as 600 or 660")),
    }
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    let v = parse_size(s)?;
    if !(512..=65536).contains(&v) || !v.is_power_of_two() {
        return Err("block size must be a power of two between 512 and 64K".into());
    }
    Ok(v as u32)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let v: u16 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a queue size"))?;
    if !(2..=32768).contains(&v) || !v.is_power_of_two() {
        return Err("queue size must be a power of two between 2 and 32768".into());
    }
    Ok(v)
}

fn parse_num_queues(s: &str) -> Result<u16, String> {
    let v: u16 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of queues"))?;
    if !(1..=64).contains(&v) {
        return Err("number of queues must be between 1 and 64".into());
    }
    Ok(v)
}

/// The process role as the operator chose it (`--role`): what `main.rs` builds. One of four
/// role types, each for a different thing (docs/architecture.md, "Roles"): the live role
/// object is [`crate::control::Role`], a disk's recorded history
/// [`crate::replication::metadata::DiskRole`], the end that emits an event
/// [`crate::replication::events::Side`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Standalone,
    Primary,
    Secondary,
}

/// How a queue runs its requests (`--io-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoEngineArg {
    /// io_uring when the kernel allows it and the device is a plain raw image, else threads
    Auto,
    /// io_uring per queue (start fails when the kernel refuses it)
    Uring,
    /// synchronous requests plus the --io-threads pool
    Threads,
}

impl From<IoEngineArg> for crate::storage::uring::IoEngine {
    fn from(a: IoEngineArg) -> Self {
        match a {
            IoEngineArg::Auto => Self::Auto,
            IoEngineArg::Uring => Self::Uring,
            IoEngineArg::Threads => Self::Threads,
        }
    }
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// colo-blk: a vhost-user-blk backend with COLO block replication.
///
/// Serves a raw disk image to QEMU over a vhost-user unix socket:
///
///   colo-blk --socket /tmp/vhost.sock --image disk.img --size 1G
///
/// Shows running processes (one or more --qmp sockets):
///
///   colo-blk status [--json] [--watch[=SECS]] /run/colo/p.qmp /run/colo/s.qmp
///
///   qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=1G,share=on
///   -machine memory-backend=mem -chardev socket,id=vub,path=/tmp/vhost.sock
///   -device vhost-user-blk-pci,chardev=vub,num-queues=1 ...
#[derive(Debug, Parser)]
#[command(
    name = "colo-blk",
    version,
    verbatim_doc_comment,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Without a command, the process serves the disk (the options below).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// What this process is: a plain backend, the primary or the secondary of a COLO pair
    #[arg(long, value_enum, default_value = "standalone")]
    pub role: RoleArg,

    /// vhost-user unix socket to listen on (the path QEMU's -chardev socket,path= names).
    /// Required except for a secondary without a Secondary VM.
    #[arg(long, short = 's', value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Permissions of the vhost-user socket (octal; default: as the umask leaves them, which
    /// lets only the owner connect; 660 with --socket-group). QEMU needs write permission
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// Group of the vhost-user socket (name or number), e.g. libvirt-qemu, so that a QEMU
    /// running as another user can connect (colo-blk must be root or in the group)
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// QMP-compatible control socket (unix path)
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,

    /// Permissions of the QMP socket (octal; default owner-only: whoever can connect controls
    /// checkpoints and failover)
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode)]
    pub qmp_mode: u32,

    /// Group of the QMP socket (name or number; with --qmp-mode 660, its members may connect)
    #[arg(long, value_name = "GROUP")]
    pub qmp_group: Option<String>,

    /// primary: the secondary's replication address
    #[arg(long, value_name = "HOST:PORT", help_heading = "Primary")]
    pub peer: Option<String>,

    /// primary: a write completes only once the secondary applied it (default: asynchronous)
    #[arg(long, help_heading = "Primary")]
    pub sync: bool,

    /// primary: most bytes forwarded but not yet acknowledged; guest writes wait beyond it
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size, help_heading = "Primary")]
    pub window: u64,

    /// primary: granularity of the dirty bitmap kept for resynchronisation
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_size, help_heading = "Primary")]
    pub dirty_granularity: u64,

    /// primary: persistent dirty log, so that a restarted primary resyncs what it may have
    /// written since the last checkpoint; secondary: the log a failover starts (and a
    /// failback's sync target offers to its new primary) [default: IMAGE.colo-dirty]
    #[arg(long, value_name = "PATH", help_heading = "Primary")]
    pub dirty_log: Option<PathBuf>,

    /// primary: keep no persistent dirty log (after a primary restart every secondary then
    /// needs a full sync); secondary: a failover keeps none (the old primary then needs a
    /// full sync to come back)
    #[arg(long, help_heading = "Primary")]
    pub no_dirty_log: bool,

    /// primary: extent size of the persistent dirty log (one bit, one sync at the first write
    /// to an extent since it was last cleared)
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_size, help_heading = "Primary")]
    pub dirty_log_extent: u64,

    /// secondary: allow a full sync over this disk when its generations show it is new,
    /// unrelated or stale (otherwise such a primary is refused). Never applies to a split brain
    #[arg(long, help_heading = "Secondary")]
    pub allow_full_sync: bool,

    /// secondary: failback target: give up what this disk wrote since the generation it
    /// shares with the primary (a split brain after a failover); the primary resends the
    /// union of both dirty records (a full sync needs --allow-full-sync too)
    #[arg(long, help_heading = "Secondary")]
    pub discard_my_data: bool,

    /// standalone: serve an image that has replication metadata (a COLO pair's disk) and
    /// record there, before the first write, that it changes outside the pair: as a primary
    /// again it takes a new generation and its secondary needs a full resync
    /// (--allow-full-sync there); as a secondary it is inconsistent until resynced
    #[arg(long)]
    pub detach_replication: bool,

    /// replication metadata file (disk id, generations, last checkpoint, role); standalone:
    /// the one to look for [default: IMAGE.colo-meta]
    #[arg(long, value_name = "PATH")]
    pub meta: Option<PathBuf>,

    /// secondary: address to accept the primary's stream on
    #[arg(long, value_name = "ADDR:PORT", help_heading = "Secondary")]
    pub listen: Option<String>,

    /// secondary: directory for the hidden and active layer files
    #[arg(long, value_name = "DIR", help_heading = "Secondary")]
    pub layer_dir: Option<PathBuf>,

    /// secondary: copy-before-write cluster size of the layers
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_size, help_heading = "Secondary")]
    pub cluster_size: u64,

    /// Replication link: this host's certificate (PEM; with --tls-key and --tls-ca)
    #[arg(long, value_name = "PATH", help_heading = "Replication link")]
    pub tls_cert: Option<PathBuf>,

    /// Replication link: the private key of --tls-cert (PEM)
    #[arg(long, value_name = "PATH", help_heading = "Replication link")]
    pub tls_key: Option<PathBuf>,

    /// Replication link: the CA that signed both sides' certificates (PEM)
    #[arg(long, value_name = "PATH", help_heading = "Replication link")]
    pub tls_ca: Option<PathBuf>,

    /// Replication link: the name the peer's certificate must carry (primary: default the
    /// host of --peer; secondary: the primary's name, unchecked when not given)
    #[arg(long, value_name = "NAME", help_heading = "Replication link")]
    pub tls_peer_name: Option<String>,

    /// Replication link: a secret file both hosts hold (at least 16 bytes); TLS 1.3 with an
    /// identity derived from it, no PKI needed
    #[arg(long, value_name = "PATH", help_heading = "Replication link")]
    pub tls_psk_file: Option<PathBuf>,

    /// Replication link: plain TCP, no authentication, no encryption. Anyone who can reach
    /// the secondary's port can write its disk: only for a trusted, isolated network
    #[arg(long, help_heading = "Replication link")]
    pub insecure_link: bool,

    /// Interval between heartbeats on the replication link
    #[arg(
        long,
        value_name = "MS",
        default_value = "500",
        help_heading = "Replication link"
    )]
    pub heartbeat_ms: u64,

    /// Declare the peer dead after this long without a frame from it
    #[arg(
        long,
        value_name = "MS",
        default_value = "5000",
        help_heading = "Replication link"
    )]
    pub peer_timeout_ms: u64,

    /// Raw disk image (regular file or block device). Required to serve
    #[arg(long, short = 'i', value_name = "PATH", required = true)]
    pub image: Option<PathBuf>,

    /// Create the image with this size when it does not exist (e.g. 1G, 512M); an existing
    /// image or block device must have this size (an error otherwise)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Export the image read-only (writes, discard and write-zeroes fail)
    #[arg(long)]
    pub read_only: bool,

    /// standalone: let other processes started with --share-rw (or --read-only) use the image
    /// at the same time, as QEMU's share-rw=on: a live migration's source and destination
    /// backends on one shared image. Without it the image is this process's alone
    #[arg(long)]
    pub share_rw: bool,

    /// Number of virtqueues; each is served by its own worker thread
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_num_queues)]
    pub num_queues: u16,

    /// Largest virtqueue size the front-end may configure
    #[arg(long, value_name = "N", default_value = "1024", value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Serial number reported to the guest (VIRTIO_BLK_T_GET_ID, at most 20 bytes)
    #[arg(long, value_name = "STRING", default_value = "colo-blk")]
    pub serial: String,

    /// Open the image with O_DIRECT, bypassing the host page cache (cache.direct=on)
    #[arg(long)]
    pub direct: bool,

    /// Threads that run requests when a queue has several pending (0: each queue's worker
    /// runs its requests one at a time)
    #[arg(long, value_name = "N", default_value = "64")]
    pub io_threads: usize,

    /// How queues run reads, writes and flushes of a standalone raw image: auto (io_uring when
    /// the kernel allows it, else the thread pool), uring, or threads. The replication roles
    /// always use threads.
    #[arg(long, value_enum, default_value = "auto")]
    pub io_engine: IoEngineArg,

    /// Longest a queue's worker polls its ring for more requests after a batch, in
    /// nanoseconds, before it sleeps until the next kick; the window adapts below it, as
    /// QEMU's iothread poll-max-ns does (0: never poll). The default is twice QEMU's: a
    /// virtual machine's worker wakes up too slowly for 32 µs to pay (docs/performance.md)
    #[arg(long, value_name = "NS", default_value = "65536",
          value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    pub poll_max_ns: u64,

    /// Logical block size reported to the guest
    #[arg(long, value_name = "BYTES", default_value = "512", value_parser = parse_block_size)]
    pub logical_block_size: u32,

    /// Serve Prometheus metrics over HTTP on this address (GET /metrics), e.g.
    /// 127.0.0.1:9750 (port 0: any free port, shown in the ready line)
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,

    /// Log level (RUST_LOG overrides it)
    #[arg(long, value_enum, default_value = "info")]
    pub log_level: LogLevel,
}

/// The commands beside serving a disk.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show one or more running colo-blk processes (role, link, sync, checkpoints, layers)
    /// from their QMP sockets, like `drbdadm status`
    Status(crate::status::StatusArgs),
    /// Re-protect after a failover: promote the survivor (a failed-over secondary) to the
    /// primary of its old primary's disk, started as `--role secondary --discard-my-data`;
    /// wait for the resync, take the first checkpoint; JSON report on stdout
    Reprotect(crate::reprotect::ReprotectArgs),
    /// Under QEMU's x-colo, on the Secondary VM's host: fail over automatically when the
    /// primary is lost (COLO stream and replication link), after a fence command succeeded;
    /// JSON lines on stdout
    Supervise(crate::supervise::SuperviseArgs),
}

impl Cli {
    /// The image to serve (`--image`; clap requires it unless a command is given).
    pub fn image(&self) -> &std::path::Path {
        self.image.as_deref().unwrap_or(std::path::Path::new(""))
    }

    /// Checks the combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.image.is_none() {
            return Err("--image is required".into());
        }
        if self.serial.len() > 20 {
            return Err("--serial: at most 20 bytes".into());
        }
        if self.read_only && self.size.is_some() && !self.image().exists() {
            return Err("--size creates the image, which --read-only forbids".into());
        }
        // Groups are looked up now, before anything is created.
        self.socket_access()?;
        self.qmp_group_id()?;
        match self.role {
            RoleArg::Standalone | RoleArg::Primary if self.socket.is_none() => {
                return Err("--socket is required".into())
            }
            RoleArg::Primary if self.peer.is_none() => {
                return Err("--role primary needs --peer HOST:PORT".into())
            }
            RoleArg::Secondary if self.listen.is_none() => {
                return Err("--role secondary needs --listen ADDR:PORT".into())
            }
            RoleArg::Secondary if self.layer_dir.is_none() => {
                return Err("--role secondary needs --layer-dir DIR".into())
            }
            _ => {}
        }
        if self.role != RoleArg::Primary && (self.peer.is_some() || self.sync) {
            return Err("--peer and --sync only apply to --role primary".into());
        }
        if self.role != RoleArg::Secondary && (self.listen.is_some() || self.layer_dir.is_some()) {
            return Err("--listen and --layer-dir only apply to --role secondary".into());
        }
        if self.role == RoleArg::Standalone && (self.dirty_log.is_some() || self.no_dirty_log) {
            return Err(
                "--dirty-log and --no-dirty-log only apply to --role primary or secondary".into(),
            );
        }
        if self.dirty_log.is_some() && self.no_dirty_log {
            return Err("--dirty-log and --no-dirty-log exclude each other".into());
        }
        if !self.dirty_log_extent.is_power_of_two() || self.dirty_log_extent < (64 << 10) {
            return Err("--dirty-log-extent must be a power of two of at least 64K".into());
        }
        if self.role != RoleArg::Secondary && self.allow_full_sync {
            return Err("--allow-full-sync only applies to --role secondary".into());
        }
        if self.role != RoleArg::Secondary && self.discard_my_data {
            return Err("--discard-my-data only applies to --role secondary".into());
        }
        if self.role != RoleArg::Standalone && self.detach_replication {
            return Err("--detach-replication only applies to --role standalone".into());
        }
        if self.role != RoleArg::Standalone {
            self.link_security()?;
        } else if self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_ca.is_some()
            || self.tls_psk_file.is_some()
            || self.insecure_link
        {
            return Err(
                "the --tls-* and --insecure-link options only apply to a primary or secondary"
                    .into(),
            );
        }
        if self.role != RoleArg::Standalone && self.read_only {
            return Err("--read-only only applies to --role standalone".into());
        }
        if self.role != RoleArg::Standalone && self.share_rw {
            return Err(
                "--share-rw only applies to --role standalone (a replicated disk has one writer)"
                    .into(),
            );
        }
        if !self.cluster_size.is_power_of_two()
            || self.cluster_size < 4096
            || self.cluster_size > (16 << 20)
        {
            return Err("--cluster-size must be a power of two between 4K and 16M".into());
        }
        if !self.dirty_granularity.is_power_of_two() || self.dirty_granularity < 4096 {
            return Err("--dirty-granularity must be a power of two of at least 4K".into());
        }
        if self.io_threads > 256 {
            return Err("--io-threads: at most 256".into());
        }
        if self.window < (1 << 20) {
            return Err("--window must be at least 1M".into());
        }
        if self.heartbeat_ms == 0 || self.peer_timeout_ms <= self.heartbeat_ms {
            return Err("--peer-timeout-ms must be larger than --heartbeat-ms (> 0)".into());
        }
        Ok(())
    }
}

impl Cli {
    /// How the replication link is protected: exactly one of certificates (--tls-cert,
    /// --tls-key, --tls-ca), a pre-shared key (--tls-psk-file) or --insecure-link.
    /// Who may connect to the vhost-user socket (`--socket-mode`, `--socket-group`).
    pub fn socket_access(&self) -> Result<crate::unix_socket::Access, String> {
        let group = match &self.socket_group {
            Some(g) => {
                Some(crate::unix_socket::group_id(g).map_err(|e| format!("--socket-group: {e}"))?)
            }
            None => None,
        };
        Ok(crate::unix_socket::Access {
            mode: self.socket_mode.or(group.map(|_| 0o660)),
            group,
        })
    }

    /// The group id of `--qmp-group`.
    pub fn qmp_group_id(&self) -> Result<Option<u32>, String> {
        match &self.qmp_group {
            Some(g) => crate::unix_socket::group_id(g)
                .map(Some)
                .map_err(|e| format!("--qmp-group: {e}")),
            None => Ok(None),
        }
    }

    pub fn link_security(&self) -> Result<LinkSecurityOptions, String> {
        let certs = [&self.tls_cert, &self.tls_key, &self.tls_ca];
        let some = certs.iter().filter(|c| c.is_some()).count();
        let modes = usize::from(some > 0)
            + usize::from(self.tls_psk_file.is_some())
            + usize::from(self.insecure_link);
        if modes > 1 {
            return Err(
                "choose one link protection: --tls-cert/--tls-key/--tls-ca, --tls-psk-file or \
                 --insecure-link"
                    .into(),
            );
        }
        if let Some(f) = &self.tls_psk_file {
            return Ok(LinkSecurityOptions::PreSharedKey { file: f.clone() });
        }
        if self.insecure_link {
            return Ok(LinkSecurityOptions::Insecure);
        }
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(LinkSecurityOptions::Certificates {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                peer_name: self.tls_peer_name.clone(),
            }),
            _ if some > 0 => Err("--tls-cert, --tls-key and --tls-ca go together".into()),
            _ => Err(
                "the replication link needs protection: --tls-cert/--tls-key/--tls-ca, \
                 --tls-psk-file, or --insecure-link for plain TCP on a trusted network"
                    .into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn status_is_a_command_and_serving_still_needs_an_image() {
        let c = Cli::try_parse_from(["colo-blk", "status", "--json", "/a.qmp", "/b.qmp"]).unwrap();
        match c.command {
            Some(Command::Status(a)) => {
                assert!(a.json);
                assert_eq!(a.sockets.len(), 2);
            }
            _ => panic!("not status"),
        }
        let c = Cli::try_parse_from([
            "colo-blk",
            "reprotect",
            "--survivor",
            "/s.qmp",
            "--peer",
            "h:1",
        ])
        .unwrap();
        let Some(Command::Reprotect(a)) = c.command else {
            panic!("not reprotect")
        };
        assert_eq!((a.peer.as_str(), a.target), ("h:1", None));
        // Under x-colo: --qemu-qmp needs --x-colo and --migrate-uri; supervise needs a fence.
        let base = [
            "colo-blk",
            "reprotect",
            "--survivor",
            "/s.qmp",
            "--peer",
            "h:1",
        ];
        let no_uri = [&base[..], &["--x-colo", "--qemu-qmp", "/q.qmp"]].concat();
        assert!(Cli::try_parse_from(no_uri).is_err());
        let full = [
            &base[..],
            &["--x-colo", "--qemu-qmp", "/q", "--migrate-uri", "tcp:h:2"],
        ]
        .concat();
        let Some(Command::Reprotect(a)) = Cli::try_parse_from(full).unwrap().command else {
            panic!("not reprotect")
        };
        assert!(a.x_colo && a.migrate_uri.as_deref() == Some("tcp:h:2"));
        let sup = [
            "colo-blk",
            "supervise",
            "--qemu-qmp",
            "/q",
            "--backend-qmp",
            "/b",
        ];
        let e = Cli::try_parse_from(sup).unwrap_err().to_string();
        assert!(e.contains("--fence-cmd"), "{e}");
        let with_fence = [&sup[..], &["--fence-cmd", "true"]].concat();
        let Some(Command::Supervise(a)) = Cli::try_parse_from(with_fence).unwrap().command else {
            panic!("not supervise")
        };
        assert_eq!((a.fence_cmd.as_str(), a.loss_timeout_ms), ("true", 3000));
        // --discard-my-data is the secondary's.
        let c = Cli::try_parse_from([
            "colo-blk",
            "--role",
            "primary",
            "--socket",
            "/s",
            "--image",
            "/i",
            "--peer",
            "h:1",
            "--insecure-link",
            "--discard-my-data",
        ])
        .unwrap();
        assert!(c.validate().unwrap_err().contains("--discard-my-data"));
        let c = Cli::try_parse_from(["colo-blk", "status", "--watch=0.5", "/a.qmp"]).unwrap();
        let Some(Command::Status(a)) = c.command else {
            panic!("no command")
        };
        assert_eq!(a.watch.as_deref(), Some("0.5"));
        // The flat serving invocation is unchanged.
        let c = Cli::try_parse_from(["colo-blk", "--socket", "/s", "--image", "/i"]).unwrap();
        assert!(c.command.is_none());
        assert_eq!(c.image(), std::path::Path::new("/i"));
        c.validate().unwrap();
        let e = Cli::try_parse_from(["colo-blk", "--socket", "/s"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        // Serving options do not mix with a command.
        assert!(Cli::try_parse_from(["colo-blk", "--image", "/i", "status", "/a"]).is_err());
    }
}
