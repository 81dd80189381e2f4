//! The layer directory's state file, `layers.state`: which layer files are current, for which
//! epoch, in which stage, where the tentative COLO cuts are, and whether the layers may hold
//! unsynced changes (`open`, docs/flush-policy.md). It is replaced atomically (write
//! `layers.state.tmp`, fsync it, rename over the old one, fsync the directory) at every change
//! of the layer set (creation, checkpoint, a COLO marker's first change, the commit of a cut,
//! the start and the end of a failover), at the first stream change after the layers were
//! recorded as synced, at a group prepare and at a clean close. Layer files it does not name
//! are left-overs of a crash between creating a file and naming it, and are removed on open.

use std::io;
use std::path::Path;

use crate::storage::durable::{Media, Open, SyncPoint};

use serde::{Deserialize, Serialize};

pub use crate::replication::protocol::Mark;

/// Name of the state file in the layer directory.
pub(super) const STATE_FILE: &str = "layers.state";
/// Format 2 added `open` and `needs_resync` (docs/flush-policy.md). Format 1 files were written
/// while every hidden layer was synced before base changed, so they are read as `"open": null`;
/// a state with `"open": null` and no resync flag is still written as format 1, which older
/// builds read correctly (they ignore the field): a downgrade after a clean stop works, an open
/// state is refused by them instead of trusted.
const FORMAT: u32 = 2;
const FORMAT_SYNCED_LAYERS: u32 = 1;

/// A hidden layer and the markers it started at (none: the epoch's first hidden layer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SavedHidden {
    pub file: String,
    pub marks: Vec<Mark>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum SavedStage {
    Buffering,
    Committing,
    Standalone,
}

/// A group checkpoint this disk is prepared for (docs/consistency-groups.md): at layer epoch
/// `epoch`, with the primary's stream applied up to `applied_seq`, base is the disk of group
/// checkpoint `group`. Valid only while nothing else reaches base: the first stream change
/// after it removes it (durably, before the change is written), a checkpoint turns it into
/// [`GroupCommitted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GroupPrepared {
    pub group: u64,
    pub epoch: u64,
    pub applied_seq: u64,
}

/// The last group checkpoint this disk reached: layer epoch `epoch` is group checkpoint
/// `group`. Current only while the layer epoch is still `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GroupCommitted {
    pub group: u64,
    pub epoch: u64,
}

/// What `layers.state` records about consistency groups (both parts survive restarts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GroupRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<GroupCommitted>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<GroupPrepared>,
}

impl GroupRecord {
    fn is_empty(&self) -> bool {
        *self == GroupRecord::default()
    }
}

/// Everything `layers.state` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SavedState {
    pub format: u32,
    pub capacity: u64,
    pub cluster_size: u64,
    pub epoch: u64,
    pub stage: SavedStage,
    /// The active layer's file (none once standalone).
    pub active: Option<String>,
    /// The hidden layers, oldest first.
    pub hidden: Vec<SavedHidden>,
    /// Consistency groups (absent in files written before them, and when empty).
    #[serde(default, skip_serializing_if = "GroupRecord::is_empty")]
    pub group: GroupRecord,
    /// The disk id (replication metadata) of the disk these layers belong to, 32 hex digits
    /// (absent in files written before it, and for disks without metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_id: Option<String>,
    /// `Some(boot)`: the layers may hold records and data not synced yet, written in the boot
    /// with this tag (`Media::boot_tag`): trusted only by a process of that boot. `None`: every
    /// layer was synced before this file was written (and nothing changed them unsynced since).
    #[serde(default)]
    pub open: Option<u32>,
    /// The layers were dropped after a power loss while open: the view is no checkpoint, a
    /// failover is refused unless forced, until the next checkpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub needs_resync: bool,
}

impl SavedState {
    pub(super) fn new(capacity: u64, cluster_size: u64) -> Self {
        SavedState {
            format: FORMAT,
            capacity,
            cluster_size,
            epoch: 0,
            stage: SavedStage::Buffering,
            active: None,
            hidden: Vec::new(),
            group: GroupRecord::default(),
            disk_id: None,
            open: None,
            needs_resync: false,
        }
    }

    /// The same state, recorded with every layer synced (`"open": null`).
    pub(super) fn synced(mut self) -> Self {
        self.open = None;
        self
    }

