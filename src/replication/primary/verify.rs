//! Online verify (`replication-verify`): the primary sends, in stream order, the crc32c of each
//! range of its disk; the secondary compares its own disk at that point of the stream and
//! answers. Mismatched ranges are marked dirty (in memory and in the persistent log) and resent
//! at once, like a resync.
//!
//! ```text
//!  verify thread: for each 1 MiB range ─[order lock: wait for registered changes over it,
//!                 read, crc32c, queue VERIFY{seq, offset, len, crc}]─►  secondary: crc of its
//!  reader:        VERIFY_RESULT{offset, len, match} ◄──────────────────  disk, same point
//!                 last result: REPLICATION_VERIFY_DONE; mismatches → resync of those ranges
//! ```

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use log::{info, warn};

use super::{events, Primary, ReplicationError, Side, Verify, VERIFY_RANGE};
use crate::replication::dirty::DirtyBitmap;
use crate::replication::protocol::{Frame, HEADER_LEN};

impl Primary {
    /// `replication-verify`: starts comparing the whole disk with the secondary's (returns at
    /// once; progress in `query-replication`, `REPLICATION_VERIFY_DONE` at the end).
    pub fn verify(self: &Arc<Self>) -> Result<u64, ReplicationError> {
        let id = {
            let st = self.state();
            let s = st.link.session().ok_or(ReplicationError::NotConnected)?;
            if s.resync_remaining > 0 {
                return Err(ReplicationError::Invalid(
                    "resynchronisation in progress; verify after it completes".into(),
                ));
            }
            s.id
        };
        let total = self.local.capacity().div_ceil(VERIFY_RANGE);
        {
            let mut v = self.verify_state();
            if v.state == Some("running") {
                return Err(ReplicationError::Invalid(
                    "a verify is already running".into(),
                ));
            }
            *v = Verify {
                session: id,
                state: Some("running"),
                total,
                ..Verify::default()
            };
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("colo-verify".into())
            .spawn(move || me.verify_send(id))?;
        Ok(total)
    }

    /// Queues one VERIFY frame per range, each read in stream order
    /// ([`Primary::read_in_stream_order`]).
    fn verify_send(&self, id: u64) {
        let capacity = self.local.capacity();
        let mut buf = vec![0u8; VERIFY_RANGE as usize];
        let mut offset = 0;
        while offset < capacity {
            let len = VERIFY_RANGE.min(capacity - offset);
            let data = &mut buf[..len as usize];
            let queued = self.read_in_stream_order(id, offset, data, |data| {
                let crc = crc32c::crc32c(data);
                let frame = |seq| Frame::Verify {
                    seq,
                    offset,
                    len,
                    crc,
                };
                if self.enqueue(HEADER_LEN as u64 + 4, frame).is_none() {
                    return false;
                }
                self.verify_state().sent += 1;
                true
            });
            match queued {
                Ok(Some(true)) => {}
                Ok(_) => return,
                Err(e) => {
                    warn!("verify read at {offset} failed: {e}");
                    self.verify_aborted(id);
                    return;
                }
            }
            offset += len;
        }
    }

    /// A VERIFY_RESULT of session `id`.
    pub(super) fn verify_result(self: &Arc<Self>, id: u64, offset: u64, len: u64, matches: bool) {
        let done = {
            let mut v = self.verify_state();
            if v.session != id || v.state != Some("running") {
                return;
            }
            v.compared += 1;
            if !matches {
                warn!("verify: range {offset}+{len} differs on the secondary");
                v.mismatches.push((offset, len));
            }
            if v.compared < v.total {
                return;
            }
            v.state = Some("done");
            (v.compared, v.mismatches.clone())
        };
        let (ranges, mismatches) = done;
        info!(
            "verify done: {ranges} ranges compared, {} mismatches",
            mismatches.len()
        );
        if !mismatches.is_empty() {
            // Called from the link's reader: the repair (which syncs the dirty log and takes
            // the order lock, which a writer waiting for window space may hold) runs on its
            // own thread, so that acknowledgements keep flowing.
            let me = self.clone();
            let ranges = mismatches.clone();
            std::thread::spawn(move || me.repair(id, &ranges));
        }
        self.events.send(&events::VerifyDone {
            role: Side::Primary,
            ranges,
            mismatches: mismatches.len() as u64,
            complete: true,
        });
    }

    /// Marks `ranges` dirty (also across a restart of this primary) and resends them now.
    fn repair(&self, id: u64, ranges: &[(u64, u64)]) {
        let mut repair = DirtyBitmap::new(self.local.capacity(), self.opts.dirty_granularity);
        for &(offset, len) in ranges {
            if let Some(l) = &self.log {
                if let Err(e) = l.record(offset, len) {
                    warn!("recording a verify mismatch in the dirty log: {e}");
                }
            }
            self.dirty().mark(offset, len);
            repair.mark(offset, len);
        }
        let started = {
            let _order = self.order();
            let mut st = self.state();
            match st.link.session_mut().filter(|s| s.id == id) {
                Some(s) => {
                    s.resync_remaining += repair.dirty_bytes();
                    true
                }
                None => false,
            }
        };
        if started {
            // Nothing else ends it: it stops when session `id` is gone (checked at each range).
            self.resync(id, repair, &AtomicBool::new(false));
        }
    }

    /// Session `id` ended: a verify running in it stops.
    pub(super) fn verify_aborted(&self, id: u64) {
        let (ranges, mismatches) = {
            let mut v = self.verify_state();
            if v.session != id || v.state != Some("running") {
                return;
            }
            v.state = Some("aborted");
            (v.compared, v.mismatches.len() as u64)
        };
        warn!("verify aborted after {ranges} ranges");
        self.events.send(&events::VerifyDone {
            role: Side::Primary,
            ranges,
            mismatches,
            complete: false,
        });
    }
}
