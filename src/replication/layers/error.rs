//! The disk buffer's refusals, typed: the secondary decides on them (a group commit that is
//! not prepared is `NotPrepared` to its caller, not an I/O failure). Everything else is the
//! media's `io::Error`, carried as it is. [`io::Error`] is made only where the I/O world
//! begins (the stream applier, the `BlockDevice` side), with the kinds the refusals had.

use std::io;

use super::GroupPrepared;

/// Errors of the layered disk's operations (checkpoints, COLO cuts, group checkpoints,
/// failover). The texts are what operators see (docs/user-guide.md, "Troubleshooting").
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A group commit for a group checkpoint the disk is not prepared for at this epoch
    /// (docs/consistency-groups.md): nothing changed.
    #[error("not prepared for group checkpoint {group} at epoch {epoch} (prepared: {prepared:?})")]
    NotPrepared {
        group: u64,
        epoch: u64,
        prepared: Option<GroupPrepared>,
    },
    /// A COLO commit of a marker no hidden layer (and no pending marker) starts at.
    #[error("no tentative cut for epoch {0}")]
    NoTentativeCut(u64),
    /// The stream, a checkpoint or a cut after `failover()`.
    #[error("replication is over: the secondary has failed over")]
    ReplicationOver,
    /// An unforced failover of layers dropped after a power loss (docs/flush-policy.md).
    #[error(
        "the secondary lost power while its layers held unsynced changes: its disk is no \
         checkpoint until the primary has resent its changes and a checkpoint followed; fail \
         over with force to take it as it is (crash-consistent)"
    )]
    NeedsResync,
    /// [`super::LayeredDisk::set_through`] before a failover.
    #[error("the disk buffer has not failed over")]
    NotFailedOver,
    /// [`super::LayeredDisk::replace_through`] while the failover still commits.
    #[error("the disk buffer has not finished its failover")]
    FailoverUnfinished,
    /// The media failed (or refused) underneath.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl LayerError {
    /// The `io::ErrorKind` this error has as an [`io::Error`] (the refusals' kinds from
    /// before they were typed: a refusal of the caller's request is `InvalidInput`).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            LayerError::NotPrepared { .. }
            | LayerError::NeedsResync
            | LayerError::NotFailedOver
            | LayerError::FailoverUnfinished => io::ErrorKind::InvalidInput,
            LayerError::NoTentativeCut(_) => io::ErrorKind::NotFound,
            LayerError::ReplicationOver => io::ErrorKind::Other,
            LayerError::Io(e) => e.kind(),
        }
    }
}

impl From<LayerError> for io::Error {
    fn from(e: LayerError) -> io::Error {
        match e {
            LayerError::Io(e) => e,
            e => io::Error::new(e.kind(), e),
        }
    }
}

/// The secondary's operations carry the disk buffer's errors as they carried them before they
/// were typed (`I/O: …`); the one it decides on, [`LayerError::NotPrepared`], it matches
/// before this (`Secondary::commit_group`).
impl From<LayerError> for crate::replication::secondary::SecondaryError {
    fn from(e: LayerError) -> Self {
        Self::Io(e.into())
    }
}
