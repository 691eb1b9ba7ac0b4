//! The index as held in memory: one compact record per cached file, ordered by path, with
//! running totals and a recency stamp per record.
//!
//! Memory is what the index costs at scale (a million entries must fit in a few hundred MiB), so
//! each path is held once, a complete copy keeps no chunk bitmap, and the least-recently-used
//! order is a stamp in the record, not a second structure keyed by path. Whatever asks for the
//! oldest copies (eviction, trim) scans the records; everything a request does is a point lookup
//! or a range under a directory, and the figures `status` and `/metrics` show are running totals.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use super::ChunkMap;
use super::store::{EntryRecord, Perms};
use crate::source::Identity;

/// Stamps are seconds since the epoch shifted left by this much; the low bits order the uses
/// within one second.
const STAMP_SHIFT: u32 = 20;

/// Counts and byte sums over all entries, kept up to date by every change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Entries.
    pub count: usize,
    /// Complete entries.
    pub complete: usize,
    /// Sum of the entries' NAS sizes (what they hold once complete).
    pub reserved: u64,
    /// Bytes held by present chunks.
    pub present: u64,
}

/// One indexed copy, as an eviction or trim sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aged {
    /// NAS-relative path.
    pub path: PathBuf,
    /// Entry id.
    pub id: u64,
    /// NAS size.
    pub size: u64,
    /// Last use, seconds since the epoch.
    pub last_access: u64,
}

#[derive(Debug)]
enum Chunks {
    Complete { chunk_size: u64 },
    Partial(Box<ChunkMap>),
}

#[derive(Debug)]
struct Slot {
    id: u64,
    identity: Identity,
    /// Recency: larger is more recent (see [`STAMP_SHIFT`]).
    stamp: u64,
    perms: Option<Perms>,
    chunks: Chunks,
}

impl Slot {
    fn new(rec: EntryRecord, stamp: u64) -> Self {
        let chunks = if rec.map.is_complete() {
            Chunks::Complete {
                chunk_size: rec.map.chunk_size(),
            }
        } else {
            Chunks::Partial(Box::new(rec.map))
        };
        Self {
            id: rec.id,
            identity: rec.identity,
            stamp,
            perms: rec.perms,
            chunks,
        }
    }

    fn record(&self) -> EntryRecord {
        let map = match &self.chunks {
            Chunks::Complete { chunk_size } => ChunkMap::full(self.identity.size, *chunk_size),
            Chunks::Partial(m) => (**m).clone(),
        };
        EntryRecord {
            id: self.id,
            identity: self.identity,
            map,
            last_access: self.last_access(),
            perms: self.perms,
        }
    }

    fn last_access(&self) -> u64 {
        self.stamp >> STAMP_SHIFT
    }

    fn complete(&self) -> bool {
        matches!(self.chunks, Chunks::Complete { .. })
    }

    fn present(&self) -> u64 {
        match &self.chunks {
            Chunks::Complete { .. } => self.identity.size,
            Chunks::Partial(m) => m.present_bytes(),
        }
    }

    fn aged(&self, path: &Path) -> Aged {
        Aged {
            path: path.to_path_buf(),
            id: self.id,
            size: self.identity.size,
            last_access: self.last_access(),
        }
    }
}

/// The in-memory index.
#[derive(Debug, Default)]
pub struct Entries {
    /// Ordered by path, component-wise, so everything below a directory is one range.
    map: BTreeMap<Box<Path>, Slot>,
    totals: Totals,
    /// The largest stamp given.
    last_stamp: u64,
}

impl Entries {
    /// Builds the index from records read at startup (in any order).
    pub fn load(records: Vec<(PathBuf, EntryRecord)>) -> Self {
        let mut totals = Totals::default();
        let mut last_stamp = 0;
        // Collected at once, the map is built dense (a map grown by inserts in order is about
        // half full).
        let map: BTreeMap<Box<Path>, Slot> = records
            .into_iter()
            .map(|(p, rec)| {
                let slot = Slot::new(rec.clone(), rec.last_access << STAMP_SHIFT);
                last_stamp = last_stamp.max(slot.stamp);
                (p.into_boxed_path(), slot)
            })
            .collect();
        for slot in map.values() {
            add(&mut totals, slot);
        }
        Self {
            map,
            totals,
            last_stamp,
        }
    }

