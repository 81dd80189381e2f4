//! The decision table both ends of a connecting pair apply to their generations
//! (docs/replication-protocol.md, "Identity and generations"): incremental, full sync,
//! failback, or a refusal (split brain, a full sync not allowed, an inconsistent secondary,
//! the same disk).

use super::{Generations, ZERO_GENERATION};

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Both sides wrote since their last common generation.
    SplitBrain,
    /// The secondary's disk is new, unrelated or stale; `--allow-full-sync` would overwrite it.
    FullSyncNeeded,
    /// The secondary is the inconsistent target of a full sync from another lineage.
    Inconsistent,
    /// Both ends are the same disk.
    SameDisk,
}

/// What a connecting pair does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The secondary holds a generation the primary's dirty record covers: resend that record.
    Incremental(String),
    /// The secondary's whole disk is overwritten (it is inconsistent until the next checkpoint).
    Full(String),
    /// Failback: both disks diverged from the same generation (the primary's and the
    /// secondary's bitmap) and both kept a dirty record since; the secondary's operator
    /// discards its data (`--discard-my-data`). The secondary sends its record (PEER_DIRTY),
    /// the primary resends the union; the secondary is inconsistent until the next checkpoint.
    Failback(String),
    Refuse(Refusal, String),
}

impl Decision {
    /// The event's / log's name of the decision.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Incremental(_) => "incremental",
            Decision::Full(_) => "full-sync",
            Decision::Failback(_) => "incremental-failback",
            Decision::Refuse(Refusal::SplitBrain, _) => "split-brain",
            Decision::Refuse(Refusal::FullSyncNeeded, _) => "full-sync-needed",
            Decision::Refuse(Refusal::Inconsistent, _) => "inconsistent",
            Decision::Refuse(Refusal::SameDisk, _) => "same-disk",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Decision::Incremental(r)
            | Decision::Full(r)
            | Decision::Failback(r)
            | Decision::Refuse(_, r) => r,
        }
    }

    /// Wire code in WELCOME (refusals are not sent as WELCOME).
    pub fn code(&self) -> u32 {
        match self {
            Decision::Incremental(_) => 1,
            Decision::Full(_) => 2,
            Decision::Failback(_) => 3,
            Decision::Refuse(..) => 0,
        }
    }

    /// Whether the secondary's disk holds no checkpoint while this stream runs (it is marked
    /// inconsistent until the next one).
    pub fn overwrites(&self) -> bool {
        matches!(self, Decision::Full(_) | Decision::Failback(_))
    }
}

/// The flag an operator passes to the secondary to allow a full sync over its disk.
pub const ALLOW_FULL_SYNC_FLAG: &str = "--allow-full-sync";
/// The flag an operator passes to the secondary to give up what its disk wrote since the
/// pair's last common generation (a failback's sync target; DRBD's name).
pub const DISCARD_MY_DATA_FLAG: &str = "--discard-my-data";

/// What else, besides both sides' generations, the decision depends on. Both ends know all of
/// it: the primary says whether it keeps a dirty log in HELLO, the secondary its flags in
/// WELCOME.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncPolicy {
    /// The secondary's operator allows a full sync (`--allow-full-sync`).
    pub allow_full: bool,
    /// The secondary's operator discards its disk's own writes (`--discard-my-data`).
    pub discard_my_data: bool,
    /// The primary keeps a persistent dirty log.
    pub primary_dirty_log: bool,
    /// The secondary has a readable dirty log of its own (of this disk's geometry).
    pub secondary_dirty_log: bool,
}

/// The decision table (docs/replication-protocol.md): what primary `p` and secondary `s` do,
/// given whether the secondary's operator allowed a full sync (no failback: see
/// [`decide_with`]).
pub fn decide(p: &Generations, s: &Generations, allow_full: bool) -> Decision {
    decide_with(
        p,
        s,
        &SyncPolicy {
            allow_full,
            ..SyncPolicy::default()
        },
    )
}

