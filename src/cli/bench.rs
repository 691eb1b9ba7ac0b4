//! `arenafs gen-index` (hidden): synthetic index entries for the scale benchmark
//! (`scripts/bench-scale`).

use anyhow::Result;

/// `arenafs gen-index`: adds `n` synthetic complete entries to the index of `cache_dir` (paths
/// `synthetic/dNNNN/fNNNNNNN.safetensors`, 100 MiB each, no data files), in transactions of
/// 10,000, so that the scale benchmark can measure an index of a million entries without a
/// million copies.
pub(crate) fn gen_index(cache_dir: &std::path::Path, n: u64) -> Result<()> {
    use arenafs::cache::{ChunkMap, EntryRecord, Store};
    let store = Store::open(cache_dir)?;
    let size = 100 << 20;
    let chunk = arenafs::daemon::CHUNK_SIZE;
    let mut map = ChunkMap::new(size, chunk);
    for c in 0..map.chunk_count() {
        map.set_present(c);
    }
    let now = arenafs::cache::live::now_secs();
    let mut done = 0;
    while done < n {
        let batch: Vec<_> = (done..n.min(done + 10_000))
            .map(|i| {
                let rec = EntryRecord {
                    id: store.new_id()?,
                    identity: arenafs::source::Identity {
                        size,
                        mtime_ns: i as i64,
                        ino: i + 1,
                        ctime_ns: 0,
                    },
                    map: map.clone(),
                    last_access: now,
                    perms: Some(arenafs::cache::Perms {
                        mode: libc::S_IFREG | 0o644,
                        uid: 0,
                        gid: 0,
                        ino: i + 1,
                    }),
                };
                let path = format!("synthetic/d{:04}/f{i:07}.safetensors", i / 1000);
                Ok((std::path::PathBuf::from(path), rec))
            })
            .collect::<Result<_>>()?;
        store.put_many(&batch)?;
        done += batch.len() as u64;
    }
    println!(
        "{} entries in the index of {}",
        store.len(),
        cache_dir.display()
    );
    Ok(())
}