    /// A stamp for a use at `secs`: after every stamp given in the same second, so that uses
    /// within one second keep their order.
    fn stamp(&mut self, secs: u64) -> u64 {
        let base = secs << STAMP_SHIFT;
        let stamp = if base <= self.last_stamp && self.last_stamp < base + (1 << STAMP_SHIFT) - 1 {
            self.last_stamp + 1
        } else {
            base
        };
        self.last_stamp = self.last_stamp.max(stamp);
        stamp
    }

    /// The running totals.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The record of `rel`.
    pub fn get(&self, rel: &Path) -> Option<EntryRecord> {
        self.map.get(rel).map(Slot::record)
    }

    /// Whether `rel` is indexed.
    pub fn contains(&self, rel: &Path) -> bool {
        self.map.contains_key(rel)
    }

    /// The entry id and recorded owner and mode of `rel`.
    pub fn perms_of(&self, rel: &Path) -> Option<(u64, Option<Perms>)> {
        self.map.get(rel).map(|s| (s.id, s.perms))
    }

    /// The NAS size of the copy of `rel`.
    pub fn size_of(&self, rel: &Path) -> Option<u64> {
        self.map.get(rel).map(|s| s.identity.size)
    }

    /// Records `rec` for `rel` (replacing what was there: the more recent use is kept).
    pub fn insert(&mut self, rel: &Path, rec: EntryRecord) {
        let stamp = self.stamp(rec.last_access);
        match self.map.get_mut(rel) {
            Some(slot) => {
                sub(&mut self.totals, slot);
                let stamp = stamp.max(slot.stamp);
                *slot = Slot::new(rec, stamp);
                add(&mut self.totals, slot);
            }
            None => {
                let slot = Slot::new(rec, stamp);
                add(&mut self.totals, &slot);
                self.map.insert(rel.into(), slot);
            }
        }
    }

    /// Removes the entry of `rel` if it has id `id`; returns whether it did.
    pub fn remove(&mut self, rel: &Path, id: u64) -> bool {
        if self.map.get(rel).is_none_or(|s| s.id != id) {
            return false;
        }
        if let Some(slot) = self.map.remove(rel) {
            sub(&mut self.totals, &slot);
        }
        true
    }

    /// Sets the owner and mode of entry `id` at `rel`; returns whether they changed.
    pub fn set_perms(&mut self, rel: &Path, id: u64, perms: Perms) -> bool {
        match self.map.get_mut(rel) {
            Some(s) if s.id == id && s.perms != Some(perms) => {
                s.perms = Some(perms);
                true
            }
            _ => false,
        }
    }

    /// Records a use of `rel` at `secs`; returns whether it is indexed.
    pub fn touch(&mut self, rel: &Path, secs: u64) -> bool {
        if !self.map.contains_key(rel) {
            return false;
        }
        let stamp = self.stamp(secs);
        if let Some(s) = self.map.get_mut(rel) {
            s.stamp = s.stamp.max(stamp);
        }
        true
    }

    fn under<'a>(&'a self, dir: &'a Path) -> impl Iterator<Item = (&'a Path, &'a Slot)> + 'a {
        self.map
            .range::<Path, _>((Bound::Included(dir), Bound::Unbounded))
            .take_while(move |(p, _)| p.starts_with(dir))
            .map(|(p, s)| (&**p, s))
    }

    /// Whether anything is indexed at or below `dir`.
    pub fn any_under(&self, dir: &Path) -> bool {
        self.under(dir).next().is_some()
    }

    /// The paths indexed at or below `dir`.
    pub fn paths_under(&self, dir: &Path) -> Vec<PathBuf> {
        self.under(dir).map(|(p, _)| p.to_path_buf()).collect()
    }

