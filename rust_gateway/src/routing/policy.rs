//! The worker choice itself, as a pure function of (candidates, sticky worker, thresholds), so it
//! is tested without any I/O.
//!
//! Order of preference: the session's sticky worker, then the worker holding the longest cached
//! prefix, then the least loaded; a preferred worker is passed over only when it is overloaded
//! relative to the least loaded one (keeps affinity under mild imbalance, avoids pile-ups).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    /// Requests this gateway has in flight on the worker.
    pub load: usize,
    /// Leading prefix chunks of this request the worker is believed to hold.
    pub matched_chunks: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Balance {
    pub abs_threshold: usize,
    pub rel_threshold: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Sticky session worker.
    Session,
    /// Longest cached prefix.
    Prefix,
    /// No usable affinity: least loaded.
    Load,
    /// Affinity existed but its worker was overloaded, so the request spilled to a less loaded one.
    Spill,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Session => "session",
            Reason::Prefix => "prefix",
            Reason::Load => "load",
            Reason::Spill => "spill",
        }
    }
}

/// True when `load` is too far above `min_load` to keep sending affinity traffic there.
pub fn overloaded(load: usize, min_load: usize, b: Balance) -> bool {
    load.saturating_sub(min_load) > b.abs_threshold && (load as f64) > b.rel_threshold * (min_load as f64)
}

/// Pick a candidate; `None` only when `cands` is empty. `rotation` breaks ties among equally
/// loaded workers so that cold traffic spreads instead of always hitting the first one.
pub fn choose(cands: &[Candidate], sticky: Option<u64>, b: Balance, rotation: usize) -> Option<(u64, Reason)> {
    let min_load = cands.iter().map(|c| c.load).min()?;
    let ok = |c: &Candidate| !overloaded(c.load, min_load, b);
    let mut spilled = false;

    if let Some(id) = sticky {
        if let Some(c) = cands.iter().find(|c| c.id == id) {
            if ok(c) {
                return Some((c.id, Reason::Session));
            }
            spilled = true;
        }
    }

    let best_match = cands.iter().map(|c| c.matched_chunks).max().unwrap_or(0);
    if best_match > 0 {
        let prefer = cands
            .iter()
            .filter(|c| ok(c) && c.matched_chunks > 0)
            .max_by(|a, b| a.matched_chunks.cmp(&b.matched_chunks).then(b.load.cmp(&a.load)));
        if let Some(c) = prefer {
            return Some((c.id, Reason::Prefix));
        }
        spilled = true;
    }

    let least: Vec<&Candidate> = cands.iter().filter(|c| c.load == min_load).collect();
    let c = least[rotation % least.len()];
    Some((c.id, if spilled { Reason::Spill } else { Reason::Load }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Balance = Balance { abs_threshold: 4, rel_threshold: 1.5 };

    fn c(id: u64, load: usize, matched: usize) -> Candidate {
        Candidate { id, load, matched_chunks: matched }
    }

    #[test]
    fn empty_has_no_choice() {
        assert_eq!(choose(&[], None, B, 0), None);
    }

    #[test]
    fn longest_prefix_wins_under_mild_imbalance() {
        let cands = [c(1, 0, 0), c(2, 3, 10), c(3, 1, 4)];
        assert_eq!(choose(&cands, None, B, 0), Some((2, Reason::Prefix)));
    }

    #[test]
    fn overloaded_prefix_worker_spills_to_least_loaded() {
        // worker 2 holds the prefix but has 20 in flight vs 2: over both thresholds.
        let cands = [c(1, 2, 0), c(2, 20, 10)];
        assert_eq!(choose(&cands, None, B, 0), Some((1, Reason::Spill)));
        // the next best prefix that is not overloaded is still preferred over no affinity.
        let cands = [c(1, 2, 0), c(2, 20, 10), c(3, 4, 3)];
        assert_eq!(choose(&cands, None, B, 0), Some((3, Reason::Prefix)));
    }

    #[test]
    fn both_thresholds_must_be_exceeded() {
        // 100 vs 90: abs gap 10 > 4 but ratio 1.11 < 1.5 -> not overloaded, affinity kept.
        let cands = [c(1, 90, 0), c(2, 100, 5)];
        assert_eq!(choose(&cands, None, B, 0), Some((2, Reason::Prefix)));
        // 3 vs 0: ratio infinite but gap 3 <= 4 -> not overloaded.
        let cands = [c(1, 0, 0), c(2, 3, 5)];
        assert_eq!(choose(&cands, None, B, 0), Some((2, Reason::Prefix)));
    }

    #[test]
    fn sticky_session_beats_prefix_unless_overloaded() {
        let cands = [c(1, 1, 9), c(2, 2, 0)];
        assert_eq!(choose(&cands, Some(2), B, 0), Some((2, Reason::Session)));
        let cands = [c(1, 1, 9), c(2, 30, 0)];
        assert_eq!(choose(&cands, Some(2), B, 0), Some((1, Reason::Prefix)));
        // sticky worker gone (not a candidate): falls back quietly.
        assert_eq!(choose(&[c(1, 0, 0)], Some(7), B, 0), Some((1, Reason::Load)));
    }

    #[test]
    fn cold_traffic_rotates_among_least_loaded() {
        let cands = [c(1, 0, 0), c(2, 0, 0), c(3, 5, 0)];
        let picks: Vec<u64> = (0..4).map(|r| choose(&cands, None, B, r).unwrap().0).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
    }
}
