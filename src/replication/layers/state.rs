//! The layer directory's state file, `layers.state`: which layer files are current, for which
//! epoch, in which stage, and where the tentative COLO cuts are. It is replaced atomically
//! (write `layers.state.tmp`, fsync it, rename over the old one, fsync the directory) at every
//! change of the layer set: creation, checkpoint, a COLO marker, the commit of a cut, the start
//! and the end of a failover. Layer files it does not name are left-overs of a crash between
//! creating a file and naming it, and are removed on open.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::replication::protocol::Mark;

/// Name of the state file in the layer directory.
pub(super) const STATE_FILE: &str = "layers.state";
const FORMAT: u32 = 1;

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
        }
    }

    /// Reads the state file of `dir`; `None` when there is none (a fresh directory).
    pub(super) fn load(dir: &Path) -> io::Result<Option<SavedState>> {
        let path = dir.join(STATE_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let st: SavedState = serde_json::from_slice(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is damaged: {e}", path.display()),
            )
        })?;
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
    pub(super) fn store(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, dir.join(STATE_FILE))?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SavedState::load(dir.path()).unwrap(), None);
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
        st.store(dir.path()).unwrap();
        assert_eq!(SavedState::load(dir.path()).unwrap(), Some(st));
        fs::write(dir.path().join(STATE_FILE), b"{ broken").unwrap();
        let e = SavedState::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}