    /// Whether a complete copy lies strictly below `dir`.
    pub fn complete_below(&self, dir: &Path) -> bool {
        self.under(dir).any(|(p, s)| p != dir && s.complete())
    }

    /// The names directly in `dir` that lead to complete copies: a file (its record) or a
    /// directory above one (`None`).
    pub fn complete_children(&self, dir: &Path) -> BTreeMap<OsString, Option<EntryRecord>> {
        let mut out = BTreeMap::new();
        for (p, s) in self.under(dir).filter(|(_, s)| s.complete()) {
            let Ok(rest) = p.strip_prefix(dir) else {
                continue;
            };
            let mut comps = rest.components();
            let Some(std::path::Component::Normal(first)) = comps.next() else {
                continue;
            };
            let leaf = comps.next().is_none();
            out.entry(first.to_os_string())
                .or_insert_with(|| leaf.then(|| s.record()));
        }
        out
    }

    /// Every entry id (orphan removal at startup).
    pub fn ids(&self) -> std::collections::HashSet<u64> {
        self.map.values().map(|s| s.id).collect()
    }

    /// Entries without a recorded owner and mode (records of version 1).
    pub fn missing_perms(&self) -> Vec<(PathBuf, u64)> {
        self.map
            .iter()
            .filter(|(_, s)| s.perms.is_none())
            .map(|(p, s)| (p.to_path_buf(), s.id))
            .collect()
    }

    /// The records of `paths` that are indexed (to make their uses durable).
    pub fn records_of<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a PathBuf>,
    ) -> Vec<(PathBuf, EntryRecord)> {
        paths
            .into_iter()
            .filter_map(|p| self.get(p).map(|r| (p.clone(), r)))
            .collect()
    }

    /// Up to `limit` of the least recently used entries that `keep` does not keep, oldest
    /// first. One pass over the index, holding at most `limit` candidates.
    pub fn oldest(&self, limit: usize, mut keep: impl FnMut(&Path) -> bool) -> Vec<Aged> {
        use std::collections::BinaryHeap;
        if limit == 0 {
            return Vec::new();
        }
        // A max-heap of (stamp, path): its top is the most recent of the candidates so far.
        let mut heap: BinaryHeap<(u64, &Path)> = BinaryHeap::with_capacity(limit + 1);
        for (p, s) in &self.map {
            if heap.len() == limit && heap.peek().is_some_and(|&(top, _)| s.stamp >= top) {
                continue;
            }
            if keep(p) {
                continue;
            }
            heap.push((s.stamp, p));
            if heap.len() > limit {
                heap.pop();
            }
        }
        heap.into_sorted_vec()
            .into_iter()
            .filter_map(|(_, p)| self.map.get(p).map(|s| s.aged(p)))
            .collect()
    }

    /// Every entry `pick` picks, least recently used first.
    pub fn by_age(&self, mut pick: impl FnMut(&Path, &Aged) -> bool) -> Vec<Aged> {
        let mut out: Vec<(u64, Aged)> = self
            .map
            .iter()
            .filter_map(|(p, s)| {
                let a = s.aged(p);
                pick(p, &a).then_some((s.stamp, a))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.path.cmp(&b.1.path)));
        out.into_iter().map(|(_, a)| a).collect()
    }
}

fn add(t: &mut Totals, s: &Slot) {
    t.count += 1;
    t.complete += usize::from(s.complete());
    t.reserved += s.identity.size;
    t.present += s.present();
}