    /// The same state with the needs-resync flag `needs` (the disk's current one, mostly).
    pub(super) fn needing_resync(mut self, needs: bool) -> Self {
        self.needs_resync = needs;
        self
    }

    /// Reads the state file of `dir`; `None` when there is none (a fresh directory).
    pub(super) fn load(media: &dyn Media, dir: &Path) -> io::Result<Option<SavedState>> {
        let path = dir.join(STATE_FILE);
        let text = match media.read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut st: SavedState = serde_json::from_slice(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is damaged: {e}", path.display()),
            )
        })?;
        if st.format == FORMAT_SYNCED_LAYERS {
            st.format = FORMAT;
            st.open = None;
        }
        if st.format != FORMAT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} has format {} (this build reads {FORMAT})",
                    path.display(),
                    st.format
                ),
            ));
        }
        Ok(Some(st))
    }

    /// Replaces the state file of `dir` atomically and durably.
    pub(super) fn store(&self, media: &dyn Media, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut st = self.clone();
        st.format = if st.open.is_none() && !st.needs_resync {
            FORMAT_SYNCED_LAYERS
        } else {
            FORMAT
        };
        let text = serde_json::to_vec_pretty(&st).map_err(io::Error::other)?;
        {
            let f = media.open(&tmp, Open::Truncate)?;
            f.write_at(&text, 0)?;
            f.sync_all(SyncPoint::StateTmp)?;
        }
        // No directory sync before the rename: a file system may persist the rename and not
        // the creation of a layer file the new state names, but only a state that says
        // `"open"` names a file created since the last state change, and after a power loss
        // such a state is not trusted (its layers are dropped). A state that says `null`
        // names files whose creation an earlier state change's directory sync made durable.
        media.rename(&tmp, &dir.join(STATE_FILE))?;
        media.sync_dir(dir, SyncPoint::StateDir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::durable::StdMedia;
    use std::fs;

    #[test]
    fn stores_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SavedState::load(&StdMedia, dir.path()).unwrap(), None);
        let mut st = SavedState::new(1 << 20, 4096);
        st.epoch = 3;
        st.active = Some("active-4.img".into());
        st.hidden = vec![
            SavedHidden {
                file: "hidden-4.img".into(),
                marks: vec![],
            },
            SavedHidden {
                file: "hidden-5.img".into(),
                marks: vec![Mark {
                    epoch: 4,
                    bases: vec![Some(7), None],
                }],
            },
        ];
        st.store(&StdMedia, dir.path()).unwrap();
        assert_eq!(
            SavedState::load(&StdMedia, dir.path()).unwrap(),
            Some(st.clone())
        );
        // Without a group record the file is what older builds wrote; with one it round-trips.
        assert!(!fs::read_to_string(dir.path().join(STATE_FILE))
            .unwrap()
            .contains("group"));
        st.group = GroupRecord {
            committed: Some(GroupCommitted { group: 4, epoch: 3 }),
            prepared: Some(GroupPrepared {
                group: 5,
                epoch: 3,
                applied_seq: 99,
            }),
        };
        st.store(&StdMedia, dir.path()).unwrap();
        assert_eq!(
            SavedState::load(&StdMedia, dir.path()).unwrap(),
            Some(st.clone())
        );
        // Synced layers are written as format 1 (older builds read them); open ones as 2.
        let format = |d: &Path| -> u64 {
            let v: serde_json::Value =
                serde_json::from_slice(&fs::read(d.join(STATE_FILE)).unwrap()).unwrap();
            v["format"].as_u64().unwrap()
        };
        assert_eq!(format(dir.path()), 1);
        st.open = Some(7);
        st.store(&StdMedia, dir.path()).unwrap();
        assert_eq!(format(dir.path()), 2);
        assert_eq!(
            SavedState::load(&StdMedia, dir.path()).unwrap(),
            Some(st.clone())
        );
        st.open = None;
        st.needs_resync = true;
        st.store(&StdMedia, dir.path()).unwrap();
        assert_eq!(format(dir.path()), 2);
        assert_eq!(SavedState::load(&StdMedia, dir.path()).unwrap(), Some(st));
        fs::write(dir.path().join(STATE_FILE), b"{ broken").unwrap();
        let e = SavedState::load(&StdMedia, dir.path()).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}