/// The whole decision table. A pure function: both ends compute it, the secondary's answer is
/// checked by the primary.
pub fn decide_with(p: &Generations, s: &Generations, policy: &SyncPolicy) -> Decision {
    let allow_full = policy.allow_full;
    let full_or_refuse = |why: String| full_or_refuse(allow_full, why);
    if p.disk_id == s.disk_id && p.disk_id != 0 {
        return Decision::Refuse(
            Refusal::SameDisk,
            format!(
                "primary and secondary are the same disk (id {:032x})",
                p.disk_id
            ),
        );
    }
    if s.inconsistent() {
        return decide_inconsistent(p, s, allow_full);
    }
    if s.current == 0 {
        return full_or_refuse("the secondary's disk has no replication history".into());
    }
    let same_lineage = s.current == p.bitmap || s.current == p.current;
    let source_ok = s.source == 0 || p.knows(s.source);
    if same_lineage && source_ok {
        if s.epoch < p.epoch {
            return full_or_refuse(format!(
                "the secondary's disk is older (checkpoint {}) than the primary's last \
                 checkpoint {}",
                s.epoch, p.epoch
            ));
        }
        return Decision::Incremental(format!(
            "the secondary holds generation {:016x} (checkpoint {}): the primary's dirty \
             record covers every difference",
            s.current, s.epoch
        ));
    }
    if same_lineage {
        return full_or_refuse(format!(
            "the secondary applied a stream from another primary (generation {:016x}) since \
             its last checkpoint",
            s.source
        ));
    }
    let s_past = s.bitmap != 0 && p.knows(s.bitmap) || s.history.iter().any(|&g| p.knows(g));
    // Failback (rule 8a/8b): both diverged from the generation both bitmaps name; the
    // secondary's operator gives up its side.
    let common = s.bitmap == p.bitmap && s.bitmap != 0 && s.bitmap != ZERO_GENERATION;
    if policy.discard_my_data && !p.knows(s.current) && (common || s_past) {
        return decide_failback(s, policy, common);
    }
    if !p.knows(s.current) && s_past {
        return Decision::Refuse(
            Refusal::SplitBrain,
            format!(
                "split brain: the secondary's disk moved on to generation {:016x} (e.g. a \
                 failover) while the primary wrote since their last common generation; \
                 neither disk is overwritten (to resync this disk from the primary, start the \
                 secondary with {DISCARD_MY_DATA_FLAG})",
                s.current
            ),
        );
    }
    if p.knows(s.current) || p.knows(s.source) {
        return full_or_refuse(format!(
            "the secondary holds an older generation {:016x} the dirty record does not cover",
            s.current
        ));
    }
    full_or_refuse(format!(
        "the secondary's disk (generation {:016x}) is unrelated to the primary's",
        s.current
    ))
}

/// A full sync when the operator allowed it (`allow_full`), else its refusal; `why` says
/// what makes an incremental resync impossible.
fn full_or_refuse(allow_full: bool, why: String) -> Decision {
    if allow_full {
        Decision::Full(format!(
            "{why}; full sync allowed by {ALLOW_FULL_SYNC_FLAG}"
        ))
    } else {
        Decision::Refuse(
            Refusal::FullSyncNeeded,
            format!(
                "{why}: a full sync would overwrite the secondary's disk; start the \
                 secondary with {ALLOW_FULL_SYNC_FLAG} to allow it"
            ),
        )
    }
}

/// [`decide_with`] for an inconsistent secondary (a full sync or a failback resync was
/// interrupted): the same primary restarts it; another one only with a full sync allowed.
fn decide_inconsistent(p: &Generations, s: &Generations, allow_full: bool) -> Decision {
    if p.knows(s.source) {
        return Decision::Full(
            "the secondary is inconsistent (a full sync from this primary was interrupted): \
             the full sync restarts"
                .into(),
        );
    }
    if allow_full {
        return full_or_refuse(
            allow_full,
            "the secondary is inconsistent from another primary".into(),
        );
    }
    Decision::Refuse(
        Refusal::Inconsistent,
        format!(
            "the secondary is inconsistent (mid full sync from generation {:016x}, which \
             this primary is not); start it with {ALLOW_FULL_SYNC_FLAG} to resync from here",
            s.source
        ),
    )
}

/// [`decide_with`] when the secondary's operator gives up its side ([`DISCARD_MY_DATA_FLAG`],
/// rule 8a/8b): a failback when both disks diverged from the generation both bitmaps name
/// (`common`) and both kept a dirty record since, else a full sync if allowed.
fn decide_failback(s: &Generations, policy: &SyncPolicy, common: bool) -> Decision {
    if common && policy.primary_dirty_log && policy.secondary_dirty_log {
        return Decision::Failback(format!(
            "both disks diverged from generation {:016x} and both kept a dirty record \
             since; {DISCARD_MY_DATA_FLAG}: the primary resends the union of both records",
            s.bitmap
        ));
    }
    let why = if common {
        format!(
            "both disks diverged from generation {:016x} and {}",
            s.bitmap,
            match (policy.primary_dirty_log, policy.secondary_dirty_log) {
                (false, false) => "neither kept a dirty record since",
                (false, _) => "the primary kept no dirty record since (--no-dirty-log)",
                _ => "the secondary has no readable dirty record of its own",
            }
        )
    } else {
        "the disks share no generation both dirty records start from".to_string()
    };
    full_or_refuse(
        policy.allow_full,
        format!("{DISCARD_MY_DATA_FLAG} given, but {why}"),
    )
}