fn sub(t: &mut Totals, s: &Slot) {
    t.count -= 1;
    t.complete -= usize::from(s.complete());
    t.reserved -= s.identity.size;
    t.present -= s.present();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, size: u64, present: u64, last_access: u64) -> EntryRecord {
        let mut map = ChunkMap::new(size, 4);
        for c in 0..present.min(map.chunk_count()) {
            map.set_present(c);
        }
        EntryRecord {
            id,
            identity: Identity {
                size,
                mtime_ns: 1,
                ino: id,
                ctime_ns: 0,
            },
            map,
            last_access,
            perms: None,
        }
    }

    /// Totals recomputed from scratch.
    fn recount(e: &Entries) -> Totals {
        let mut t = Totals::default();
        for s in e.map.values() {
            add(&mut t, s);
        }
        t
    }

    #[test]
    fn totals_follow_every_change() {
        let mut e = Entries::load(vec![
            ("a/x".into(), rec(1, 10, 3, 100)),
            ("a/y".into(), rec(2, 8, 1, 100)),
        ]);
        assert_eq!(
            e.totals(),
            Totals {
                count: 2,
                complete: 1,
                reserved: 18,
                present: 14
            }
        );
        e.insert(Path::new("a/y"), rec(2, 8, 2, 200));
        e.insert(Path::new("b"), rec(3, 5, 0, 200));
        assert_eq!(e.totals().complete, 2);
        assert_eq!(e.totals().present, 18);
        assert!(!e.remove(Path::new("a/x"), 9), "another id");
        assert!(e.remove(Path::new("a/x"), 1));
        assert!(e.set_perms(
            Path::new("b"),
            3,
            Perms {
                mode: 0o100644,
                uid: 1,
                gid: 2,
                ino: 3
            }
        ));
        assert_eq!(e.totals(), recount(&e));
        assert_eq!(
            e.totals(),
            Totals {
                count: 2,
                complete: 1,
                reserved: 13,
                present: 8
            }
        );
    }

    #[test]
    fn records_come_back_as_they_went_in() {
        let partial = rec(1, 10, 1, 100);
        let complete = rec(2, 9, 3, 100);
        let e = Entries::load(vec![
            ("p".into(), partial.clone()),
            ("c".into(), complete.clone()),
        ]);
        assert_eq!(e.get(Path::new("p")), Some(partial));
        assert_eq!(e.get(Path::new("c")), Some(complete));
        assert_eq!(e.get(Path::new("q")), None);
    }

    #[test]
    fn oldest_first_uses_within_a_second_in_order() {
        let mut e = Entries::load(vec![
            ("old".into(), rec(1, 4, 1, 100)),
            ("older".into(), rec(2, 4, 1, 50)),
        ]);
        for (i, p) in ["n1", "n2", "n3"].into_iter().enumerate() {
            e.insert(Path::new(p), rec(10 + i as u64, 4, 1, 1000));
        }
        // Used again in the same second: now the most recent.
        e.touch(Path::new("n1"), 1000);
        let order = |v: Vec<Aged>| v.into_iter().map(|a| a.path).collect::<Vec<_>>();
        let all: Vec<PathBuf> = ["older", "old", "n2", "n3", "n1"]
            .into_iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(order(e.oldest(10, |_| false)), all);
        assert_eq!(order(e.oldest(2, |_| false)), all[..2]);
        assert_eq!(
            order(e.oldest(2, |p| p == Path::new("older"))),
            ["old", "n2"].map(PathBuf::from)
        );
        assert_eq!(order(e.by_age(|_, _| true)), all);
        assert_eq!(e.get(Path::new("n1")).unwrap().last_access, 1000);
        assert!(!e.touch(Path::new("nothing"), 1000));
    }

    #[test]
    fn ranges_stay_below_their_directory() {
        let e = Entries::load(vec![
            ("a/b".into(), rec(1, 4, 1, 1)),
            ("a/b/c".into(), rec(2, 4, 1, 1)),
            ("a/b.x".into(), rec(3, 4, 1, 1)),
            ("a/bc/d".into(), rec(4, 4, 0, 1)),
        ]);
        assert_eq!(
            e.paths_under(Path::new("a/b")),
            ["a/b", "a/b/c"].map(PathBuf::from)
        );
        assert!(e.complete_below(Path::new("a/b")));
        assert!(!e.complete_below(Path::new("a/bc")), "partial only");
        assert!(e.any_under(Path::new("a/bc")));
        let kids: Vec<_> = e.complete_children(Path::new("a")).into_keys().collect();
        assert_eq!(kids, ["b", "b.x"].map(OsString::from));
    }
}
