//! What a restart of the Secondary VM's device is (docs/colo-with-qemu.md, "The rule"): QEMU
//! restarted it from the primary's state of a tentative cut, it resumed its own state, its
//! guest reset the device, or it runs from a position the disk cannot match.

use super::super::layers::Mark;

/// A queue of the Secondary VM's device runs again: what is known about it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Restarted<'a> {
    pub queue: u16,
    /// The position QEMU restarted the queue from.
    pub at: u16,
    /// Where the queue stood when the device stopped (`None`: it never ran in this process).
    pub own: Option<u16>,
    /// The tentative cuts (and the last committed one), oldest first.
    pub marks: &'a [Mark],
    /// A primary streams to this secondary now.
    pub link_alive: bool,
}

/// What the restart is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Restart {
    /// QEMU gave the Secondary VM the primary's state of the cut at this epoch.
    Cut(u64),
    /// It resumed its own state (the checkpoint was abandoned): nothing changes.
    Own,
    /// Its guest reset the device (the ring starts over at 0): its own state.
    Reset,
    /// The device's first start in this process, with no cut to take: nothing to decide.
    First,
    /// From a position that is neither its own nor any cut's: its memory is not its own and
    /// the disk cannot be cut to match it.
    Unmatched,
}

impl Restarted<'_> {
    /// Decides. A cut whose position matches wins, except when the position is also the
    /// Secondary VM's own and no primary streams (an abandoned checkpoint: QEMU resumes the
    /// primary only after the Secondary VM loaded its state, so a live primary means the
    /// checkpoint went through).
    pub fn decide(&self) -> Restart {
        let q = usize::from(self.queue);
        let resumed_own = self.own == Some(self.at);
        let matching = self.marks.iter().rev().find(|m| {
            m.bases
                .get(q)
                .copied()
                .flatten()
                .is_none_or(|b| b == self.at)
        });
        match (matching, self.own) {
            (Some(m), _) if !resumed_own || self.link_alive => Restart::Cut(m.epoch),
            _ if resumed_own => Restart::Own,
            (None, Some(_)) if self.at == 0 => Restart::Reset,
            (None, None) if self.marks.is_empty() => Restart::First,
            _ => Restart::Unmatched,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(epoch: u64, base: u16) -> Mark {
        Mark {
            epoch,
            bases: vec![Some(base)],
        }
    }

    fn decide(own: Option<u16>, at: u16, marks: &[Mark], link_alive: bool) -> Restart {
        Restarted {
            queue: 0,
            at,
            own,
            marks,
            link_alive,
        }
        .decide()
    }

    /// Issue 19: the primary stopped while the Secondary VM ran (a user `stop`), and QEMU
    /// checkpointed with the primary still stopped. Without a cut at that stop the restart
    /// from the primary's position is not "resumed its own state": it is refused.
    #[test]
    fn no_cut_and_not_its_own_position_is_unmatched() {
        assert_eq!(decide(Some(28), 13, &[], true), Restart::Unmatched);
        assert_eq!(decide(Some(28), 13, &[], false), Restart::Unmatched);
        assert_eq!(
            decide(Some(28), 13, &[mark(3, 11)], true),
            Restart::Unmatched
        );
        // The stop's marker kept as a cut: that cut.
        assert_eq!(decide(Some(28), 13, &[mark(3, 13)], true), Restart::Cut(3));
    }

    #[test]
    fn the_newest_matching_cut_wins() {
        let marks = [mark(2, 13), mark(3, 20), mark(4, 13)];
        assert_eq!(decide(Some(28), 13, &marks, true), Restart::Cut(4));
        assert_eq!(decide(Some(28), 20, &marks, true), Restart::Cut(3));
    }

    #[test]
    fn its_own_position_is_its_own_state_unless_a_live_primary_says_checkpoint() {
        assert_eq!(decide(Some(28), 28, &[], true), Restart::Own);
        assert_eq!(decide(Some(28), 28, &[mark(3, 13)], false), Restart::Own);
        assert_eq!(decide(Some(28), 28, &[mark(3, 28)], false), Restart::Own);
        assert_eq!(decide(Some(28), 28, &[mark(3, 28)], true), Restart::Cut(3));
    }

    #[test]
    fn first_starts_resets_and_unknown_queues() {
        assert_eq!(decide(None, 13, &[], true), Restart::First);
        assert_eq!(decide(None, 13, &[mark(1, 13)], true), Restart::Cut(1));
        assert_eq!(decide(None, 13, &[mark(1, 9)], true), Restart::Unmatched);
        assert_eq!(decide(Some(28), 0, &[mark(1, 9)], true), Restart::Reset);
        assert_eq!(decide(Some(28), 0, &[mark(1, 0)], true), Restart::Cut(1));
        // A marker that does not know this queue's position matches any.
        let unknown = Mark {
            epoch: 5,
            bases: vec![None],
        };
        assert_eq!(decide(Some(28), 13, &[unknown], true), Restart::Cut(5));
    }
}
